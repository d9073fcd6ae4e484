"""`lsvcr finetune` (stage 2 -> MODEL/), `lsvcr evaluate` and `lsvcr tune` (a Ray Tune sweep)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lsvcr.config import load_config
from lsvcr.errors import LSVCRError
from lsvcr.evaluate import evaluate_model_dir, format_table
from lsvcr.finetune import run_finetune
from lsvcr.runtime import choose_device, set_threads
from lsvcr.tune import run_tune
from lsvcr.tune_space import load_space


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="PREPARED directory (or URI)")
    parser.add_argument("--vectors", default=None, help="VECTORS directory of item text vectors (not needed for model.mode=id)")
    parser.add_argument("--task", choices=("video", "comment"), default=None, help="default: finetune.task")
    parser.add_argument("--init", default=None, help="ALIGNED directory or checkpoint.pt from `lsvcr align`")
    parser.add_argument("--out", required=True, help="MODEL output directory; re-run the same command to resume")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: finetune.num_workers)")


def finetune_command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"finetune.task={args.task}")
    if args.workers:
        overrides.append(f"finetune.num_workers={args.workers}")
    config = load_config(args.config, overrides)
    os.environ.setdefault("OMP_NUM_THREADS", str(config.finetune.threads_per_worker))
    result = run_finetune(config, args.data, args.vectors, args.out, args.init)
    print(format_table(result.metrics))
    print(f"model written to {result.out_dir} (best epoch {result.best_epoch})")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="MODEL directory written by `lsvcr finetune`")
    parser.add_argument("--data", default=None, help="PREPARED directory (default: the one the model was trained on)")
    parser.add_argument("--vectors", default=None, help="VECTORS directory (default: the one used in training)")
    parser.add_argument("--full-ranking", action="store_true", help="also rank the target against all videos")
    parser.add_argument("--include-seen", action="store_true", help="full ranking: keep history videos as candidates")
    parser.add_argument("--breakdown", action="store_true",
                        help="video task: test metrics also by history length and by the target's training popularity")


def evaluate_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    set_threads(config.finetune.threads_per_worker)
    metrics = evaluate_model_dir(args.model, data_dir=args.data, vectors_dir=args.vectors,
                                 full_ranking=args.full_ranking or None,
                                 exclude_seen=False if args.include_seen else None,
                                 device=str(choose_device(config.finetune.use_gpu)), breakdown=args.breakdown)
    print(format_table(metrics))
    return 0


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="PREPARED directory")
    parser.add_argument("--vectors", default=None, help="VECTORS directory of item text vectors")
    parser.add_argument("--space", required=True, help="search space YAML (see configs/tune_space.yaml)")
    parser.add_argument("--out", required=True, help="sweep directory; re-run the same command to resume")
    parser.add_argument("--task", choices=("video", "comment"), default=None, help="default: finetune.task")
    parser.add_argument("--samples", type=int, default=None, help="trials to sample (default: tune.num_samples; "
                        "grid keys multiply it)")
    parser.add_argument("--scheduler", choices=("asha", "none"), default=None, help="default: tune.scheduler")
    parser.add_argument("--max-concurrent", type=int, default=None, help="default: tune.max_concurrent")
    parser.add_argument("--init", default=None, help="ALIGNED directory or checkpoint.pt to fine-tune from")


def tune_command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for flag, key in ((args.task, "finetune.task"), (args.samples, "tune.num_samples"),
                      (args.scheduler, "tune.scheduler"), (args.max_concurrent, "tune.max_concurrent")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    config = load_config(args.config, overrides)
    space = load_space(args.space)
    os.environ.setdefault("OMP_NUM_THREADS", str(config.finetune.threads_per_worker))
    init = args.init
    if init and Path(init).is_dir():
        init = str(Path(init) / "checkpoint.pt")
    summary = run_tune(config, space, args.data, args.vectors, args.out, init)
    if summary.best_trial_id is None:
        raise LSVCRError(f"no trial of the sweep in {args.out} reported a result; see trials.csv for the errors")
    print(f"best config written to {Path(args.out) / 'best_config.yaml'}")
    return 0
