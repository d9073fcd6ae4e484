"""Stage-1 alignment losses (METHOD 5.2) and the two LLM heads' math, distributed-aware.

All vectors are L2-normalised and divided by τ = 0.07. In-batch negatives are all-gathered across the
Ray Train workers with a gradient-preserving all_gather (`torch.distributed.nn.functional.all_gather`:
its backward sums the gradients of every rank's copy back to the owner), so with DDP's gradient
averaging the result equals one process holding the whole global batch.

    L_VCC  = CE([z·p, z·n] / τ, 0)                       video–comment preference contrast
    L_SSC  = ½ InfoNCE(r → z) + ½ InfoNCE(z → r)          sequential–supplemental contrast (gathered)
    L_rec  = InfoNCE(r → t)                               SR prediction in text space (gathered)
    total  = L_LM + rec_weight · L_rec + contrast_weight · (L_VCC + L_SSC)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(local: Tensor) -> Tensor:
    """Concatenate every rank's `local` [B, D] (same B on every rank) keeping the autograd graph."""
    _, world_size = world()
    if world_size == 1:
        return local
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(local.contiguous()), dim=0)


def info_nce(anchors: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Mean over local anchors of CE(anchor · all gathered targets / τ, own target).

    Local row i of rank k has its positive at global row k·B + i of the gathered targets.
    """
    rank, _ = world()
    anchors = F.normalize(anchors, dim=-1)
    all_targets = F.normalize(gather_with_grad(targets), dim=-1)
    logits = anchors @ all_targets.T / temperature
    labels = torch.arange(anchors.shape[0], device=anchors.device) + rank * anchors.shape[0]
    return F.cross_entropy(logits, labels)


def symmetric_info_nce(left: Tensor, right: Tensor, temperature: float) -> Tensor:
    return 0.5 * (info_nce(left, right, temperature) + info_nce(right, left, temperature))


def video_comment_contrast(llm_preference: Tensor, task_branch: Tensor, other_branch: Tensor,
                           temperature: float) -> Tensor:
    """L_VCC: per row a 2-way softmax that prefers the SR branch matching the row's task."""
    z = F.normalize(llm_preference, dim=-1)
    positive = (z * F.normalize(task_branch, dim=-1)).sum(-1)
    negative = (z * F.normalize(other_branch, dim=-1)).sum(-1)
    logits = torch.stack([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


@dataclass
class AlignmentLosses:
    total: Tensor
    vcc: Tensor
    ssc: Tensor
    rec: Tensor
    lm: Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("total", "vcc", "ssc", "rec", "lm")}


def alignment_losses(*, sr_preference: Tensor, other_branch: Tensor, llm_preference: Tensor, target_text: Tensor,
                     temperature: float, rec_weight: float = 1.0, contrast_weight: float = 0.5,
                     lm_loss: Tensor | None = None) -> AlignmentLosses:
    """The stage-1 objective for one (mixed-task) batch.

    sr_preference r = p [B, H]: F_v(H^v) for video rows, F_c(H^c; q) for comment rows;
    other_branch n [B, H]: F_v(H^c) / F_c(H^v; q); llm_preference z [B, H]: contrast_adapter(LLM last
    prompt token); target_text t [B, H]: llm_adapter(llm_emb_mlp(target text)).
    """
    vcc = video_comment_contrast(llm_preference, sr_preference, other_branch, temperature)
    ssc = symmetric_info_nce(sr_preference, llm_preference, temperature)
    rec = info_nce(sr_preference, target_text, temperature)
    lm = lm_loss if lm_loss is not None else sr_preference.new_zeros(())
    total = lm + rec_weight * rec + contrast_weight * (vcc + ssc)
    return AlignmentLosses(total=total, vcc=vcc, ssc=ssc, rec=rec, lm=lm)
