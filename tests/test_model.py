"""The SR backbone (METHOD §2): shapes, padding never leaking, losses checked by hand, stacking."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lsvcr.config import ModelConfig
from lsvcr.errors import ConfigError, DataError
from lsvcr.model import (LIKE_PRIOR_RATE, Dropout, HistoryBatch, LSVCRModel, MultiHeadAttention, _sampled_info_nce,
                         masked_softmax)

NUM_VIDEOS, NUM_COMMENTS, TEXT_DIM = 30, 60, 16


def _tables(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    video_text = torch.randn(NUM_VIDEOS + 1, TEXT_DIM, generator=generator)
    comment_text = torch.randn(NUM_COMMENTS + 1, TEXT_DIM, generator=generator)
    video_text[0] = 0
    comment_text[0] = 0
    comment_likes = torch.randint(0, 500, (NUM_COMMENTS + 1,), generator=generator)
    return video_text, comment_text, comment_likes


def _model(mode: str = "id+text", stacking: str = "faithful", seed: int = 0, like_prior: bool = True) -> LSVCRModel:
    torch.manual_seed(seed)
    config = ModelConfig(mode=mode, stacking=stacking, max_position=10, comment_like_prior=like_prior)
    return LSVCRModel(config, NUM_VIDEOS, *_tables()).eval()


def _batch() -> HistoryBatch:
    """Three users: full histories, a short one, and one with an EMPTY comment history."""
    return HistoryBatch(
        video_history=torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]]),
        video_history_hot_comment=torch.tensor([[1, 0, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]]),
        comment_history_videos=torch.tensor([[8, 9, 10], [11, 0, 0], [0, 0, 0]]),
        comment_history_comments=torch.tensor([
            [[1, 2], [3, 0], [4, 5]],
            [[6, 0], [0, 0], [0, 0]],
            [[0, 0], [0, 0], [0, 0]],
        ]),
    )


CURRENT = torch.tensor([12, 13, 14])
COMMENT_CANDIDATES = torch.tensor([[20, 21, 22, 0], [23, 24, 0, 0], [25, 26, 27, 28]])


def test_shapes_and_pad_column():
    model = _model()
    batch = _batch()
    all_scores = model.score_videos(batch)
    assert all_scores.shape == (3, NUM_VIDEOS + 1)
    assert torch.isneginf(all_scores[:, 0]).all() and torch.isfinite(all_scores[:, 1:]).all()
    sampled = model.score_videos(batch, torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]]))
    assert sampled.shape == (3, 3) and torch.isneginf(sampled[0, 2]) and torch.isfinite(sampled[1]).all()
    comments = model.score_comments(batch, CURRENT, COMMENT_CANDIDATES)
    assert comments.shape == (3, 4)
    assert torch.isfinite(comments[2]).all(), "a user with an empty comment history must get finite scores"
    assert torch.isneginf(comments[0, 3]) and torch.isneginf(comments[1, 2:]).all()
    # scores are cosine / tau
    assert all_scores[:, 1:].abs().max() <= 1 / model.config.temperature + 1e-4
    assert model.video_candidate_vectors().shape == (NUM_VIDEOS + 1, 64)
    assert torch.allclose(model.video_candidate_vectors(torch.tensor([3])).norm(dim=-1), torch.ones(1))


def test_masked_softmax_all_pad_row_is_zero_not_nan():
    weights = masked_softmax(torch.randn(2, 3), torch.tensor([[True, False, True], [False, False, False]]))
    assert torch.equal(weights[1], torch.zeros(3))
    assert weights[0, 1] == 0 and torch.isclose(weights[0].sum(), torch.tensor(1.0))


def test_inference_attention_equals_the_training_formula_including_rows_without_keys():
    """Eval mode takes the fused scaled_dot_product_attention kernel; with dropout off it must give the
    explicit masked-softmax attention's values, and zero context (not NaN) for a query with no key."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(hidden=16, heads=2, attn_dropout=0.0, hidden_dropout=0.0, eps=1e-12)
    hidden, key_value = torch.randn(3, 5, 16), torch.randn(3, 4, 16)
    mask = torch.rand(3, 5, 4) > 0.4
    mask[1] = False  # a user whose other history is empty
    mask[2, 3] = False  # one query position without keys
    explicit = attention.train()(hidden, key_value, mask)
    fused = attention.eval()(hidden, key_value, mask)
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused, explicit, atol=1e-5)


