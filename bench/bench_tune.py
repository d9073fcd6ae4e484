"""How much a Ray Tune sweep (`lsvcr tune`) beats the paper's default fine-tuning config on the demo data.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_tune.py [--work runs/bench_tune] [--vectors VECTORS]
        [--samples 8] [--sweep-epochs 6] [--final-epochs 20] [--task video]

1. `synth --preset demo` + `prepare` into WORK (kept, so a re-run resumes every step); on a shared 2-core
   machine `--max-train-targets N` keeps each user's N most recent train targets (data.max_train_targets_per_user)
   to bound the epoch cost (valid/test are unchanged: one target per user);
2. item text vectors: `--vectors` if given (e.g. the output of `lsvcr encode`), else the MiniLM
   fallback (`lsvcr.vectors.write_minilm_vectors`, 384-d all-MiniLM-L6-v2);
3. `run_tune` over `configs/tune_space.yaml` (`--samples` trials, `--sweep-epochs` each, ASHA);
4. the default config and the sweep's best config each trained by `run_finetune` for
   `--final-epochs` (early stopping on valid NDCG@5 as usual; the two runs side by side, one 1-CPU
   Ray Train worker each) and compared on the TEST split.
Results: bench/results/tune.json, plus the sweep's table and one summary line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lsvcr.config import LSVCRConfig, load_config  # noqa: E402
from lsvcr.data.prepared import load_manifest  # noqa: E402
from lsvcr.metrics import METRIC_NAMES  # noqa: E402
from lsvcr.vectors import read_vectors_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tune.json"


def prepare_demo(work: Path, max_train_targets: int = 0) -> Path:
    from lsvcr.config import PrepareConfig
    from lsvcr.data.prepare import prepare
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic

    raw = work / "raw"
    prepared = work / (f"prepared_t{max_train_targets}" if max_train_targets else "prepared")
    if not (raw / "user_video_inter.parquet").exists():
        write_synthetic(raw, PRESETS["demo"], "parquet")
    prepare(raw, prepared, PrepareConfig(max_train_targets_per_user=max_train_targets))  # keeps an up-to-date output
    return prepared


def minilm_vectors(prepared: Path, work: Path) -> Path:
    from lsvcr.vectors import is_vectors_dir, write_minilm_vectors

    out = work / "vectors_minilm"
    if not is_vectors_dir(out):
        write_minilm_vectors(prepared, out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_tune"))
    parser.add_argument("--vectors", default=None, help="VECTORS to use instead of the MiniLM fallback")
    parser.add_argument("--space", default=str(ROOT / "configs" / "tune_space.yaml"))
    parser.add_argument("--task", default="video", choices=("video", "comment"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--sweep-epochs", type=int, default=6)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--final-epochs", type=int, default=20)
    parser.add_argument("--max-train-targets", type=int, default=0, help="data.max_train_targets_per_user (0: all)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import ray

    from lsvcr.finetune import run_finetune
    from lsvcr.tune import run_tune
    from lsvcr.tune_space import load_space

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    prepared = prepare_demo(work, args.max_train_targets)
    vectors = Path(args.vectors).resolve() if args.vectors else minilm_vectors(prepared, work)
    timings["data_seconds"] = time.perf_counter() - started
    vectors_manifest = read_vectors_manifest(vectors)

    config = LSVCRConfig()
    config.finetune.task = args.task
    config.tune.num_samples = args.samples
    config.tune.max_epochs = args.sweep_epochs
    config.tune.grace_period = args.grace_period
    config.finetune.max_epochs = args.final_epochs
    started = time.perf_counter()
    sweep_dir = work / f"sweep_{args.task}_t{args.max_train_targets}"
    summary = run_tune(config, load_space(args.space), prepared, vectors, sweep_dir)
    timings["sweep_seconds"] = time.perf_counter() - started
    if summary.best_config is None:
        raise SystemExit("no trial of the sweep produced a result")

    finals = {}

    def train_final(name: str, final_config: LSVCRConfig) -> None:
        final_config.finetune.max_epochs = args.final_epochs
        started = time.perf_counter()
        result = run_finetune(final_config, prepared, vectors, work / f"final_{args.task}_t{args.max_train_targets}_{name}")
        timings[f"final_{name}_seconds"] = time.perf_counter() - started
        finals[name] = {"test": {k: result.metrics["test"][k] for k in METRIC_NAMES},
                        "valid": {k: result.metrics["valid"][k] for k in METRIC_NAMES},
                        "best_epoch": result.best_epoch, "epochs_run": result.metrics.get("epochs_run")}

    # Two independent Ray Train runs at once (one 1-CPU worker each): Ray Tune runs trials the same way.
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(train_final, "default", config),
                pool.submit(train_final, "best", load_config(sweep_dir / "best_config.yaml"))]
        for run in runs:
            run.result()

    default_ndcg, best_ndcg = finals["default"]["test"]["ndcg@5"], finals["best"]["test"]["ndcg@5"]
    searched = list(summary.param_keys)
    best_row = next(row for row in summary.rows if row["trial_id"] == summary.best_trial_id)
    statuses = [row["status"] for row in summary.rows]
    result = {
        "benchmark": "tune",
        "data": {"source": "synthetic demo preset (lsvcr synth --preset demo), prepared with the default data config"
                           + (f" except data.max_train_targets_per_user={args.max_train_targets}" if args.max_train_targets else ""),
                 "counts": load_manifest(prepared).get("counts")},
        "vectors": {"path": str(vectors), "model": vectors_manifest.get("model"), "dim": vectors_manifest.get("dim"),
                    "source": "given --vectors" if args.vectors else "MiniLM fallback (lsvcr.vectors.write_minilm_vectors)"},
        "task": args.task,
        "space": str(Path(args.space).relative_to(ROOT) if Path(args.space).is_relative_to(ROOT) else args.space),
        "sweep": {"trials": len(summary.rows), "scheduler": config.tune.scheduler, "epochs_per_trial": args.sweep_epochs,
                  "grace_period": args.grace_period, "max_concurrent": config.tune.max_concurrent,
                  "status_counts": {status: statuses.count(status) for status in sorted(set(statuses))},
                  "best_trial": summary.best_trial_id, "best_valid_ndcg@5": summary.best_objective,
                  "best_params": {key: best_row[key] for key in searched},
                  "default_params": {key: _get(config, key) for key in searched},
                  "trials": summary.rows},
        "final_training": {"max_epochs": args.final_epochs, "patience": config.finetune.patience, **finals},
        "test_ndcg@5": {"default": default_ndcg, "best": best_ndcg, "absolute_gain": best_ndcg - default_ndcg,
                        "relative_gain": (best_ndcg - default_ndcg) / default_ndcg if default_ndcg else None},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                    "load_average_1m_at_end": os.getloadavg()[0]},
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_tune.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k not in ("out", "work")),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"test ndcg@5 ({args.task}): default {default_ndcg:.4f} -> best of {len(summary.rows)} trials {best_ndcg:.4f} "
          f"({result['test_ndcg@5']['relative_gain']:+.1%}); sweep {timings['sweep_seconds']:.0f} s; wrote {args.out}")
    return 0


def _get(config: LSVCRConfig, key: str):
    section, field = key.split(".")
    return getattr(getattr(config, section), field)


if __name__ == "__main__":
    raise SystemExit(main())
