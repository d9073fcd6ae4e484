"""Stage-1 losses (METHOD 5.2): the all-gathered InfoNCE on a real 2-worker Ray Train / gloo group
equals the single-process value on the same global batch, gradients included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lsvcr.llm.alignment_losses import alignment_losses, info_nce, symmetric_info_nce, video_comment_contrast

GLOBAL_BATCH, DIM, TEMPERATURE = 8, 16, 0.07


def global_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, DIM, generator=generator), torch.randn(GLOBAL_BATCH, DIM, generator=generator)


def single_process() -> dict:
    anchors, targets = global_inputs()
    anchors.requires_grad_(True)
    targets.requires_grad_(True)
    loss = info_nce(anchors, targets, TEMPERATURE)
    symmetric = symmetric_info_nce(anchors.detach(), targets.detach(), TEMPERATURE)
    loss.backward()
    return {"loss": loss.item(), "symmetric": symmetric.item(), "anchor_grad": anchors.grad.tolist(),
            "target_grad": targets.grad.tolist()}


def worker(loop_config: dict) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    world_size = ray.train.get_context().get_world_size()
    anchors, targets = global_inputs()
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    local_anchors = anchors[local].clone().requires_grad_(True)
    local_targets = targets[local].clone().requires_grad_(True)
    loss = info_nce(local_anchors, local_targets, TEMPERATURE)
    symmetric = symmetric_info_nce(local_anchors.detach(), local_targets.detach(), TEMPERATURE)
    loss.backward()
    result = {"loss": loss.item(), "symmetric": symmetric.item(), "anchor_grad": local_anchors.grad.tolist(),
              "target_grad": local_targets.grad.tolist()}
    Path(loop_config["out"], f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_gathered_info_nce_equals_single_process(ray_cluster, tmp_path):
    import sys

    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    TorchTrainer(
        worker, train_loop_config={"out": str(tmp_path)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="gather"),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    reference = single_process()
    # The global loss is the mean of the ranks' losses (each a mean over its local anchors).
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(reference["loss"], rel=1e-5)
    assert sum(r["symmetric"] for r in ranks) / 2 == pytest.approx(reference["symmetric"], rel=1e-5)
    # DDP averages gradients over ranks: rank k's gradient / world size = the single-process gradient
    # of its rows, including what other ranks' losses sent back through the all_gather.
    for key in ("anchor_grad", "target_grad"):
        distributed = torch.tensor(ranks[0][key] + ranks[1][key]) / 2
        torch.testing.assert_close(distributed, torch.tensor(reference[key]), rtol=1e-4, atol=1e-6)


def test_info_nce_prefers_matching_pairs():
    anchors, _ = global_inputs()
    assert info_nce(anchors, anchors, TEMPERATURE) < info_nce(anchors, anchors.roll(1, dims=0), TEMPERATURE)


def test_video_comment_contrast_and_total_weights():
    z, p = global_inputs()
    n = -p
    assert video_comment_contrast(z, z, n, TEMPERATURE) < video_comment_contrast(z, n, z, TEMPERATURE)
    losses = alignment_losses(sr_preference=p, other_branch=n, llm_preference=z, target_text=z,
                              temperature=TEMPERATURE, lm_loss=torch.tensor(2.0))
    expected = 2.0 + 1.0 * losses.rec + 0.5 * (losses.vcc + losses.ssc)
    assert losses.total.item() == pytest.approx(expected.item())
