"""A training step's speed and peak memory under each memory allocator (`finetune.allocator`), interleaved.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_allocator.py [--rounds 3] [--task video]

Runs bench/bench_step.py (stage-2 steps of 512 on the demo data, the production objective) in a fresh process per
set-up, the set-ups interleaved `--rounds` times so the host's drift falls on all alike: `system` (glibc),
`mimalloc` as `lsvcr.runtime.allocator_environment` sets it for Ray Train workers (purging off), and
`mimalloc_purge10ms` (mimalloc's own default, freed pages returned to the OS after 10 ms: why purging is off).
Per run: the child's peak RSS (`wait4`'s ru_maxrss) and its samples/s with and without L_IT. Writes
bench/results/allocator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lsvcr.runtime import allocator_environment  # noqa: E402

SPEED = re.compile(r"L_IT on (\d+) samples/s, L_IT off (\d+) samples/s")


def setups() -> dict[str, dict[str, str]]:
    mimalloc = allocator_environment("mimalloc")
    return {"system": {}, "mimalloc": mimalloc, "mimalloc_purge10ms": {**mimalloc, "MIMALLOC_PURGE_DELAY": "10"}}


def run_once(environment: dict[str, str], task: str, work: Path) -> dict:
    inherited = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY")}
    env = {**inherited, "OMP_NUM_THREADS": "1", **environment}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(HERE / "bench_step.py"), "--task", task, "--work", str(work)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"bench_step.py failed under {environment}:\n{output[-2000:]}")
    speed = SPEED.search(output)
    if speed is None:
        raise SystemExit(f"no speed line in bench_step.py's output:\n{output[-2000:]}")
    return {"peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 3), "samples_per_s_with_l_it": int(speed[1]),
            "samples_per_s_without_l_it": int(speed[2]), "wall_s": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task", default="video", choices=["video", "comment"])
    parser.add_argument("--work", type=Path, default=HERE / "tmp" / "step")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "allocator.json")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {}
    loads = [round(os.getloadavg()[0], 2)]
    for round_index in range(args.rounds):
        for name, environment in setups().items():
            result = run_once(environment, args.task, args.work)
            runs.setdefault(name, []).append(result)
            print(f"round {round_index}, {name}: {result}", flush=True)
        loads.append(round(os.getloadavg()[0], 2))
    summary = {name: {key: {"mean": round(statistics.mean(r[key] for r in results), 3),
                            "std": round(statistics.pstdev(r[key] for r in results), 3)}
                      for key in ("peak_rss_gb", "samples_per_s_with_l_it", "samples_per_s_without_l_it")}
               for name, results in runs.items()}
    report = {"command": " ".join(["python"] + sys.argv), "task": args.task, "rounds": args.rounds,
              "environments": setups(), "load_average_1min_per_round": loads, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
