"""Stage-2 `id+text` training-step throughput on the demo data, with and without L_IT, optional profile.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_step.py [--task video|comment] [--steps 6] [--profile]
        [--set finetune.contrast_negatives_shared_by=1 ...]

Data: `lsvcr synth --preset demo` → `lsvcr prepare` (built once under --work). Text tables are seeded random
576-d vectors (SmolLM2's width): the cost of a step does not depend on their values. Runs the production
objective (`lsvcr.finetune_worker.build_objective`) on the same `--steps` batches of 512 three times: L_IT on
(twice, the first as warm-up) and off. `--profile` prints torch.profiler's top operators with shapes, which is
how the L_IT gather and `bernoulli_` dropout were found (docs/model.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lsvcr.baselines import build_model  # noqa: E402
from lsvcr.batching import epoch_rows, make_batch  # noqa: E402
from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays  # noqa: E402
from lsvcr.config import load_config  # noqa: E402
from lsvcr.finetune_worker import build_objective  # noqa: E402
from synthetic_data import synthetic_prepared  # noqa: E402  (bench/ is on sys.path)

TEXT_DIM = 576


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="video", choices=["video", "comment"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", default=str(Path(__file__).parent / "tmp" / "step"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    config = load_config(None, [f"finetune.task={args.task}", *args.overrides])
    prepared = synthetic_prepared(Path(args.work), "demo")
    tables = load_comment_pools(prepared, config.data.hot_comments)
    train = load_sample_arrays(prepared, args.task, "train", config.finetune.history_length,
                               config.data.max_comments_per_record)
    generator = torch.Generator().manual_seed(0)
    video_text = torch.randn(tables.num_videos + 1, TEXT_DIM, generator=generator)
    comment_text = torch.randn(tables.num_comments + 1, TEXT_DIM, generator=generator)
    video_text[0] = comment_text[0] = 0
    model = build_model(config.model, tables.num_videos, video_text, comment_text,
                        torch.from_numpy(tables.comment_likes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.finetune.lr)
    rng = np.random.default_rng(0)
    batches = epoch_rows(len(train), config.finetune.batch_size, rng)[: args.steps]

    def run(id_text_weight: float) -> float:
        config.finetune.id_text_loss_weight = id_text_weight
        objective = build_objective(config, model)
        started, samples = time.perf_counter(), 0
        for rows in batches:
            loss, _, _ = objective(make_batch(train, tables, rows, rng=rng,
                                              comment_negatives=config.finetune.comment_negatives))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += len(rows)
        return samples / (time.perf_counter() - started)

    run(0.1)  # warm-up
    print(f"{args.task} task, {torch.get_num_threads()} thread(s), {len(batches)} batches of "
          f"{config.finetune.batch_size}: L_IT on {run(0.1):.0f} samples/s, L_IT off {run(0.0):.0f} samples/s "
          f"(contrast_negatives_shared_by={config.finetune.contrast_negatives_shared_by})")
    if args.profile:
        from torch.profiler import profile

        with profile(record_shapes=True) as profiler:
            run(0.1)
        print(profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
