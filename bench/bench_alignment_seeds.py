"""Alignment vs no alignment over several training seeds, on the outputs of a finished pipeline run.

    .venv/bin/python bench/bench_alignment_seeds.py [--config configs/demo.yaml] [--seeds 2024 2025 2026]
        [--tasks video comment] [--work runs/bench_alignment_seeds] [--aligned lora=ALIGNED_DIR ...]
        [--scratch NAME=VECTORS ...] [--variants NAME ...]

The pipeline (`lsvcr demo`) trains each task once from the stage-1 checkpoint and once from scratch on the
raw LLM vectors, with one seed: a single difference may be noise. This re-runs exactly those two stage-2
fine-tunings (same config, same PREPARED, VECTORS and ALIGNED of `paths.storage`) for every seed and
reports test NDCG@5 / Recall@5 per seed and their mean and spread, beside both popularity rows of the
pipeline report. On the comment task it also trains "aligned + like prior" (the documented extension beyond
the paper, `model.comment_like_prior`), and it checks the comment bar on every seed: the paper's comment model
must beat popularity by training interactions. Runs already finished under --work, and
the pipeline's own runs for its seed (`finetune.seed`), are reused. `--aligned NAME=DIR` adds another
stage-1 output (e.g. of `lsvcr align --mode lora`) as a variant trained like the pipeline's aligned one.
Besides the test metrics it records each variant's mean valid NDCG@5 per epoch: whether a stage-1 start
helps early in stage 2, and whether that lasts. Writes bench/results/alignment_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("ndcg@5", "recall@5", "ndcg@10", "mrr@10")


def _summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "values": [round(value, 4) for value in values]}


def _same_training(model_dir: Path, run_config) -> bool:
    """Whether a finished MODEL dir was trained as `run_config` would train it (the model and the stage-2
    settings; the thread count aside), so that its figures can stand for this run's."""
    from dataclasses import asdict

    from lsvcr.config import load_config

    saved = load_config(model_dir / "config.yaml")

    def training(config) -> dict:
        return {"model": asdict(config.model), "finetune": {key: value for key, value in asdict(config.finetune).items()
                                                             if key not in ("threads_per_worker", "num_workers")}}
    return training(saved) == training(run_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025, 2026])
    parser.add_argument("--tasks", nargs="+", default=["video", "comment"], choices=["video", "comment"])
    parser.add_argument("--work", default="runs/bench_alignment_seeds")
    parser.add_argument("--threads", type=int, default=None,
                        help="finetune.threads_per_worker (default: the config's); 1 leaves a core to another job")
    parser.add_argument("--aligned", nargs="*", default=[], metavar="NAME=DIR",
                        help="more ALIGNED outputs to compare (checkpoint.pt + vectors/)")
    parser.add_argument("--scratch", nargs="*", default=[], metavar="NAME=VECTORS",
                        help="variants trained from scratch (no --init) on other VECTORS, e.g. an ALIGNED/vectors: "
                             "separates what the stage-1 vectors do from what the stage-1 weights do")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for the CLI (e.g. paths.storage=runs/demo_s2024)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="train only these variants (e.g. `lora lora_like_prior` beside a table whose other "
                             "rows exist); default: all of them. The popularity rows are always computed")
    parser.add_argument("--out", default=str(HERE / "results" / "alignment_seeds.json"))
    args = parser.parse_args()

    from lsvcr import model_files, storage
    from lsvcr.config import load_config
    from lsvcr.evaluate import popularity_metrics
    from lsvcr.finetune import run_finetune
    from lsvcr.pipeline import StageLayout
    from lsvcr.vectors import is_vectors_dir

    overrides = [f"finetune.threads_per_worker={args.threads}"] if args.threads else []
    overrides += args.overrides
    config = load_config(args.config, overrides)
    layout = StageLayout(config.paths.storage)
    if not storage.is_finished(layout.aligned) or not storage.is_finished(layout.vectors):
        raise SystemExit(f"no finished pipeline under {config.paths.storage}: run `lsvcr demo --config {args.config}`")
    aligned = storage.pull(layout.aligned)
    work = Path(args.work)
    variants = {
        "no_alignment": {"vectors": layout.vectors, "init": None},
        "aligned": {"vectors": storage.join(layout.aligned, "vectors"), "init": aligned / "checkpoint.pt"},
    }
    for item in args.aligned:
        name, _, directory = item.partition("=")
        if not (Path(directory) / "checkpoint.pt").is_file():
            raise SystemExit(f"--aligned {item}: no checkpoint.pt in {directory}")
        variants[name] = {"vectors": str(Path(directory) / "vectors"), "init": Path(directory) / "checkpoint.pt"}
    for item in args.scratch:
        name, _, directory = item.partition("=")
        if not is_vectors_dir(directory):
            raise SystemExit(f"--scratch {item}: no manifest.json in {directory} (not a VECTORS output)")
        variants[name] = {"vectors": directory, "init": None}
    for name, inputs in list(variants.items()):
        if inputs["init"] is not None:  # every stage-1 start also gets the like-prior row on the comment task
            variants[f"{name}_like_prior"] = {**inputs, "like_prior": True}
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(variants)}")
        variants = {name: inputs for name, inputs in variants.items() if name in args.variants}
    results: dict = {"config": args.config, "storage": config.paths.storage, "seeds": args.seeds, "runs": {},
                     "threads": config.finetune.threads_per_worker, "max_epochs": config.finetune.max_epochs,
                     "patience": config.finetune.patience, "load_average_start": os.getloadavg()[0]}
    started = time.perf_counter()
    for task in args.tasks:
        pipeline_model = {"aligned": layout.model(task), "no_alignment": layout.model(task, aligned=False),
                          "aligned_like_prior": layout.like_prior_model()}
        task_config = load_config(args.config, [f"finetune.task={task}", *overrides])
        if task_config.model.comment_like_prior:
            raise SystemExit("model.comment_like_prior is on: the rows here must be the paper's comment scoring")
        popularity = {"video": {"popularity": "train_interactions"},
                      "comment": {"popularity_train_interactions": "train_interactions",
                                  "popularity_likes": "likes"}}[task]
        for name, signal in popularity.items():
            metrics = popularity_metrics(storage.pull(layout.prepared), task, task_config, comment_signal=signal)
            results["runs"][f"{task}/{name}"] = {metric: {"mean": round(metrics["test"][metric], 4), "std": 0.0}
                                                 for metric in METRICS}
        for variant, inputs in variants.items():
            like_prior = inputs.get("like_prior", False)
            if like_prior and task != "comment":
                continue
            rows = []
            for seed in args.seeds:
                out = work / f"{task}-{variant}-{seed}"
                run_config = load_config(args.config, [f"finetune.task={task}", f"finetune.seed={seed}",
                                                          f"model.comment_like_prior={str(like_prior).lower()}",
                                                          *overrides])
                if (seed == config.finetune.seed and variant in pipeline_model
                        and storage.is_finished(pipeline_model[variant])
                        and _same_training(storage.pull(pipeline_model[variant]), run_config)):
                    out = storage.pull(pipeline_model[variant])  # the pipeline's own run: same config and seed
                if not (out / model_files.METRICS).is_file():
                    run_finetune(run_config, layout.prepared, inputs["vectors"], out, init=inputs["init"])
                metrics = model_files.read_metrics(out)
                log_lines = (out / model_files.TRAIN_LOG).read_text().splitlines()
                curve = [json.loads(line)["valid_ndcg@5"] for line in log_lines]
                rows.append({"seed": seed, "best_epoch": metrics.get("best_epoch"), "valid_ndcg@5_by_epoch": curve,
                             **{name: metrics["test"][name] for name in METRICS},
                             # the personalization check: the same test samples scored with another user's history
                             "swapped_history_ndcg@5": metrics.get("swapped_history", {}).get("test", {}).get("ndcg@5")})
                print(f"{task} {variant} seed {seed}: test ndcg@5 {metrics['test']['ndcg@5']:.4f}", flush=True)
            epochs = min(len(row["valid_ndcg@5_by_epoch"]) for row in rows)
            results["runs"][f"{task}/{variant}"] = {
                "per_seed": rows, **{name: _summary([row[name] for row in rows]) for name in METRICS},
                # How fast each variant learns: does the stage-1 start help early, and does it last?
                "mean_valid_ndcg@5_by_epoch": [
                    round(statistics.fmean(row["valid_ndcg@5_by_epoch"][epoch] for row in rows), 4)
                    for epoch in range(epochs)],
            }
            protocol = metrics.get("protocol")
        results[f"{task}_protocol"] = protocol
        if task == "comment":  # the bar (#14): the paper's comment model beats popularity by interactions, every seed
            bar = results["runs"]["comment/popularity_train_interactions"]["ndcg@5"]["mean"]
            results["comment_bar"] = {
                variant: all(row["ndcg@5"] > bar for row in results["runs"][f"comment/{variant}"]["per_seed"])
                for variant in variants if not variants[variant].get("like_prior")}
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_average_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'task/variant':<24} " + "  ".join(f"{name:>16}" for name in METRICS))
    for key, run in results["runs"].items():
        print(f"{key:<24} " + "  ".join(f"{run[name]['mean']:.4f} ± {run[name]['std']:.4f}" for name in METRICS))
    if "comment_bar" in results:
        print("comment model beats popularity (train interactions) on every seed: "
              + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in results["comment_bar"].items()))
    print("\nmean valid ndcg@5 by epoch (epochs every seed ran):")
    for key, run in results["runs"].items():
        if "mean_valid_ndcg@5_by_epoch" not in run:
            continue
        print(f"{key:<24} " + " ".join(f"{value:.3f}" for value in run["mean_valid_ndcg@5_by_epoch"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
