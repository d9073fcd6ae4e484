"""Stage-2 quality on the synthetic demo data: LSVCR vs ID-only vs SASRec vs popularity, several seeds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quality.py [--seeds 2024 2025 2026] [--epochs 12]
        [--vectors VECTORS]   # default: all-MiniLM-L6-v2 text vectors (the no-LLM fallback)

Data: `lsvcr synth --preset demo` → `lsvcr prepare` (built once under --work). Text vectors: every
caption and comment embedded by all-MiniLM-L6-v2 (mean pooling, 384-d) unless --vectors names an
`lsvcr encode` output. No stage-1 alignment: stage 2 from scratch on the frozen text vectors.
Runs per seed (training seed: init, shuffles, sampling; the data set is fixed):
- video task: LSVCR id+text, LSVCR id, SASRec; popularity (training-target counts, no seed);
- comment task: LSVCR id+text and text (both with the like prior), id+text without it (the paper's
  scoring); popularity by like count and by training interactions.
Each trained model runs the production loop (`train_loop_per_worker`, in-process), early-stopped on
valid NDCG@5 (patience --patience, at most --epochs epochs: fewer than METHOD 6.2's 50/5 to fit the
time budget; the logged curves show whether it converged), and its best-validation weights are
tested on the frozen sampled protocol. Results: bench/results/quality_stage2.json (mean, spread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lsvcr.baselines import fit_popularity  # noqa: E402
from lsvcr.config import LSVCRConfig  # noqa: E402
from lsvcr.data.prepared import load_manifest  # noqa: E402
from synthetic_data import synthetic_prepared, train_in_process  # noqa: E402  (bench/ is on sys.path)
from lsvcr.evaluate import evaluate_model  # noqa: E402
from lsvcr.metrics import METRIC_NAMES  # noqa: E402
from lsvcr.vectors import is_vectors_dir, read_vectors_manifest  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quality_stage2.json"

MODELS = {
    "video": {"id+text": {"mode": "id+text"}, "id": {"mode": "id"}, "sasrec": {"architecture": "sasrec"}},
    "comment": {"id+text": {"mode": "id+text"}, "text": {"mode": "text"},
                # the paper's comment scoring exactly (model.comment_like_prior=false)
                "id+text-no-like-prior": {"mode": "id+text", "comment_like_prior": False}},
}


def demo_data(work: Path) -> Path:
    return synthetic_prepared(work, "demo", "parquet")


def minilm_vectors(prepared: Path, work: Path) -> Path:
    from lsvcr.vectors import write_minilm_vectors

    vectors = work / "vectors_minilm"
    if not is_vectors_dir(vectors):
        write_minilm_vectors(prepared, vectors)
    return vectors


def make_config(task: str, model: dict, seed: int, epochs: int, patience: int) -> LSVCRConfig:
    config = LSVCRConfig()
    config.finetune.task = task
    config.finetune.seed = seed
    config.finetune.max_epochs = epochs
    config.finetune.patience = patience
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def train_and_test(task: str, name: str, model: dict, seed: int, args, data: Path, vectors: Path, work: Path) -> dict:
    config = make_config(task, model, seed, args.epochs, args.patience)
    started = time.perf_counter()
    trained, state = train_in_process(config, data, vectors, work / "logs" / f"{task}-{name}-{seed}.jsonl", seed)
    metrics = evaluate_model(trained, task, data, config, progress=False)
    return {"task": task, "model": name, "seed": seed, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
            "valid": metrics["valid"], "test": metrics["test"], "seconds": time.perf_counter() - started,
            "curve_valid_ndcg@5": [row["valid_ndcg@5"] for row in state["history"]]}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for name in ("ndcg@5", "ndcg@10", "recall@1", "recall@10", "mrr@10"):
        values = [run["test"][name] for run in runs]
        out[name] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                     "min": min(values), "max": max(values), "values": values}
    out["seeds"] = [run.get("seed") for run in runs]
    return out


def merge(paths: list[str], out: Path) -> int:
    """Combine result files of runs split across processes (by task, model or seed) into one file:
    runs are pooled and every trained model's summary is recomputed over all its seeds."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    merged = dict(next((p for p in parts if not p.get("partial")), parts[0]))
    merged["runs"] = [run for part in parts for run in part["runs"]]
    table: dict[str, dict] = {}
    for part in parts:  # popularity rows (not seeded) come from the tables
        for task, models in part["table"].items():
            for name, values in models.items():
                if name.startswith("popularity"):
                    table.setdefault(task, {})[name] = values
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in merged["runs"]:
        groups.setdefault((run["task"], run["model"]), []).append(run)
    for (task, name), runs in groups.items():
        table.setdefault(task, {})[name] = summarise(sorted(runs, key=lambda run: run["seed"]))
    merged["table"] = table
    merged["settings"] = dict(merged.get("settings", {}), seeds=sorted({run["seed"] for run in merged["runs"]}))
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"merged {len(parts)} result files into {out}")
    for task, models in table.items():
        for name, values in models.items():
            ndcg = values["ndcg@5"]
            print(f"{task:7s} {name:20s} NDCG@5 {ndcg['mean']:.4f} ± {ndcg['std']:.4f} (n={len(ndcg['values'])})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025, 2026])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["video", "comment"], choices=["video", "comment"])
    parser.add_argument("--models", nargs="+", default=None, help="subset of the trained models (e.g. id+text sasrec)")
    parser.add_argument("--skip-popularity", action="store_true", help="for runs split across processes")
    parser.add_argument("--vectors", default=None, help="VECTORS dir from `lsvcr encode` (default: MiniLM fallback)")
    parser.add_argument("--work", default=str(HERE / "tmp" / "quality"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only merge result files of runs split by --tasks into --out")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = demo_data(work)
    vectors = Path(args.vectors) if args.vectors else minilm_vectors(data, work)
    vector_manifest = read_vectors_manifest(vectors)
    config = LSVCRConfig()

    runs: list[dict] = []
    table: dict[str, dict] = {}
    for task in args.tasks:
        table[task] = {}
        if not args.skip_popularity:
            signals = {"popularity": "likes"} if task == "video" else {
                "popularity-by-likes": "likes", "popularity-by-train-interactions": "train_interactions"}
            for popularity_name, signal in signals.items():
                popularity = evaluate_model(fit_popularity(data, signal), task, data, config, progress=False)
                table[task][popularity_name] = summarise([{"test": popularity["test"], "seed": None}])
                print(f"{task:7s} {popularity_name:32s} test ndcg@5 {popularity['test']['ndcg@5']:.4f}", flush=True)
        for name, model in MODELS[task].items():
            if args.models and name not in args.models:
                continue
            model_runs = []
            for seed in args.seeds:
                run = train_and_test(task, name, model, seed, args, data, vectors, work)
                model_runs.append(run)
                print(f"{task:7s} {name:20s} seed {seed}: test ndcg@5 {run['test']['ndcg@5']:.4f} "
                      f"(best epoch {run['best_epoch']}/{run['epochs_run']}, {run['seconds']:.0f} s)", flush=True)
            runs += model_runs
            table[task][name] = summarise(model_runs)
            Path(args.out).write_text(json.dumps({"partial": True, "table": table, "runs": runs}, indent=2) + "\n")

    manifest = load_manifest(data)
    result = {
        "benchmark": "stage-2 quality on the synthetic demo data set (test split, sampled protocol)",
        "data": {"source": "lsvcr synth --preset demo -> lsvcr prepare", "counts": manifest["counts"]},
        "text_vectors": {"model": vector_manifest.get("model"), "dim": vector_manifest.get("dim"),
                         "note": "all-MiniLM-L6-v2 fallback (no LLM, no stage-1 alignment)"
                         if not args.vectors else "lsvcr encode output"},
        "protocol": {
            "video": "test = each user's last liked video among 100 frozen candidates (1 + 99 uniform); ties pessimistic",
            "comment": "test = the user's interacted comments among the current video's pool (<=100), multi-positive",
        },
        "settings": {"seeds": args.seeds, "max_epochs": args.epochs, "patience": args.patience,
                     "selection": "best valid ndcg@5", "other": "METHOD 6.2 defaults (lr 1e-3, batch 512, "
                     "history 50, dropout 0.3, lambda_it 0.1, tau 0.07)"},
        "metric_names": list(METRIC_NAMES),
        "table": table,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for task, models in table.items():
        for name, values in models.items():
            ndcg = values["ndcg@5"]
            print(f"{task:7s} {name:20s} NDCG@5 {ndcg['mean']:.4f} ± {ndcg['std']:.4f} "
                  f"(min {ndcg['min']:.4f}, max {ndcg['max']:.4f}, n={len(ndcg['values'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
