"""Ranking metrics of the official code (METHOD 7.1), multi-positive aware.

For one sample with P positives ranked among its candidates:
- recall@K = (#positives in the top K) / P      (equals HR@K when P = 1)
- ndcg@K   = DCG@K / IDCG@K, IDCG over min(P, K) ideal hits, gains 1/log2(rank+2) with 0-based rank
- mrr@K    = 1/(rank of the first hit + 1) if that hit is within the top K, else 0
Metrics are averaged over samples; samples without any positive are skipped (and counted apart).

Ties are broken **pessimistically**: a positive tied with a negative is ranked below it (a model that
gives every candidate the same score gets the worst possible metrics, not a lucky 1/N). Padded
candidates carry score -inf and label 0.
"""

from __future__ import annotations

import itertools
import math
import statistics

import torch
from torch import Tensor

METRIC_NAMES = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr@5", "mrr@10")


def _parse(names: tuple[str, ...]) -> list[tuple[str, str, int]]:
    return [(name, name.split("@")[0], int(name.split("@")[1])) for name in names]


def ranked_hits(scores: Tensor, labels: Tensor) -> Tensor:
    """[B, N] scores/labels → [B, N] 0/1 hits in ranked order, ties pessimistic."""
    labels = labels.to(torch.float32)
    # Stable sorts: first put negatives before positives, then order by score; equal scores keep
    # the negatives-first order.
    by_label = torch.sort(labels, dim=1, stable=True).indices
    by_score = torch.sort(scores.gather(1, by_label), dim=1, descending=True, stable=True).indices
    return labels.gather(1, by_label.gather(1, by_score))


def sums_of(values: dict[str, Tensor], count: int) -> dict[str, float]:
    """Per-row metric values summed, plus `count` (the rows that count), as `MetricAccumulator.add` takes them."""
    return {"count": float(count)} | {name: float(row_values.sum()) for name, row_values in values.items()}


def metric_sums(scores: Tensor, labels: Tensor, names: tuple[str, ...] = METRIC_NAMES) -> dict[str, float]:
    """Per-batch sums of every metric plus `count` (samples with ≥1 positive), for later averaging
    (sums and counts all-reduce correctly across DDP ranks)."""
    values, kept = metric_values(scores, labels, names)
    return sums_of(values, int(kept.sum()))


def metric_values(scores: Tensor, labels: Tensor, names: tuple[str, ...] = METRIC_NAMES) -> tuple[dict[str, Tensor], Tensor]:
    """Every metric per sample with ≥1 positive, and the [B] mask of those samples."""
    scores = scores.detach().float()
    labels = labels.detach()
    positives = (labels > 0).sum(dim=1)
    keep = positives > 0
    scores, labels, positives = scores[keep], labels[keep], positives[keep].float()
    max_k = max(k for _, _, k in _parse(names))
    hits = ranked_hits(scores, labels)[:, :max_k]
    width = hits.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(width, device=hits.device, dtype=torch.float32) + 2.0)
    rank_of_first = torch.where(hits.any(dim=1), hits.argmax(dim=1), torch.full_like(positives, width, dtype=torch.long))
    values_by_name: dict[str, Tensor] = {}
    for name, kind, k in _parse(names):
        top = hits[:, :k]
        if kind == "recall":
            values = top.sum(dim=1) / positives
        elif kind == "ndcg":
            ideal = torch.cumsum(discounts[:k], dim=0)
            ideal_hits = torch.clamp(positives.long(), max=min(k, width)) - 1
            values = (top * discounts[: top.shape[1]]).sum(dim=1) / ideal[ideal_hits.clamp(min=0)]
        elif kind == "mrr":
            values = torch.where(rank_of_first < k, 1.0 / (rank_of_first.float() + 1.0), torch.zeros_like(positives))
        elif kind == "hit":
            values = (top.sum(dim=1) > 0).float()
        else:
            raise ValueError(f"unknown metric {name}")
        values_by_name[name] = values
    return values_by_name, keep


def single_positive_metric_sums(scores: Tensor, target: Tensor, names: tuple[str, ...] = METRIC_NAMES) -> dict[str, float]:
    """Fast path for one positive per row among many candidates (full ranking): the 0-based rank is
    the number of other candidates scoring ≥ the target (ties pessimistic)."""
    return sums_of(single_positive_metric_values(scores, target, names), scores.shape[0])


