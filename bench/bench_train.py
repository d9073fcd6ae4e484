"""Stage-2 training throughput: LSVCR `id` mode vs plain SASRec, one worker, ONE thread (target ≥ 1,000 samples/s).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train.py [--rounds 2] [--work bench/tmp/train]

Data: `lsvcr synth --preset bench --format recbole` (a video-only RecBole export, ~100k liked-video
interactions, 20k videos) → `lsvcr prepare`; built once under --work and reused.
Models (side by side in this one process, alternating so machine-load changes hit both alike):
- LSVCR `model.mode=id` (faithful stacking, hidden 64, 2 layers, 2 heads, history 50, mix layers,
  additive pooling, cosine/τ, full softmax over all videos);
- SASRec baseline (standard stacking, last position, dot product, full softmax).
Both run the production loop `lsvcr.finetune_worker.train_loop_per_worker` in-process (`report_to="local"`:
no Ray, so the number is the loop itself), batch 512, default length bucketing. One epoch per round;
samples/s = train samples / training seconds of that epoch (validation excluded and reported apart).
CPU seconds are reported too: on a shared machine wall time overstates the cost.
Results: bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lsvcr.config import LSVCRConfig  # noqa: E402
from lsvcr.data.prepared import load_manifest  # noqa: E402
from synthetic_data import synthetic_prepared  # noqa: E402  (bench/ is on sys.path)
from lsvcr.finetune import make_loop_config  # noqa: E402
from lsvcr.finetune_worker import train_loop_per_worker  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train.json"


def video_only_data(work: Path) -> Path:
    return synthetic_prepared(work, "bench", "recbole")


def config_for(name: str, epochs: int) -> LSVCRConfig:
    config = LSVCRConfig()
    config.finetune.task = "video"
    config.finetune.max_epochs = epochs
    config.finetune.threads_per_worker = 1
    if name == "sasrec":
        config.model.architecture = "sasrec"
    else:
        config.model.mode = "id"
    return config


def one_epoch(name: str, data: Path, work: Path) -> dict:
    log_path = work / f"{name}.jsonl"
    log_path.unlink(missing_ok=True)
    state = train_loop_per_worker(make_loop_config(config_for(name, 1), data, None, log_path=log_path,
                                                   report_to="local"))
    return state["history"][0]


def quick_steps(args) -> int:
    """CPU seconds per training sample over `args.steps` steps of the production step, both models."""
    import numpy as np

    from lsvcr.baselines import build_model
    from lsvcr.batching import epoch_rows, history_lengths, make_batch
    from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays
    from lsvcr.finetune_worker import build_objective

    torch.set_num_threads(1)
    data = video_only_data(Path(args.work))
    tables = load_comment_pools(data)
    train = load_sample_arrays(data, "video", "train", 50)
    batches = epoch_rows(len(train), 512, np.random.default_rng(0), lengths=history_lengths(train))[: args.steps]
    result = {}
    for name in ("lsvcr-id", "sasrec"):
        config = config_for(name, 1)
        torch.manual_seed(0)
        objective = build_objective(config, build_model(config.model, tables.num_videos, None, None))
        optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3, weight_decay=1e-5)
        rng = np.random.default_rng(1)
        started, samples = time.process_time(), 0
        for rows in batches:
            loss, _, _ = objective(make_batch(train, tables, rows, rng=rng))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += len(rows)
        cpu = time.process_time() - started
        result[name] = {"steps": len(batches), "samples": samples, "cpu_seconds": cpu, "samples_per_cpu_second": samples / cpu}
        print(f"{name:9s}: {samples / cpu:8.0f} samples per CPU second over {len(batches)} steps", flush=True)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report["quick_steps"] = {"note": "same batches for both models; training steps only, CPU seconds", **result,
                             "load_average_1m_after": os.getloadavg()[0]}
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=str(HERE / "tmp" / "train"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--steps", type=int, default=0,
                        help="instead of full epochs: time this many training steps of the same components "
                             "(bucketed batches, objective, AdamW) per model, in CPU seconds (a quick check)")
    args = parser.parse_args()
    if args.steps:
        return quick_steps(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = video_only_data(work)
    manifest = load_manifest(data)
    torch.set_num_threads(1)

    rows: dict[str, list[dict]] = {"lsvcr-id": [], "sasrec": []}
    for round_index in range(args.rounds):
        for name in rows:
            row = one_epoch(name, data, work)
            rows[name].append(row)
            print(f"round {round_index + 1} {name:9s}: {row['samples_per_second']:8.0f} samples/s wall, "
                  f"{row['train_seconds']:.1f} s/epoch wall, {row['train_cpu_seconds']:.1f} s CPU, "
                  f"load avg {os.getloadavg()[0]:.1f}", flush=True)

    train_samples = manifest["counts"]["video_samples"]["train"]
    summary = {}
    for name, runs in rows.items():
        cpu = statistics.median(r["train_cpu_seconds"] for r in runs)
        summary[name] = {
            "samples_per_second_wall_median": statistics.median(r["samples_per_second"] for r in runs),
            "seconds_per_epoch_wall_median": statistics.median(r["train_seconds"] for r in runs),
            "cpu_seconds_per_epoch_median": cpu,
            "samples_per_cpu_second": train_samples / cpu,
            "validation_seconds_median": statistics.median(r["seconds"] - r["train_seconds"] for r in runs),
            "valid_ndcg@5_after_1_epoch": [r["valid_ndcg@5"] for r in runs],
            "meets_target_wall": statistics.median(r["samples_per_second"] for r in runs) >= 1000,
            "meets_target_cpu": train_samples / cpu >= 1000,
        }
    result = {
        "benchmark": "stage-2 training throughput, one worker, one thread (lsvcr.finetune_worker.train_loop_per_worker)",
        "data": {"source": "lsvcr synth --preset bench --format recbole -> lsvcr prepare (video-only)",
                 "interactions": manifest["counts"]["interactions"], "videos": manifest["counts"]["videos"],
                 "train_samples": train_samples},
        "settings": {"hidden": 64, "layers": 2, "heads": 2, "history_length": 50, "batch_size": 512,
                     "length_bucketing": True, "softmax": "full over all videos", "threads": 1},
        "target_samples_per_second": 1000,
        "results": summary,
        "rounds": rows,
        "load_average_1m_after": os.getloadavg()[0], "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, values in summary.items():
        print(f"{name:9s}: {values['samples_per_second_wall_median']:8.0f} samples/s wall, "
              f"{values['samples_per_cpu_second']:8.0f} samples per CPU second (target 1000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
