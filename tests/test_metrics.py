"""Ranking metrics on hand-computed rankings (METHOD 7.1): single and multi-positive, ties, padding."""

from __future__ import annotations

import math

import pytest
import torch

from lsvcr.metrics import MetricAccumulator, metric_sums, paired_seed_comparison, ranked_hits, single_positive_metric_sums


def _mean(scores, labels):
    sums = metric_sums(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    return {k: v / sums["count"] for k, v in sums.items() if k != "count"}, sums["count"]


def test_single_positive_at_rank_three():
    metrics, count = _mean([[0.9, 0.8, 0.7, 0.1, 0.0, -1.0]], [[0, 0, 1, 0, 0, 0]])
    assert count == 1
    assert metrics["recall@1"] == 0.0
    assert metrics["recall@5"] == 1.0
    assert metrics["ndcg@5"] == pytest.approx(1 / math.log2(4))
    assert metrics["mrr@5"] == pytest.approx(1 / 3)
    assert metrics["mrr@10"] == pytest.approx(1 / 3)


def test_multi_positive_recall_ndcg_mrr():
    # ranked labels: 1 0 1 1 0 ; three positives
    metrics, _ = _mean([[0.9, 0.8, 0.7, 0.6, 0.1]], [[1, 0, 1, 1, 0]])
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@5"] == pytest.approx(1.0)
    dcg = 1 + 1 / math.log2(4) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # IDCG over min(#pos, K) = 3 ideal hits
    assert metrics["ndcg@5"] == pytest.approx(dcg / idcg)
    assert metrics["mrr@5"] == 1.0


def test_more_positives_than_k_uses_k_ideal_hits():
    # 12 positives in 12 candidates: a perfect ranking whatever K
    metrics, _ = _mean([list(range(12, 0, -1))], [[1] * 12])
    assert metrics["ndcg@5"] == pytest.approx(1.0)
    assert metrics["ndcg@10"] == pytest.approx(1.0)
    assert metrics["recall@5"] == pytest.approx(5 / 12)


def test_ties_are_pessimistic():
    # all four candidates tie: the positive goes below every negative
    metrics, _ = _mean([[1.0, 1.0, 1.0, 1.0]], [[0, 1, 0, 0]])
    assert metrics["recall@1"] == 0.0
    assert metrics["mrr@5"] == pytest.approx(1 / 4)
    # a tie with one negative only: second place
    hits = ranked_hits(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([[1, 0, 0]]))
    assert hits.tolist() == [[0.0, 1.0, 0.0]]
    # same via the full-ranking fast path
    sums = single_positive_metric_sums(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([1]))
    assert sums["recall@1"] == 0.0
    assert sums["mrr@5"] == pytest.approx(1 / 4)


def test_padding_and_empty_samples():
    scores = torch.tensor([[0.3, float("-inf"), 0.5], [0.2, 0.1, float("-inf")]])
    labels = torch.tensor([[1, 0, 0], [0, 0, 0]])  # second sample has no positive: skipped
    sums = metric_sums(scores, labels)
    assert sums["count"] == 1
    assert sums["recall@1"] == 0.0 and sums["recall@5"] == 1.0
    assert sums["mrr@5"] == pytest.approx(0.5)


def test_fast_path_matches_generic_and_accumulator_averages():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 30, generator=generator)
    target = torch.randint(0, 30, (64,), generator=generator)
    labels = torch.zeros(64, 30, dtype=torch.long)
    labels[torch.arange(64), target] = 1
    generic, fast = metric_sums(scores, labels), single_positive_metric_sums(scores, target)
    for name in generic:
        assert generic[name] == pytest.approx(fast[name], abs=1e-4), name
    accumulator = MetricAccumulator()
    accumulator.add(metric_sums(scores[:40], labels[:40]))
    accumulator.add(metric_sums(scores[40:], labels[40:]))
    result = accumulator.result()
    assert result["samples"] == 64
    assert result["ndcg@10"] == pytest.approx(generic["ndcg@10"] / 64, abs=1e-6)


def test_grouped_metrics_average_each_group_of_rows_apart():
    """Three rows at 0-based ranks 0, 1 and 20 of 30 candidates, in groups a, b, a."""
    from lsvcr.metrics import GroupedMetrics, single_positive_metric_values

    scores = torch.arange(30, 0, -1, dtype=torch.float32).repeat(3, 1)  # candidate i scores 30 - i
    values = single_positive_metric_values(scores, torch.tensor([0, 1, 20]))
    grouped = GroupedMetrics(("a", "b", "empty"))
    grouped.add(values, torch.tensor([0, 1, 0]))
    result = grouped.result()
    assert result["a"]["samples"] == 2 and result["b"]["samples"] == 1 and result["empty"]["samples"] == 0
    assert result["a"]["ndcg@10"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["b"]["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert result["a"]["recall@10"] == pytest.approx(0.5) and result["empty"]["recall@10"] == 0.0


def test_bucket_labels_and_edges():
    from lsvcr.evaluate import bucket_labels, bucket_of

    assert bucket_labels((0, 1, 5, 10, 20, 50)) == ("0", "1-4", "5-9", "10-19", "20-49", "50+")
    assert bucket_of(torch.tensor([0, 1, 4, 5, 19, 20, 50, 900]), (0, 1, 5, 10, 20, 50)).tolist() == [0, 1, 1, 2, 3, 4, 5, 5]


def test_paired_seed_comparison_by_hand():
    # Differences +0.03, -0.01, +0.01, +0.01 (seed 9 is only in one row): mean 0.01, |sum| 0.04. Of the 16 sign
    # assignments, |±0.03 ±0.01 ±0.01 ±0.01| >= 0.04 in 8 (±0.03 with the three 0.01s summing to at least 0.01
    # in its direction: 4 each way), so p = 0.5.
    first = {1: 0.13, 2: 0.10, 3: 0.12, 4: 0.11, 9: 0.5}
    second = {1: 0.10, 2: 0.11, 3: 0.11, 4: 0.10}
    result = paired_seed_comparison(first, second)
    assert result["seeds"] == [1, 2, 3, 4] and result["ahead"] == 3
    assert result["differences"] == pytest.approx([0.03, -0.01, 0.01, 0.01])
    assert result["mean"] == pytest.approx(0.01)
    assert result["std"] == pytest.approx(math.sqrt((0.02**2 + 0.02**2 + 0 + 0) / 3))
    assert result["standard_error"] == pytest.approx(result["std"] / 2)
    assert result["sign_flip_p"] == pytest.approx(0.5)
    # Ahead on every one of n seeds: only all-plus and all-minus are as extreme, p = 2 / 2^n.
    assert paired_seed_comparison({s: 1.0 + s for s in range(5)}, {s: 0.0 for s in range(5)})["sign_flip_p"] == 2 / 32


def test_paired_seed_comparison_needs_shared_seeds():
    with pytest.raises(ValueError, match="share 1"):
        paired_seed_comparison({1: 0.1, 2: 0.2}, {2: 0.1, 3: 0.3})