@pytest.mark.parametrize("mode", ["id+text", "text"])
def test_padding_content_and_extra_padding_never_change_scores(mode):
    model = _model(mode)
    batch = _batch()
    video_scores = model.score_videos(batch)
    comment_scores = model.score_comments(batch, CURRENT, COMMENT_CANDIDATES)

    # Garbage in pad slots: hot comments of pad videos, comments of pad records.
    noisy = dataclasses.replace(batch)
    noisy.video_history_hot_comment = torch.where(batch.video_history == 0, torch.tensor(33), batch.video_history_hot_comment)
    pad_records = (batch.comment_history_videos == 0).unsqueeze(-1)
    noisy.comment_history_comments = torch.where(pad_records, torch.tensor(44), batch.comment_history_comments)
    assert torch.allclose(model.score_videos(noisy), video_scores, atol=1e-5)
    assert torch.allclose(model.score_comments(noisy, CURRENT, COMMENT_CANDIDATES), comment_scores, atol=1e-5)

    # Appending padding on every axis (history slots, comment slots, candidate slots).
    widened = HistoryBatch(
        video_history=F.pad(batch.video_history, (0, 3)),
        video_history_hot_comment=F.pad(batch.video_history_hot_comment, (0, 3)),
        comment_history_videos=F.pad(batch.comment_history_videos, (0, 2)),
        comment_history_comments=F.pad(batch.comment_history_comments, (0, 2, 0, 2)),
    )
    assert torch.allclose(model.score_videos(widened), video_scores, atol=1e-5)
    widened_comments = model.score_comments(widened, CURRENT, F.pad(COMMENT_CANDIDATES, (0, 2)))
    assert torch.allclose(widened_comments[:, :4], comment_scores, atol=1e-5)
    assert torch.isneginf(widened_comments[:, 4:]).all()


def test_empty_histories_are_finite_and_other_branch_contributes_nothing():
    model = _model()
    batch = _batch()
    states = model.encode_histories(batch)
    assert torch.isfinite(states.video_states).all() and torch.isfinite(states.comment_states).all()
    # user 2 has no comment history: the video branch's mix output must be exactly zero, so changing
    # nothing but the (absent) comment history of user 2 cannot matter: compare with a batch where
    # user 2's comment tensor shape differs only by padding.
    only_user2 = HistoryBatch(
        batch.video_history[2:], batch.video_history_hot_comment[2:],
        batch.comment_history_videos[2:, :1], batch.comment_history_comments[2:, :1, :1],
    )
    assert torch.allclose(model.score_videos(only_user2), model.score_videos(batch)[2:], atol=1e-5)
    # a user with no video history at all still gets finite scores
    empty_video = dataclasses.replace(batch, video_history=torch.zeros_like(batch.video_history))
    assert torch.isfinite(model.score_videos(empty_video)[:, 1:]).all()
    assert torch.isfinite(model.score_comments(empty_video, CURRENT, COMMENT_CANDIDATES)[:, :2]).all()


def test_video_cross_entropy_by_hand():
    """CE over all videos recomputed from the raw parameters: cos(u, gate·E + A(title)) / τ, pad masked."""
    model = _model()
    batch = _batch()
    target = torch.tensor([5, 9, 2])
    states = model.encode_histories(batch)
    user = F.normalize(model.video_user_vector(states), dim=-1)
    items = model.gate * model.video_embedding.weight + model.video_text @ model.llm_adapter.weight.T
    items = F.normalize(items, dim=-1)
    logits = user @ items.T / 0.07
    manual = []
    for row in range(3):
        real = logits[row, 1:]  # the pad column never takes part
        manual.append(-(logits[row, target[row]] - torch.logsumexp(real, dim=0)))
    manual_loss = torch.stack(manual).mean()
    model_loss = F.cross_entropy(model.score_videos(batch, states=states), target)
    assert torch.isclose(model_loss, manual_loss, atol=1e-5)


