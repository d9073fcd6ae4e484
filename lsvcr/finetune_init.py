"""Where stage-2 fine-tuning starts (METHOD 6.1): the aligned stage-1 weights of `--init`, and the comment like
prior's weight fitted to the popularity-only ranker on the training samples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lsvcr.batching import pool_negatives
from lsvcr.errors import ModelNotFoundError
from lsvcr.model import LIKE_PRIOR_RATE

log = logging.getLogger("lsvcr.finetune")


# ----------------------------------------------------------------------------- the comment like prior


def fit_like_prior_weight(prior: np.ndarray, pools: np.ndarray, positives: np.ndarray) -> float:
    """Maximum-likelihood weight w of the popularity-only comment model softmax(w · prior[c]) over each
    training sample's pool (every positive against the pool's non-positives). A convex 1-D fit; stage 2
    starts the like prior here, so fine-tuning begins at the popularity ranker and learns what the
    user's history adds (from w = 0 the prior's weight lags behind the text part, which overfits first)."""
    negative = pool_negatives(pools, positives)
    positive = positives != 0
    keep = positive.any(axis=1) & negative.any(axis=1)
    if not keep.any():
        return 0.0
    pool_prior = torch.from_numpy(prior[pools[keep]]).double()
    positive_prior = torch.from_numpy(prior[positives[keep]]).double()
    negative_mask, positive_mask = torch.from_numpy(negative[keep]), torch.from_numpy(positive[keep])
    weight = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=50, line_search_fn="strong_wolfe")

    def negative_log_likelihood() -> Tensor:
        optimizer.zero_grad()
        negatives = torch.logsumexp((weight * pool_prior).masked_fill(~negative_mask, float("-inf")), dim=1)
        own = weight * positive_prior
        per_positive = torch.logaddexp(own, negatives[:, None]) - own
        loss = per_positive[positive_mask].mean()
        loss.backward()
        return loss

    optimizer.step(negative_log_likelihood)
    return float(weight.detach())


def warm_start_like_prior(model: nn.Module, train, tables) -> float | None:
    """Set the comment model's like-prior weight to `fit_like_prior_weight` (None: the model has no prior)."""
    if train.task != "comment" or not getattr(model, "use_like_prior", False):
        return None
    weight = fit_like_prior_weight(model.comment_prior.numpy(), tables.comment_pool[train.target_video],
                                   train.pos_comments)
    with torch.no_grad():
        model.comment_like_weight.fill_(weight / LIKE_PRIOR_RATE)
    log.info("comment like prior: weight %.3f per std of log(1 + likes) (popularity-only MLE on train)", weight)
    return weight


# ----------------------------------------------------------------------------- stage-1 weights (METHOD 6.1)


def load_stage1_checkpoint(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load aligned SR weights into a stage-2 model: strip leading key components until a key matches
    (e.g. `base_model.model.reccom.`), cast to fp32, pad position tables of another length with their
    mean row, and load non-strictly. Returns (and logs) which keys were loaded / missing / skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ModelNotFoundError(f"--init checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    source = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(source, dict):
        raise ModelNotFoundError(f"{path}: expected a dict with 'state_dict' (ALIGNED/checkpoint.pt)")
    target = model.state_dict()
    renamed: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in source.items():
        parts = key.split(".")
        match = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in target), None)
        if match is None or not torch.is_tensor(value):
            skipped.append(key)
            continue
        value = value.float() if value.is_floating_point() else value
        wanted = target[match].shape
        if value.shape != wanted and match.endswith("_position.weight") and value.shape[1:] == wanted[1:]:
            if value.shape[0] < wanted[0]:
                padding = value.mean(dim=0, keepdim=True).expand(wanted[0] - value.shape[0], -1)
                value = torch.cat([value, padding], dim=0)
            else:
                value = value[: wanted[0]]
        if value.shape != wanted:
            skipped.append(f"{key} (shape {tuple(value.shape)} != {tuple(wanted)})")
            continue
        renamed[match] = value
    result = model.load_state_dict(renamed, strict=False)
    report = {"loaded": sorted(renamed), "missing": sorted(result.missing_keys), "skipped": skipped}
    log.info("--init %s: loaded %d tensors; missing (trained from scratch): %s; skipped: %s",
             path, len(renamed), report["missing"] or "none", skipped or "none")
    if not renamed:
        raise ModelNotFoundError(f"--init {path}: no key matches the SR model (is it an ALIGNED checkpoint?)")
    return report

