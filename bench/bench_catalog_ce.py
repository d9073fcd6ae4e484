"""The video task's CE over all videos, one pass vs in chunks of rows (`finetune.max_logits_mb`), side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_catalog_ce.py [--videos 2000 20000 82452] [--repeats 7]

For each catalog size: an `id+text` LSVCRModel of the paper's stage-2 size (hidden 64) with 64-d text vectors
(the scale runs' hashed encoder), 512 user vectors, and `video_cross_entropy` forward + backward with
`max_logits_mb` 0 (one pass) and 64 (the default: chunks whose gradients are taken with their loss),
interleaved `--repeats` times. Reports the median seconds of each and what autograd keeps for the backward pass
(saved-tensor hooks). Writes bench/results/catalog_ce.json.
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

from lsvcr.config import ModelConfig  # noqa: E402
from lsvcr.model import LSVCRModel  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCH, TEXT_DIM = 512, 64


def one_step(model: LSVCRModel, user: torch.Tensor, targets: torch.Tensor, max_logits_mb: float) -> tuple[float, int]:
    """Seconds of forward + backward, and bytes autograd kept for the backward pass."""
    kept: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad(set_to_none=True)
    user.grad = None
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.video_cross_entropy(user, targets, max_logits_mb)
    loss.backward()
    return time.perf_counter() - start, sum(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, nargs="+", default=[2000, 20000, 82452])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(HERE / "results" / "catalog_ce.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(0)
    rows = []
    for videos in args.videos:
        video_text = torch.randn(videos + 1, TEXT_DIM)
        video_text[0] = 0
        model = LSVCRModel(ModelConfig(comment_like_prior=False), videos, video_text,
                           torch.zeros(1, TEXT_DIM), torch.zeros(1)).train()
        user = torch.randn(BATCH, model.config.hidden_size, requires_grad=True)
        targets = torch.randint(1, videos + 1, (BATCH,))
        settings = (0.0, 64.0)
        seconds: dict[float, list[float]] = {setting: [] for setting in settings}
        kept: dict[float, int] = {}
        one_step(model, user, targets, 0.0)  # warm-up
        for _ in range(args.repeats):
            for setting in settings:
                elapsed, kept[setting] = one_step(model, user, targets, setting)
                seconds[setting].append(elapsed)
        row = {"videos": videos, "batch": BATCH, "logits_mb": round(BATCH * (videos + 1) * 4 / 2**20, 1)}
        for setting in settings:
            row[f"max_logits_mb={setting:g}"] = {"median_s": round(statistics.median(seconds[setting]), 4),
                                                 "kept_for_backward_mb": round(kept[setting] / 2**20, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"command": "python bench/bench_catalog_ce.py " + " ".join(f"--videos {v}" for v in args.videos),
              "threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
