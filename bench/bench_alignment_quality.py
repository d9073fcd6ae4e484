"""Stage-2 quality with and without stage-1 alignment: no alignment / frozen / LoRA, both tasks.

    python bench/bench_alignment_quality.py [--preset tiny] [--align-steps 200] [--lora-steps 30]
        [--epochs 20] [--work DIR]

One synthetic data set → `lsvcr encode` (SmolLM2 via vLLM) → `lsvcr align --mode frozen` and
`--mode lora` → `lsvcr finetune` per task from (a) the raw LLM vectors without --init, (b) the frozen
ALIGNED vectors + checkpoint, (c) the LoRA ALIGNED vectors + checkpoint, all with the same stage-2
config and seed. Reports test NDCG@5 and Recall@5 (plus the other metrics) and the stage times.
Every stage resumes/skips when re-run with the same --work. Writes bench/results/alignment_quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="synthetic data preset (tiny, demo)")
    parser.add_argument("--align-steps", type=int, default=200, help="frozen alignment steps (max_steps)")
    parser.add_argument("--lora-steps", type=int, default=30, help="LoRA alignment steps (max_steps)")
    parser.add_argument("--lora-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20, help="stage-2 max epochs (early stopping on NDCG@5)")
    parser.add_argument("--modes", default="none,frozen,lora")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--work", default="runs/bench_alignment")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "alignment_quality.json"))
    args = parser.parse_args()

    import copy

    import ray

    from lsvcr.config import load_config
    from lsvcr.data.prepare import prepare
    from lsvcr.data.prepared import is_prepared
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic
    from lsvcr.finetune import run_finetune
    from lsvcr.llm.align import run_align
    from lsvcr.llm.encode import run_encode

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = Path(args.work)
    config = load_config(None, [f"finetune.max_epochs={args.epochs}", f"align.max_steps={args.align_steps}",
                                "align.batch_size=64", "align.checkpoint_every=50", *args.overrides])
    timings: dict[str, float] = {}

    def timed(name, function):
        started = time.perf_counter()
        result = function()
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {timings[name]} s", flush=True)
        return result

    raw, prepared, vectors = work / "raw", work / "prepared", work / "vectors"
    if not is_prepared(prepared):
        timed("prepare", lambda: (write_synthetic(raw, PRESETS[args.preset], "parquet"), prepare(raw, prepared)))
    timed("encode", lambda: run_encode(config, prepared, vectors, "all"))

    aligned: dict[str, Path | None] = {"none": None}
    modes = args.modes.split(",")
    if "frozen" in modes:
        aligned["frozen"] = work / "aligned_frozen"
        timed("align_frozen", lambda: run_align(config, prepared, vectors, aligned["frozen"], "frozen"))
    if "lora" in modes:
        lora_config = copy.deepcopy(config)
        lora_config.align.max_steps = args.lora_steps
        lora_config.align.batch_size = args.lora_batch
        lora_config.align.checkpoint_every = 10
        aligned["lora"] = work / "aligned_lora"
        timed("align_lora", lambda: run_align(lora_config, prepared, vectors, aligned["lora"], "lora"))

    results: dict = {"preset": args.preset, "align_steps": {"frozen": args.align_steps, "lora": args.lora_steps},
                     "stage2_max_epochs": args.epochs, "metrics": {}}
    for mode in [m for m in ("none", "frozen", "lora") if m in modes]:
        for task in ("video", "comment"):
            task_config = copy.deepcopy(config)
            task_config.finetune.task = task
            source = aligned.get(mode)
            result = timed(f"finetune_{mode}_{task}", lambda: run_finetune(
                task_config, prepared, vectors if source is None else source / "vectors", work / f"model_{mode}_{task}",
                init=None if source is None else source / "checkpoint.pt"))
            test = result.metrics["test"]
            results["metrics"][f"{mode}/{task}"] = {"ndcg@5": test["ndcg@5"], "recall@5": test["recall@5"],
                                                    **{k: v for k, v in test.items() if k not in ("ndcg@5", "recall@5")}}
            print(mode, task, results["metrics"][f"{mode}/{task}"], flush=True)
    results["seconds"] = timings
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
