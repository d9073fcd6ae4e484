"""Entry point of the `ray_jobs/*.py` scripts (`ray job submit ... -- python ray_jobs/X.py --config F`).

Each job reads one YAML config (the same `LSVCRConfig` the CLI, Tune and Serve use), joins the cluster
(`RAY_ADDRESS`, set by `ray job submit`) and runs its pipeline stages; finished stage outputs are skipped,
so a re-submitted job resumes. Use absolute paths or URIs in `paths.storage`: a job's working directory is
a temporary copy on the head node.
"""

from __future__ import annotations

import argparse
import json
import sys

from lsvcr.config import load_config
from lsvcr.errors import LSVCRError
from lsvcr.runtime import setup_logging


def _job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="job YAML (sections of LSVCRConfig, see docs/config.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def job_main(stages: tuple[str, ...], description: str, argv: list[str] | None = None,
             compare_no_alignment: bool = True) -> int:
    from lsvcr.pipeline import run_pipeline

    args = _job_parser(description).parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.config, args.overrides)
        run = run_pipeline(config, stages, compare_no_alignment=compare_no_alignment)
    except LSVCRError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"stages": list(stages), "timings_s": run.timings, "skipped": run.skipped,
                      "storage": run.layout.root}, indent=2), flush=True)
    return 0


def tune_job_main(argv: list[str] | None = None) -> int:
    """A sweep on the pipeline's outputs: PREPARED/ + ALIGNED/ vectors, fine-tuning from the aligned checkpoint."""
    from lsvcr import storage
    from lsvcr.pipeline import StageLayout
    from lsvcr.runtime import ensure_ray
    from lsvcr.tune import run_tune
    from lsvcr.tune_space import load_space

    parser = _job_parser("Ray Tune sweep over stage-2 fine-tuning of the pipeline's outputs")
    parser.add_argument("--space", required=True, help="search-space YAML (configs/tune_space.yaml documents it)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.config, args.overrides)
        space = load_space(args.space)
        layout = StageLayout(config.paths.storage)
        for name, uri in (("prepare", layout.prepared), ("align", layout.aligned)):
            if not storage.is_finished(uri):
                raise LSVCRError(f"tune needs the finished {name} stage at {uri}; submit ray_jobs/pipeline.py first")
        ensure_ray()
        aligned = storage.pull(layout.aligned)
        out = storage.local_dir(layout.uri("tune", config.finetune.task))
        summary = run_tune(config, space, storage.pull(layout.prepared), aligned / "vectors", out,
                           init=aligned / "checkpoint.pt")
    except LSVCRError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"sweep": str(out), "best_trial": summary.best_trial_id}, indent=2), flush=True)
    return 0