def _saved_for_backward_bytes(loss_of) -> tuple[torch.Tensor, int]:
    """(loss, bytes of the tensors autograd keeps for the backward pass outside checkpointed regions)."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of()
    return loss, sum(saved)


@pytest.mark.parametrize("architecture", ["lsvcr", "sasrec"])
def test_video_cross_entropy_in_chunks_has_the_same_loss_and_gradients_and_keeps_less(architecture):
    """finetune.max_logits_mb: the CE over all videos taken a few rows at a time, each chunk's gradients
    taken with its loss, gives the one-pass loss and gradients (up to summation order) while autograd keeps
    none of the [N, V+1] logits."""
    from lsvcr.baselines import SASRec
    from lsvcr.model import catalog_cross_entropy

    videos, rows = 3000, 256
    torch.manual_seed(0)
    config = ModelConfig(max_position=10, comment_like_prior=False)
    video_text = torch.randn(videos + 1, TEXT_DIM)
    video_text[0] = 0
    model = (SASRec(config, videos) if architecture == "sasrec"
             else LSVCRModel(config, videos, video_text, torch.zeros(1, TEXT_DIM), torch.zeros(1))).train()
    user = torch.randn(rows, config.hidden_size, requires_grad=True)
    targets = torch.randint(1, videos + 1, (rows,))
    one_chunk_mb = rows * (videos + 1) * 4 / 2**20  # 2.9 MB of logits

    results = {}
    for max_logits_mb in (0.0, one_chunk_mb / 5):  # 0: one pass; then 6 chunks of up to 51 rows
        model.zero_grad()
        user.grad = None
        loss, kept = _saved_for_backward_bytes(lambda: model.video_cross_entropy(user, targets, max_logits_mb))
        loss.backward()
        results[max_logits_mb] = (loss.detach(), user.grad.clone(),
                                  {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
                                  kept)
    (whole_loss, whole_user_grad, whole_grads, whole_kept), (loss, user_grad, grads, kept) = results.values()
    assert torch.allclose(loss, whole_loss, rtol=1e-6)
    assert torch.allclose(user_grad, whole_user_grad, atol=1e-7, rtol=1e-5)
    assert grads.keys() == whole_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, whole_grads[name], atol=1e-7, rtol=1e-4), name
    logits_bytes = rows * (videos + 1) * 4
    assert whole_kept - kept >= 1.5 * logits_bytes  # the logits and their log-softmax are no longer kept
    with torch.no_grad():  # no autograd: the chunks' losses summed
        items, targets = torch.randn(videos + 1, 8), torch.randint(1, videos + 1, (rows,))
        one_pass = catalog_cross_entropy(user[:, :8], items, targets)
        assert torch.allclose(catalog_cross_entropy(user[:, :8], items, targets, one_chunk_mb / 5), one_pass)
        logits = user[:, :8] @ items.T
        logits[:, 0] = float("-inf")
        assert torch.allclose(one_pass, F.cross_entropy(logits, targets))


def test_comment_cross_entropy_by_hand():
    model = _model()
    batch = _batch()
    candidates = torch.tensor([[20, 21, 22], [23, 24, 25], [26, 27, 28]])
    states = model.encode_histories(batch)
    # F_c by hand: single-query attention over H^c with the current video as query, residual + LN.
    attention = model.target_attention
    query = (model.gate * model.video_embedding(CURRENT) + model.llm_adapter(model.video_text[CURRENT]))
    losses = []
    for row in range(3):
        mask = states.comment_mask[row]
        hidden = states.comment_states[row][mask]
        q = attention.query(query[row]).view(2, 32)
        k = attention.key(hidden).view(-1, 2, 32)
        v = attention.value(hidden).view(-1, 2, 32)
        if hidden.shape[0]:
            weights = torch.softmax((k * q).sum(-1) / 32 ** 0.5, dim=0)  # [L, heads]
            context = (weights.unsqueeze(-1) * v).sum(0).reshape(64)
        else:
            context = torch.zeros(64)  # empty history: no attention at all
        user = attention.layer_norm(attention.out(context) + query[row])
        comment_vectors = F.normalize(model.llm_adapter(model.comment_text[candidates[row]]), dim=-1)
        logits = comment_vectors @ F.normalize(user, dim=0) / 0.07
        losses.append(-torch.log_softmax(logits, dim=0)[0])
    manual_loss = torch.stack(losses).mean()
    model_logits = model.score_comments(batch, CURRENT, candidates, states=states)
    assert torch.isclose(F.cross_entropy(model_logits, torch.zeros(3, dtype=torch.long)), manual_loss, atol=1e-5)


def test_id_text_contrastive_loss_by_hand():
    """Fewer than 100 pairs: every other pair is a negative; symmetric; both history sets summed."""
    model = _model()
    batch = _batch()
    states = model.encode_histories(batch)
    expected = 0.0
    for videos, text, mask in (
        (batch.video_history, states.video_item_text, states.video_mask),
        (batch.comment_history_videos, states.comment_item_text, states.comment_mask),
    ):
        ids = F.normalize(model.video_embedding.weight[videos[mask]], dim=-1)  # no gate
        texts = F.normalize(text[mask], dim=-1)
        n = ids.shape[0]
        similarity = ids @ texts.T / 0.07
        id_to_text = sum(-(similarity[i, i] - torch.logsumexp(similarity[i], 0)) for i in range(n)) / n
        text_to_id = sum(-(similarity[i, i] - torch.logsumexp(similarity[:, i], 0)) for i in range(n)) / n
        expected = expected + 0.5 * (id_to_text + text_to_id)
    assert torch.isclose(model.id_text_contrastive_loss(batch, states), expected, atol=1e-5)
    assert model.id_text_contrastive_loss(batch).requires_grad


@pytest.mark.parametrize("shared_by", [1, 4, 7])
def test_sampled_info_nce_with_drawn_negatives_by_hand(shared_by):
    """Many pairs: each block of `shared_by` anchors scores the block's drawn targets; a draw of the
    anchor's own index is not a negative for it."""
    generator = torch.Generator().manual_seed(1)
    anchors = F.normalize(torch.randn(10, 8, generator=generator), dim=-1)
    targets = F.normalize(torch.randn(10, 8, generator=generator), dim=-1)
    blocks = -(-10 // shared_by)
    negatives = torch.randint(0, 10, (blocks, 5), generator=generator)
    negatives[0, 0] = 0  # anchor 0 draws itself
    losses = []
    for n in range(10):
        drawn = [int(j) for j in negatives[n // shared_by] if int(j) != n]
        logits = torch.cat([(anchors[n] @ targets[n]).view(1), targets[drawn] @ anchors[n]]) / 0.07
        losses.append(-torch.log_softmax(logits, dim=0)[0])
    expected = torch.stack(losses).mean()
    assert torch.isclose(_sampled_info_nce(anchors, targets, negatives, shared_by, 0.07), expected, atol=1e-5)


@pytest.mark.parametrize("independent", [True, False])
def test_id_text_directions_draw_their_own_negatives(independent):
    """METHOD 2.8: id→text and text→id score separately drawn negatives (the official code takes two disjoint
    sets from one rand+topk); `independent_directions=False` reuses the id→text draw for text→id."""
    model = _model().eval()
    batch = _batch()
    states = model.encode_histories(batch)
    sets = [(batch.video_history, states.video_item_text, states.video_mask),
            (batch.comment_history_videos, states.comment_item_text, states.comment_mask)]
    torch.manual_seed(5)  # the draws the model will make, in its order: per set, id→text then text→id
    expected = 0.0
    for videos, text, mask in sets:
        ids = F.normalize(model.video_embedding.weight[videos[mask]], dim=-1)
        texts = F.normalize(text[mask], dim=-1)
        first = torch.randint(0, len(ids), (len(ids), 2))
        second = torch.randint(0, len(ids), (len(ids), 2)) if independent else first
        assert independent is not torch.equal(first, second)
        expected = expected + 0.5 * (_sampled_info_nce(ids, texts, first, 1, 0.07)
                                     + _sampled_info_nce(texts, ids, second, 1, 0.07))
    torch.manual_seed(5)
    loss = model.id_text_contrastive_loss(batch, states, num_negatives=2, negatives_shared_by=1,
                                          independent_directions=independent)
    assert torch.isclose(loss, expected, atol=1e-5)


def test_raw_llm_vectors_pass_through_a_fresh_llm_emb_mlp():
    """The no-alignment ablation (METHOD 7.3): text vectors wider than model.text_mlp_dim go through a freshly
    initialised llm_emb_mlp before A: titles and candidates as A(mlp(e)), a record as A(mlp(mean of its raw
    comment vectors)); padding stays zero. Vectors of that width (aligned) are used as they are."""
    video_text, comment_text, _ = _tables()  # 16-d
    narrow = LSVCRModel(ModelConfig(max_position=10, text_mlp_dim=16), NUM_VIDEOS, video_text, comment_text)
    assert narrow.text_mlp is None and narrow.llm_adapter.in_features == 16
    torch.manual_seed(0)
    model = LSVCRModel(ModelConfig(max_position=10, text_mlp_dim=4), NUM_VIDEOS, video_text, comment_text).eval()
    assert model.llm_adapter.in_features == 4 and model.text_mlp[0].in_features == 16
    assert model.text_mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.2)  # N(0, 0.02) like every Linear
    mlp, adapter = model.text_mlp, model.llm_adapter
    index = torch.tensor([[3, 0, 7]])
    expected = adapter(mlp(video_text[index]))
    expected[0, 1] = 0  # padding
    assert torch.allclose(model.adapt_text(model.video_text, index), expected, atol=1e-6)
    bags = torch.tensor([[[4, 9, 0], [0, 0, 0]]])
    record = adapter(mlp(comment_text[[4, 9]].mean(0)))
    means = model.adapt_text_mean(model.comment_text, bags)
    assert torch.allclose(means[0, 0], record, atol=1e-6) and torch.equal(means[0, 1], torch.zeros(64))
    # The MLP runs once per distinct bag; repeated and padding bags get the same values and gradients.
    repeated = torch.tensor([[[4, 9, 0], [0, 0, 0], [4, 9, 0]], [[0, 0, 0], [9, 4, 0], [4, 9, 0]]])
    weights = torch.randn(2, 3, 64)
    (model.adapt_text_mean(model.comment_text, repeated) * weights).sum().backward()
    distinct_grad = mlp[0].weight.grad.clone()
    model.zero_grad()
    one_by_one = torch.stack([torch.stack([
        adapter(mlp(comment_text[[i for i in bag.tolist() if i]].mean(0))) if bag.any() else torch.zeros(64)
        for bag in row]) for row in repeated])
    (one_by_one * weights).sum().backward()
    assert torch.allclose(model.adapt_text_mean(model.comment_text, repeated), one_by_one, atol=1e-6)
    assert torch.allclose(distinct_grad, mlp[0].weight.grad, atol=1e-6)
    model.zero_grad()
    assert torch.allclose(model.project_text(video_text[[3]]), adapter(mlp(video_text[[3]])), atol=1e-6)
    assert torch.isfinite(model.score_videos(_batch())[:, 1:]).all()


def test_text_adapter_projects_only_used_rows_with_the_same_values():
    """A(title) and A(mean of comments) equal projecting the whole table, whatever the batch repeats or lacks."""
    model = _model()
    video_text, comment_text, _ = _tables()
    index = torch.tensor([[3, 3, 0, 7], [7, 1, 0, 0]])
    assert torch.allclose(model.adapt_text(video_text, index), model.llm_adapter(video_text)[index], atol=1e-6)
    every_row = torch.arange(NUM_VIDEOS + 1).repeat(2)
    assert torch.allclose(model.adapt_text(model.video_text, every_row), model.llm_adapter(model.video_text[every_row]),
                          atol=1e-6)
    assert torch.allclose(model.adapt_text(model.video_text, every_row[:3]), model.llm_adapter(model.video_text[:3]),
                          atol=1e-6)
    bags = torch.tensor([[[4, 4, 0], [9, 0, 0]], [[0, 0, 0], [2, 5, 6]]])
    projected = model.llm_adapter(comment_text)
    expected = torch.stack([
        torch.stack([projected[[4, 4]].mean(0), projected[[9]].mean(0)]),
        torch.stack([torch.zeros(projected.shape[1]), projected[[2, 5, 6]].mean(0)]),
    ])
    assert torch.allclose(model.adapt_text_mean(comment_text, bags), expected, atol=1e-6)
    no_pad = torch.tensor([[[1, 2]]])  # no pad id at all: row 1 must not be taken for padding
    assert torch.allclose(model.adapt_text_mean(comment_text, no_pad), projected[[1, 2]].mean(0).view(1, 1, -1),
                          atol=1e-6)
    comments = torch.tensor([[[1, 2, 0], [0, 0, 0], [5, 0, 0]]])
    records = torch.stack([
        model.llm_adapter((model.comment_text[1] + model.comment_text[2]) / 2),
        torch.zeros(64),
        model.llm_adapter(model.comment_text[5]),
    ])[None]
    assert torch.allclose(model.adapt_text_mean(model.comment_text, comments), records, atol=1e-6)
    assert torch.allclose(model.adapt_text_mean(model.comment_text, comments.repeat(8, 1, 1)), records.repeat(8, 1, 1),
                          atol=1e-6)


def test_cpu_dropout_keeps_the_expectation_and_rate():
    torch.manual_seed(0)
    dropout = Dropout(0.3)
    values = torch.ones(200_000)
    dropped = dropout(values)
    assert abs((dropped == 0).float().mean().item() - 0.3) < 0.01
    assert abs(dropped.mean().item() - 1.0) < 0.01
    assert torch.equal(dropout.eval()(values), values)


def test_faithful_and_standard_stacking_differ():
    faithful = _model(stacking="faithful")
    standard = _model(stacking="standard")
    standard.load_state_dict(faithful.state_dict())
    batch = _batch()
    assert not torch.allclose(faithful.score_videos(batch), standard.score_videos(batch), atol=1e-4)
    single_layer = ModelConfig(num_layers=1, max_position=10)
    torch.manual_seed(0)
    one = LSVCRModel(single_layer, NUM_VIDEOS, *_tables()).eval()
    other = LSVCRModel(dataclasses.replace(single_layer, stacking="standard"), NUM_VIDEOS, *_tables()).eval()
    other.load_state_dict(one.state_dict())
    assert torch.allclose(one.score_videos(batch), other.score_videos(batch))  # identical with one layer


def _paper_and_extended(new_parameter: str, **extension: bool) -> tuple[LSVCRModel, LSVCRModel]:
    """The paper model and one with an extension switched on, carrying the paper model's weights; the extension's
    own parameter, `new_parameter`, is the only one the paper model lacks."""
    paper = _model(like_prior=False)
    extended = LSVCRModel(ModelConfig(max_position=10, comment_like_prior=False, **extension), NUM_VIDEOS, *_tables()).eval()
    result = extended.load_state_dict(paper.state_dict(), strict=False)
    assert result.missing_keys == [new_parameter] and not result.unexpected_keys
    return paper, extended


def test_pooling_recency_bias_starts_as_the_papers_pooling_and_can_single_out_the_latest_item():
    paper, biased = _paper_and_extended("video_pooling.recency_bias", pooling_recency_bias=True)
    batch = _batch()
    torch.testing.assert_close(biased.score_videos(batch), paper.score_videos(batch))  # zero bias: the paper's F_v

    # A dominant logit at distance 0 puts the weight on each history's latest real item, wherever padding starts
    # (rows of 4, 2 and 1 real items), and padding appended to the batch moves nothing.
    with torch.no_grad():
        biased.video_pooling.recency_bias[0] = 60.0
    states = biased.encode_histories(batch, outputs=("video",))
    latest = batch.video_history.ne(0).sum(dim=1) - 1
    torch.testing.assert_close(biased.video_user_vector(states), states.video_states[torch.arange(3), latest])
    widened = dataclasses.replace(batch, video_history=F.pad(batch.video_history, (0, 3)),
                                  video_history_hot_comment=F.pad(batch.video_history_hot_comment, (0, 3)))
    torch.testing.assert_close(biased.score_videos(widened), biased.score_videos(batch))


def test_repeat_logit_starts_as_the_papers_scores_and_moves_each_history_video_once():
    paper, repeating = _paper_and_extended("repeat_logit", repeat_logit=True)
    batch = dataclasses.replace(_batch(), video_history=torch.tensor([[1, 2, 2, 4], [5, 6, 0, 0], [7, 0, 0, 0]]))
    candidates = torch.tensor([[2, 3, 4, 0], [6, 1, 7, 5], [9, 7, 0, 0]])
    torch.testing.assert_close(repeating.score_videos(batch), paper.score_videos(batch))  # r = 0: the paper's
    torch.testing.assert_close(repeating.score_videos(batch, candidates), paper.score_videos(batch, candidates))

    with torch.no_grad():
        repeating.repeat_logit.fill_(-1.5)
    history = {(0, 1), (0, 2), (0, 4), (1, 5), (1, 6), (2, 7)}  # video 2 recurs in row 0: it moves once
    expected = paper.score_videos(batch)
    for row, video in history:
        expected[row, video] -= 1.5
    torch.testing.assert_close(repeating.score_videos(batch), expected)  # the pad column stays -inf
    moved = paper.score_videos(batch, candidates) - 1.5 * torch.tensor(
        [[(row, int(video)) in history for video in videos] for row, videos in enumerate(candidates)])
    torch.testing.assert_close(repeating.score_videos(batch, candidates), moved.masked_fill(candidates == 0, float("-inf")))

    # Training sees the same logits: the CE over all videos is the CE of these scores, and r gets its gradient.
    target = torch.tensor([3, 6, 2])
    states = repeating.encode_histories(batch, outputs=("video",))
    loss = repeating.video_cross_entropy(repeating.video_user_vector(states), target,
                                         video_history=batch.video_history)
    torch.testing.assert_close(loss, F.cross_entropy(repeating.score_videos(batch), target))
    loss.backward()
    assert repeating.repeat_logit.grad is not None and repeating.repeat_logit.grad != 0
    with pytest.raises(ConfigError, match="needs each row's video_history"):
        repeating.video_cross_entropy(repeating.video_user_vector(states), target)


def test_sasrec_baseline_takes_the_same_repeat_logit():
    from lsvcr.baselines import SASRec

    torch.manual_seed(0)
    plain = SASRec(ModelConfig(max_position=10), NUM_VIDEOS).eval()
    repeating = SASRec(ModelConfig(max_position=10, repeat_logit=True), NUM_VIDEOS).eval()
    assert repeating.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["repeat_logit"]
    batch = dataclasses.replace(_batch(), video_history=torch.tensor([[1, 2, 2, 4], [5, 6, 0, 0], [7, 0, 0, 0]]))
    candidates = torch.tensor([[2, 3, 4, 0], [6, 1, 7, 5], [9, 7, 0, 0]])
    with torch.no_grad():
        repeating.repeat_logit.fill_(0.8)
    in_history = torch.zeros(3, NUM_VIDEOS + 1)
    in_history[[0, 0, 0, 1, 1, 2], [1, 2, 4, 5, 6, 7]] = 0.8  # video 2 recurs in row 0: it moves once
    torch.testing.assert_close(repeating.score_videos(batch), plain.score_videos(batch) + in_history)
    torch.testing.assert_close(repeating.score_videos(batch, candidates),
                               plain.score_videos(batch, candidates) + torch.gather(in_history, 1, candidates))
    target = torch.tensor([3, 6, 2])
    loss = repeating.video_cross_entropy(repeating.user_vector(batch.video_history), target,
                                         video_history=batch.video_history)
    torch.testing.assert_close(loss, F.cross_entropy(repeating.score_videos(batch), target))


def test_repeat_logit_in_chunks_has_the_one_pass_loss_and_gradients():
    """The chunked CE adds the repeat logit inside each chunk and sums its gradient there (the rows' softmax
    minus the one-hot, at the first occurrence of each history video); checked against autograd of the dense
    logits built by hand, at r = 0 (where the gradient must still flow) and r ≠ 0."""
    from lsvcr.model import catalog_cross_entropy, distinct_history

    torch.manual_seed(0)
    rows, videos, width = 9, 14, 6
    query = torch.randn(rows, width, requires_grad=True)
    items = torch.randn(videos + 1, width, requires_grad=True)
    targets = torch.randint(1, videos + 1, (rows,))
    history = torch.randint(0, videos + 1, (rows, 5))
    history[0] = torch.tensor([3, 3, 0, targets[0], 3])  # a repeat, padding, and the target itself
    repeat_logit = torch.zeros((), requires_grad=True)
    in_history = torch.zeros(rows, videos + 1)
    for row, row_history in enumerate(history.tolist()):
        for video in set(row_history) - {0}:
            in_history[row, video] = 1.0

    def by_hand():
        logits = query @ items.T + repeat_logit * in_history
        return F.cross_entropy(logits[:, 1:], targets - 1)

    two_rows_mb = 2 * (videos + 1) * 4 / 2**20
    for value in (0.0, 1.3):
        with torch.no_grad():
            repeat_logit.fill_(value)
        results = []
        for loss_of in (by_hand, lambda: catalog_cross_entropy(query, items, targets, 0.0, (*distinct_history(history), repeat_logit)),
                        lambda: catalog_cross_entropy(query, items, targets, two_rows_mb, (*distinct_history(history), repeat_logit))):
            for tensor in (query, items, repeat_logit):
                tensor.grad = None
            loss = loss_of()
            loss.backward()
            results.append([loss.detach(), query.grad.clone(), items.grad.clone(), repeat_logit.grad.clone()])
        assert results[0][3] != 0
        for other in results[1:]:
            for expected, got in zip(results[0], other):
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_modes_and_text_overrides():
    video_text, comment_text, _ = _tables()
    id_only = LSVCRModel(ModelConfig(mode="id", max_position=10), NUM_VIDEOS, None, None).eval()
    assert torch.isfinite(id_only.score_videos(_batch())[:, 1:]).all()
    with pytest.raises(ConfigError):
        id_only.comment_candidate_vectors(torch.tensor([1]))
    assert id_only.id_text_contrastive_loss(_batch()) == 0
    with pytest.raises(ConfigError):
        LSVCRModel(ModelConfig(mode="text"), NUM_VIDEOS, None, None)
    text_only = _model("text")
    assert not hasattr(text_only, "video_embedding")
    # Overrides: the same tables give the same scores; a live table receives gradients (stage 1).
    batch = _batch()
    live_video = video_text.clone().requires_grad_(True)
    live_comment = comment_text.clone().requires_grad_(True)
    scores = text_only.score_comments(batch, CURRENT, COMMENT_CANDIDATES, video_text=live_video, comment_text=live_comment)
    assert torch.allclose(scores, text_only.score_comments(batch, CURRENT, COMMENT_CANDIDATES))
    scores[torch.isfinite(scores)].sum().backward()
    assert live_video.grad.abs().sum() > 0 and live_comment.grad.abs().sum() > 0
    # stage-1 random positions: a sorted subset of range(max_position)
    positions = text_only._positions(4, True, torch.device("cpu"))
    assert positions.tolist() == sorted(set(positions.tolist())) and positions.max() < 10
    text_only.train()
    assert torch.isfinite(text_only.encode_histories(batch, random_positions=True).video_states).all()


def test_gate_and_init():
    model = _model()
    assert model.gate.item() == 1.0
    assert abs(model.video_embedding.weight.std().item() - 0.02) < 0.005
    assert model.video_text.requires_grad is False
    assert "video_text" not in model.state_dict()  # frozen buffers are not checkpointed


def test_single_branch_outputs_match_both():
    """The video task needs H^v only, the comment task H^c only: skipping the other is exact."""
    model = _model()
    batch = _batch()
    both = model.encode_histories(batch)
    video_only = model.encode_histories(batch, outputs=("video",))
    comment_only = model.encode_histories(batch, outputs=("comment",))
    assert video_only.comment_states is None and comment_only.video_states is None
    assert torch.allclose(video_only.video_states, both.video_states)
    assert torch.allclose(comment_only.comment_states, both.comment_states)
    assert torch.allclose(model.score_videos(batch), model.score_videos(batch, states=both))


def test_comment_like_prior_adds_a_learned_bias_per_comment():
    """w * z(log1p(likes)) is added to the comment logits; at w = 0 (as constructed) the scores are the paper's."""
    with_prior, without = _model(), _model(like_prior=False)
    without.load_state_dict(with_prior.state_dict(), strict=False)
    batch = _batch()
    base = with_prior.score_comments(batch, CURRENT, COMMENT_CANDIDATES)
    assert torch.equal(base, without.score_comments(batch, CURRENT, COMMENT_CANDIDATES))
    with torch.no_grad():
        with_prior.comment_like_weight.fill_(0.1)
    shifted = with_prior.score_comments(batch, CURRENT, COMMENT_CANDIDATES)
    logged = torch.log1p(_tables()[2].double())
    z_scores = ((logged - logged[1:].mean()) / logged[1:].std()).float()
    expected = base + LIKE_PRIOR_RATE * 0.1 * z_scores[COMMENT_CANDIDATES]
    finite = torch.isfinite(base)
    assert torch.equal(finite, torch.isfinite(shifted)) and (COMMENT_CANDIDATES[~finite] == 0).all()
    assert torch.allclose(shifted[finite], expected[finite], atol=1e-5)
    shifted[finite].sum().backward()
    assert with_prior.comment_like_weight.grad.abs() > 0
    video_text, comment_text, comment_likes = _tables()
    with pytest.raises(ConfigError, match="like counts"):
        LSVCRModel(ModelConfig(max_position=10, comment_like_prior=True), NUM_VIDEOS, video_text, comment_text)
    with pytest.raises(DataError, match="like counts have 5 rows"):
        LSVCRModel(ModelConfig(max_position=10, comment_like_prior=True), NUM_VIDEOS, video_text, comment_text,
                   comment_likes[:5])
    assert not hasattr(_model("text", like_prior=False), "comment_like_weight")


@pytest.mark.parametrize("mode, text_mlp", [("id+text", False), ("text", False), ("id", False), ("id+text", True)])
def test_precomputed_item_tables_give_the_per_request_scores(mode, text_mlp):
    """Serving looks history tokens and the candidate pool's comment vectors up in `item_tables` (computed
    once; only the pooled comments, records' comments per request); the scores equal the per-request
    path's to float tolerance, in every mode and with an llm_emb_mlp."""
    torch.manual_seed(0)
    config = ModelConfig(mode=mode, max_position=10, comment_like_prior=True,
                         text_mlp_dim=TEXT_DIM // 2 if text_mlp else 256)
    model = LSVCRModel(config, NUM_VIDEOS, *_tables()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))  # gate, biases, like weight away from their init
    batch = _batch()
    hot_comment = torch.arange(NUM_VIDEOS + 1) % (NUM_COMMENTS + 1)
    batch.video_history_hot_comment = hot_comment[batch.video_history]
    pool = torch.unique(COMMENT_CANDIDATES[COMMENT_CANDIDATES > 0])  # the only comments the tables hold
    pool_rows = torch.where(COMMENT_CANDIDATES > 0, torch.searchsorted(pool, COMMENT_CANDIDATES) + 1, 0)
    tables = model.item_tables(hot_comment, pool, block_rows=2)  # several blocks
    assert tables.record_comment is None
    assert mode == "id" or tables.comment_candidate.shape[0] == len(pool) + 1
    with torch.inference_mode():
        for outputs in (("video",), ("comment",)):
            per_request = model.encode_histories(batch, outputs=outputs)
            precomputed = model.encode_histories(batch, outputs=outputs, tables=tables)
            for name in ("video_states", "comment_states"):
                if getattr(per_request, name) is not None:
                    torch.testing.assert_close(getattr(precomputed, name), getattr(per_request, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.score_videos(batch, states=model.encode_histories(batch, outputs=("video",), tables=tables)),
                                   model.score_videos(batch), atol=1e-4, rtol=1e-5)
        if mode != "id":
            torch.testing.assert_close(model.score_comments(batch, CURRENT, COMMENT_CANDIDATES, tables=tables,
                                                            candidate_rows=pool_rows),
                                       model.score_comments(batch, CURRENT, COMMENT_CANDIDATES), atol=1e-4, rtol=1e-5)


def test_text_only_untrained_videos_scores_them_by_their_text_and_never_trains_their_ids():
    paper, text_only = _paper_and_extended("video_has_id", text_only_untrained_videos=True)
    batch = _batch()
    torch.testing.assert_close(text_only.score_videos(batch), paper.score_videos(batch))  # every video keeps its ID

    untrained = [3, 17, 29]  # 3 is in row 0's history, 17 and 29 only candidates
    trained = torch.ones(NUM_VIDEOS + 1, dtype=torch.bool)
    trained[untrained] = False
    text_only.keep_ids_of(trained)
    video_text = text_only.video_text
    for video in range(1, NUM_VIDEOS + 1):
        candidate = text_only.video_candidate_raw(torch.tensor([video]))
        title = text_only.adapt_text(video_text, torch.tensor([video]))
        if video in untrained:
            torch.testing.assert_close(candidate, title)  # A(title) alone
        else:
            torch.testing.assert_close(candidate, paper.video_candidate_raw(torch.tensor([video])))

    # Their ID rows move no score, in a history or as a candidate, per request or through the serving tables.
    before = text_only.score_videos(batch)
    with torch.no_grad():
        text_only.video_embedding.weight[untrained] = torch.randn(len(untrained), text_only.config.hidden_size)
    torch.testing.assert_close(text_only.score_videos(batch), before)
    hot_comment = torch.arange(NUM_VIDEOS + 1) % (NUM_COMMENTS + 1)
    served = dataclasses.replace(batch, video_history_hot_comment=hot_comment[batch.video_history])
    tables = text_only.item_tables(hot_comment)
    torch.testing.assert_close(text_only.score_videos(served, states=text_only.encode_histories(served, outputs=("video",),
                                                                                                tables=tables)),
                               text_only.score_videos(served), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        text_only.video_embedding.weight[5] += 1.0  # a trained video's ID does count
    assert not torch.allclose(text_only.score_videos(batch), before)

    # Training is the paper's: there every video has its ID (the untrained ones get theirs pushed down as negatives),
    # and the mask is saved with the model and loaded back.
    text_only.train()
    torch.testing.assert_close(text_only.video_candidate_raw(torch.tensor(untrained)),
                               text_only.gate * text_only.video_embedding.weight[untrained]
                               + text_only.adapt_text(video_text, torch.tensor(untrained)))
    states = text_only.encode_histories(batch, outputs=("video",))
    text_only.video_cross_entropy(text_only.video_user_vector(states), torch.tensor([5, 6, 8])).backward()
    assert (text_only.video_embedding.weight.grad.norm(dim=1)[untrained] > 0).all()
    reloaded = LSVCRModel(text_only.config, NUM_VIDEOS, *_tables())
    reloaded.load_state_dict(text_only.state_dict())
    assert torch.equal(reloaded.video_has_id, trained)
    with pytest.raises(DataError, match="expected \\(31,\\)"):
        reloaded.keep_ids_of(torch.ones(NUM_VIDEOS, dtype=torch.bool))

