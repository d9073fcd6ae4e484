"""Throughput of `lsvcr synth` and `lsvcr prepare` on a ~1M-interaction synthetic KuaiComt set.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_prepare.py [--preset bench] [--repeats 3] [--format parquet]

1. `synth --preset bench` (about 1M user_video_inter rows, 20k videos, 200k comments) into a temporary
   directory, timed;
2. `prepare` of it `--repeats` times (each a full run: read, validate, build samples and candidates, write
   Parquet), timed in wall-clock and CPU seconds; rows/s = raw interaction rows (user_video_inter +
   user_comment_inter) / seconds.
Results: bench/results/prepare.json, plus one summary line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from lsvcr.config import PrepareConfig  # noqa: E402
from lsvcr.data.prepare import prepare  # noqa: E402
from lsvcr.data.synth import PRESETS  # noqa: E402
from lsvcr.data.synth_files import write_synthetic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prepare.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", default="parquet", choices=("parquet", "csv"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lsvcr-bench-prepare-") as work:
        raw_dir, prepared_dir = Path(work) / "raw", Path(work) / "prepared"
        started = time.perf_counter()
        raw_counts = write_synthetic(raw_dir, PRESETS[args.preset], args.format)
        synth_seconds = time.perf_counter() - started

        interaction_rows = raw_counts["user_video_inter"] + raw_counts["user_comment_inter"]
        prepare_seconds, prepare_cpu_seconds = [], []
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            manifest = prepare(raw_dir, prepared_dir, PrepareConfig(), force=True)
            prepare_seconds.append(time.perf_counter() - started)
            prepare_cpu_seconds.append(time.process_time() - started_cpu)
        output_bytes = sum(p.stat().st_size for p in prepared_dir.iterdir())

    best, median = min(prepare_seconds), statistics.median(prepare_seconds)
    result = {
        "benchmark": "prepare",
        "preset": args.preset,
        "raw_format": args.format,
        "raw_counts": raw_counts,
        "interaction_rows": interaction_rows,
        "synth_seconds": round(synth_seconds, 3),
        "synth_rows_per_s": round(sum(raw_counts.values()) / synth_seconds),
        "prepare_seconds": [round(s, 3) for s in prepare_seconds],
        "prepare_rows_per_s_median": round(interaction_rows / median),
        "prepare_rows_per_s_best": round(interaction_rows / best),
        # CPU seconds of this process: less sensitive to other jobs on a shared machine than wall time.
        "prepare_cpu_seconds": [round(s, 3) for s in prepare_cpu_seconds],
        "prepare_rows_per_cpu_s_median": round(interaction_rows / statistics.median(prepare_cpu_seconds)),
        "samples": {task: manifest["counts"][f"{task}_samples"] for task in ("video", "comment")},
        "prepared_bytes": output_bytes,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "note": "shared 2-core machine: other jobs may run at the same time; the median is the headline",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"prepare: {interaction_rows:,} interaction rows in {median:.2f} s (median of {args.repeats}) = "
          f"{result['prepare_rows_per_s_median']:,} rows/s "
          f"({result['prepare_rows_per_cpu_s_median']:,} rows per CPU-second); synth {synth_seconds:.1f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
