"""`lsvcr demo`: every pipeline stage (`lsvcr.pipeline.run_pipeline`), then a short serving check."""

from __future__ import annotations

import argparse
import json
import sys

from lsvcr import console, storage
from lsvcr.config import load_config
from lsvcr.pipeline import STAGES, StageLayout, run_pipeline, serve_check


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="storage root for every stage output (default paths.storage)")
    parser.add_argument("--raw", default=None, help="raw tables; default: the embedded synthetic data set")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--no-serve", action="store_true", help="skip the short serving check at the end")


def demo_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.out:
        config.paths.storage = args.out
    if args.raw:
        config.paths.raw = args.raw
    log_dir = storage.local_dir(StageLayout(config.paths.storage).uri("logs"))
    try:
        with console.log_files(log_dir):  # Ray's, vLLM's and the workers' output: files, named below
            run = run_pipeline(config, tuple(s for s in args.stages.split(",") if s))
            if not args.no_serve and storage.is_finished(run.layout.model("video")):
                serve_check(config, run)
            console.stop_ray()  # before the closing lines: Ray's shutdown output stays in driver.log
    except BaseException:
        print(console.log_summary(log_dir), file=sys.stderr, flush=True)
        raise
    print(json.dumps({"timings_s": run.timings, "skipped": run.skipped}))
    print(f"results: {run.layout.report}/report.md", flush=True)
    print(console.log_summary(log_dir), flush=True)
    return 0
