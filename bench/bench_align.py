"""End-to-end time of `lsvcr encode` + `lsvcr align` in both modes on one PREPARED directory.

    python bench/bench_align.py --data PREPARED [--work DIR] [--user-samples 120] [--lora-steps 4]
        [--lora-batch 4] [--set section.key=value ...]

Runs encode (items + a seeded subset of user prompts), align --mode frozen (one epoch over the
encoded users), align --mode lora (a few steps, gradient checkpointing, then merge + vLLM re-encode
of every item), each resuming/skipping when re-run with the same --work; writes the seconds, the
encode throughput and the final losses to bench/results/align.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="PREPARED directory (e.g. of `lsvcr synth --preset demo`)")
    parser.add_argument("--work", default="runs/bench_align")
    parser.add_argument("--user-samples", type=int, default=120)
    parser.add_argument("--lora-steps", type=int, default=4)
    parser.add_argument("--lora-batch", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "align.json"))
    args = parser.parse_args()

    import ray

    from lsvcr.config import load_config
    from lsvcr.llm.align import run_align
    from lsvcr.llm.encode import run_encode

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = Path(args.work)
    base = [f"encode.max_user_samples={args.user_samples}", "encode.max_prompt_tokens=256", "encode.batch_size=32",
            "align.log_every=1", *args.overrides]
    config = load_config(None, base)
    lora_config = load_config(None, base + [f"align.max_steps={args.lora_steps}", f"align.batch_size={args.lora_batch}",
                                            "align.checkpoint_every=2", "align.history_length=10",
                                            "align.gradient_checkpointing=true"])
    results: dict = {"data": str(args.data), "overrides": base}
    started = time.perf_counter()
    manifest = run_encode(config, args.data, work / "vectors", "all")
    results["encode"] = {"seconds": round(time.perf_counter() - started, 1), "counts": manifest["counts"],
                         "throughput": manifest["throughput"]}
    for mode, mode_config in (("frozen", config), ("lora", lora_config)):
        started = time.perf_counter()
        summary = run_align(mode_config, args.data, work / "vectors", work / f"aligned_{mode}", mode)
        results[f"align_{mode}"] = {"seconds": round(time.perf_counter() - started, 1), **summary}
        print(mode, json.dumps(results[f"align_{mode}"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
