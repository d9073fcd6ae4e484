"""`lsvcr encode` (PREPARED/ -> VECTORS/) and `lsvcr align` (stage 1 -> ALIGNED/)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lsvcr.config import load_config
from lsvcr.llm.align import run_align
from lsvcr.llm.encode import run_encode


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="PREPARED directory (output of `lsvcr prepare`)")
    parser.add_argument("--out", required=True, help="VECTORS directory to write (resumes if partly written)")
    parser.add_argument("--model", default=None, help="registry name (smollm2-135m, gemma3-270m) or a local "
                        "Hugging Face folder; default: encode.model")
    parser.add_argument("--what", default="all", choices=("items", "users", "all"),
                        help="items: captions and comments; users: stage-1 history prompts of train samples")


def encode_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    manifest = run_encode(config, args.data, args.out, args.what, args.model)
    print(json.dumps({"out": str(Path(args.out).resolve()), "counts": manifest["counts"],
                      "throughput": manifest["throughput"]}, indent=2))
    return 0


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="PREPARED directory (or URI)")
    parser.add_argument("--vectors", default=None, help="VECTORS from `lsvcr encode --what all` (frozen mode)")
    parser.add_argument("--mode", choices=("frozen", "lora"), default=None, help="default: align.mode")
    parser.add_argument("--out", required=True, help="ALIGNED output directory; re-run the same command to resume")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: align.num_workers)")


def align_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.workers is not None:
        config.align.num_workers = args.workers
    summary = run_align(config, args.data, args.vectors, args.out, args.mode)
    print(json.dumps(summary, indent=2))
    return 0