def single_positive_metric_values(scores: Tensor, target: Tensor, names: tuple[str, ...] = METRIC_NAMES) -> dict[str, Tensor]:
    """Every metric per row of `single_positive_metric_sums`."""
    scores = scores.detach().float()
    target_score = scores.gather(1, target.view(-1, 1))
    rank = (scores >= target_score).sum(dim=1) - 1
    rank = torch.where(torch.isfinite(target_score.squeeze(1)), rank, torch.full_like(rank, scores.shape[1]))
    values_by_name: dict[str, Tensor] = {}
    for name, kind, k in _parse(names):
        inside = rank < k
        if kind in ("recall", "hit"):
            values = inside.float()
        elif kind == "ndcg":
            values = torch.where(inside, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(rank, dtype=torch.float32))
        elif kind == "mrr":
            values = torch.where(inside, 1.0 / (rank.float() + 1.0), torch.zeros_like(rank, dtype=torch.float32))
        else:
            raise ValueError(f"unknown metric {name}")
        values_by_name[name] = values
    return values_by_name


class MetricAccumulator:
    """Adds per-batch sums; `result()` averages. `merge_sums` lets DDP ranks all-reduce."""

    def __init__(self, names: tuple[str, ...] = METRIC_NAMES):
        self.names = names
        self.sums = {name: 0.0 for name in names} | {"count": 0.0}

    def add(self, sums: dict[str, float]) -> None:
        for key, value in sums.items():
            self.sums[key] += value

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.sums[name] for name in (*self.names, "count")], dtype=torch.float64)

    def load_tensor(self, values: Tensor) -> None:
        for key, value in zip((*self.names, "count"), values.tolist()):
            self.sums[key] = value

    def result(self) -> dict[str, float]:
        count = self.sums["count"]
        out = {name: (self.sums[name] / count if count else 0.0) for name in self.names}
        out["samples"] = int(count)
        return out


class GroupedMetrics:
    """Metric averages per group of samples (e.g. by history length): one accumulator per group label."""

    def __init__(self, labels: tuple[str, ...], names: tuple[str, ...] = METRIC_NAMES):
        self.labels = labels
        self.groups = [MetricAccumulator(names) for _ in labels]

    def add(self, values: dict[str, Tensor], group_of_row: Tensor) -> None:
        """`values`: name -> [R] per-row metric; `group_of_row`: [R] index into `labels`."""
        for index, accumulator in enumerate(self.groups):
            inside = group_of_row == index
            accumulator.add(sums_of({name: row_values[inside] for name, row_values in values.items()}, int(inside.sum())))

    def result(self) -> dict[str, dict[str, float]]:
        return {label: accumulator.result() for label, accumulator in zip(self.labels, self.groups)}


MAX_PAIRED_SEEDS = 20  # the sign-flip test enumerates 2^n assignments


def paired_seed_comparison(first: dict[int, float], second: dict[int, float]) -> dict:
    """`first` − `second`, one figure per seed, on the seeds both have (same data, same seed).

    Returns the per-seed differences, their mean, sample std and standard error, the seeds `first` is ahead
    on, and the exact two-sided sign-flip p-value: the share of the 2^n ± assignments of the differences
    whose mean is at least as far from 0 as the observed one. It assumes only that, were the two the same,
    each difference would be as likely negative as positive (no normality), and it cannot go below 2 / 2^n
    (0.0625 at 5 seeds, 0.0156 at 7): few seeds cannot show much."""
    seeds = sorted(first.keys() & second.keys())
    if not 2 <= len(seeds) <= MAX_PAIRED_SEEDS:
        raise ValueError(f"a paired comparison needs 2 to {MAX_PAIRED_SEEDS} seeds that both rows have; "
                         f"they share {len(seeds)} ({seeds}; first {sorted(first)}, second {sorted(second)})")
    differences = [first[seed] - second[seed] for seed in seeds]
    observed = abs(statistics.fmean(differences))
    as_far = sum(abs(sum(sign * difference for sign, difference in zip(signs, differences))) / len(seeds)
                 >= observed - 1e-12 for signs in itertools.product((1, -1), repeat=len(seeds)))
    std = statistics.stdev(differences)
    return {"seeds": seeds, "differences": differences, "mean": statistics.fmean(differences), "std": std,
            "standard_error": std / math.sqrt(len(seeds)), "ahead": sum(d > 0 for d in differences),
            "sign_flip_p": as_far / 2 ** len(seeds)}
