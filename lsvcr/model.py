"""The LSVCR sequential-recommendation backbone (`RecCom`, METHOD §2), in one file.

Read top to bottom: building blocks (attention, Transformer layer, encoder, additive pooling), the
batch/state containers, then `LSVCRModel`:

    history items ── item representation (§2.2) ── + gate·ID + position ── LN ── dropout
        video branch:   causal Transformer ─┐                           ┌─ p_linear ── H^v ── F_v (pool) → u_v
                                            ├─ mix cross-attention (§2.4)┤
        comment branch: causal Transformer ─┘                           └─ c_linear ── H^c ── F_c (target attn) → u_c
    scores = cos(user vector, candidate vector) / τ   (§2.7)

Padding (index 0) is masked with an "-inf-safe" rule: masked keys get the most negative finite
logit and the softmax weights are multiplied by the key mask afterwards, so a row whose keys are all
padding (e.g. a user with an empty comment history) gets exactly zero attention output, never NaN and
never a contribution from a pad slot.

Modes (`ModelConfig.mode`): `id+text` (stage 2 default), `text` (no ID embeddings, also stage 1),
`id` (no text at all: item representation = ID embedding; a SASRec-class model for video-only data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsvcr.batching import HistoryBatch  # noqa: F401 - the model's input; defined with the batches
from lsvcr.config import ModelConfig
from lsvcr.errors import ConfigError, DataError


# ----------------------------------------------------------------------------- building blocks


TEXT_MLP_HIDDEN = 1024  # llm_emb_mlp's inner width (METHOD 3: 4096 -> 1024 -> 256 for ChatGLM3)


def text_mlp(input_dim: int, output_dim: int, hidden: int = TEXT_MLP_HIDDEN) -> nn.Sequential:
    """`llm_emb_mlp` (METHOD 3, 4.4): Linear(input -> hidden) -> GELU -> Linear(hidden -> output)."""
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU(), nn.Linear(hidden, output_dim))


# The like-prior weight must travel O(1) in logit units while Adam moves every parameter ~lr per step;
# scaling it in the forward pass gives it this many times the learning rate of the other weights.
LIKE_PRIOR_RATE = 30.0


def like_prior(comment_likes: Tensor) -> Tensor:
    """z-scored log1p(like count) over the real comments [C+1] (row 0, the pad, = 0)."""
    logged = torch.log1p(comment_likes.double().clamp(min=0))
    real = logged[1:]
    if real.numel() < 2:
        return torch.zeros_like(logged, dtype=torch.float32)
    prior = (logged - real.mean()) / real.std().clamp(min=1e-6)
    prior[0] = 0.0
    return prior.float()


def masked_softmax(scores: Tensor, key_mask: Tensor) -> Tensor:
    """Softmax over the last axis where `key_mask` is False gets exactly 0 weight.

    A row with no valid key returns all zeros (not NaN, not a uniform spread over padding).
    """
    # Masked keys get exactly 0 weight (exp underflows to 0 next to any valid key) ...
    weights = torch.softmax(scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min), dim=-1)
    has_key = key_mask.any(dim=-1, keepdim=True)
    if has_key.all():
        return weights
    # ... and rows without any valid key (e.g. an empty history) are zeroed instead of spread over padding.
    return weights * has_key.to(weights.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout with the same semantics; on CPU the mask comes from `rand_like`, about twice as fast as
    the `bernoulli_` that F.dropout draws (dropout was a fifth of a CPU training step)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return x * ((torch.rand_like(x) >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p)))


class MultiHeadAttention(nn.Module):
    """RecBole-style attention block: `LN(Dropout(W_o·MHA(Q=h, K=V=kv)) + h)` (METHOD 2.3)."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float, hidden_dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_dropout = Dropout(attn_dropout)
        self.out = nn.Linear(hidden, hidden)
        self.out_dropout = Dropout(hidden_dropout)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)

    def _split(self, x: Tensor) -> Tensor:  # [B, L, H] -> [B, heads, L, head_dim]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: Tensor, key_value: Tensor, attention_mask: Tensor) -> Tensor:
        """hidden [B, Lq, H], key_value [B, Lk, H], attention_mask bool [B, Lq, Lk] (True = may attend)."""
        q, k, v = self._split(self.query(hidden)), self._split(self.key(key_value)), self._split(self.value(key_value))
        if not self.training:
            # Inference (validation, evaluation, serving): one fused kernel, the same values as the lines below
            # (a query row without any key gets a zero context, as masked_softmax gives it); about 6% of a
            # served request's CPU.
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None])
            return self.layer_norm(self.out(context.transpose(1, 2).reshape(hidden.shape)) + hidden)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        weights = self.attn_dropout(masked_softmax(scores, attention_mask[:, None]))
        context = (weights @ v).transpose(1, 2).reshape(hidden.shape)
        return self.layer_norm(self.out_dropout(self.out(context)) + hidden)


class FeedForward(nn.Module):
    """`LN(Dropout(W2·GELU(W1 h)) + h)` with the erf GELU (METHOD 2.1)."""

    def __init__(self, hidden: int, inner: int, hidden_dropout: float, eps: float):
        super().__init__()
        self.dense_in = nn.Linear(hidden, inner)
        self.dense_out = nn.Linear(inner, hidden)
        self.dropout = Dropout(hidden_dropout)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.layer_norm(self.dropout(self.dense_out(F.gelu(self.dense_in(hidden)))) + hidden)


class TransformerLayer(nn.Module):
    """One post-LN layer: attention (queries `hidden`, keys/values `key_value`) then feed-forward."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = MultiHeadAttention(
            config.hidden_size, config.num_heads, config.attn_dropout, config.hidden_dropout, config.layer_norm_eps
        )
        self.feed_forward = FeedForward(config.hidden_size, config.inner_size, config.hidden_dropout, config.layer_norm_eps)

    def forward(self, hidden: Tensor, key_value: Tensor, attention_mask: Tensor) -> Tensor:
        return self.feed_forward(self.attention(hidden, key_value, attention_mask))


class TransformerEncoder(nn.Module):
    """A stack of layers. `stacking="faithful"` reproduces the official code's quirk (METHOD 2.3):
    every layer's keys/values are the *input embeddings*; `"standard"` is SASRec stacking
    (layer l attends over layer l-1's output)."""

    def __init__(self, config: ModelConfig, num_layers: int):
        super().__init__()
        self.stacking = config.stacking
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(num_layers))

    def forward(self, embeddings: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = embeddings
        for layer in self.layers:
            key_value = embeddings if self.stacking == "faithful" else hidden
            hidden = layer(hidden, key_value, attention_mask)
        return hidden


class AdditiveAttention(nn.Module):
    """F_v (METHOD 2.5): w_i = softmax_i(Linear(2H→1)(GELU(LN(Dropout(Linear(H→2H)(h_i)))))), u = Σ w_i h_i.

    `recency_positions` > 0 (model.pooling_recency_bias, not the paper's) adds a learned logit b[d] per
    distance d from the latest item (d = real items after i). Positions are left-aligned and the states causal,
    so without it a state cannot tell whether it is the latest item unless the window is full."""

    def __init__(self, hidden: int, dropout: float, eps: float, recency_positions: int = 0):
        super().__init__()
        self.project = nn.Linear(hidden, 2 * hidden)
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(2 * hidden, eps=eps)
        self.score = nn.Linear(2 * hidden, 1)
        self.recency_bias = nn.Parameter(torch.zeros(recency_positions)) if recency_positions else None

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        logits = self._logits(hidden)
        if self.recency_bias is not None:
            items_so_far = mask.long().cumsum(1)
            logits = logits + self._recency(items_so_far[:, -1:] - items_so_far)
        weights = masked_softmax(logits, mask)
        return (weights.unsqueeze(-1) * hidden).sum(dim=1)

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.score(F.gelu(self.layer_norm(self.dropout(self.project(hidden))))).squeeze(-1)

    def _recency(self, items_after: Tensor) -> Tensor:
        return self.recency_bias[items_after.clamp(0, self.recency_bias.shape[0] - 1)]

    def every_prefix(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """[B, L, H]: row j pools positions 0..j only. A position's weight logit depends on its own state
        (and, with the recency bias, on the real items in (i, j]), so with causal states row j equals `forward`
        on the history cut after position j."""
        length = hidden.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        logits = self._logits(hidden)[:, None, :].expand(-1, length, -1)
        if self.recency_bias is not None:
            items_so_far = mask.long().cumsum(1)
            logits = logits + self._recency(items_so_far[:, :, None] - items_so_far[:, None, :])
        return masked_softmax(logits, causal[None] & mask[:, None, :]) @ hidden


# ----------------------------------------------------------------------------- containers


@dataclass
class HistoryStates:
    """Output of `encode_histories`: the fused H^v, H^c and their masks, plus the item text vectors
    (pc_merge outputs before position/gate/LN) that L_IT contrasts with the ID embeddings."""

    video_states: Tensor | None  # H^v [B, Lv, H] (None if not asked for)
    video_mask: Tensor  # [B, Lv] bool
    comment_states: Tensor | None  # H^c [B, Lc, H]
    comment_mask: Tensor  # [B, Lc] bool
    video_item_text: Tensor | None  # x_i [B, Lv, H] (None in `id` mode)
    comment_item_text: Tensor | None  # y_j [B, Lc, H]


CANDIDATE_BLOCK_ROWS = 1 << 18  # candidate comments projected at a time (KuaiComt: 8M pooled comments)


@dataclass
class ItemTables:
    """The item-side terms of `encode_histories` and of comment scoring, computed once per serving replica
    (`LSVCRModel.item_tables`): every video, and only the comments a replica ranks (each video's candidate
    pool), not every comment. Each row is exactly what the per-request path computes for that item, up to
    float summation order, because pc_merge and A are linear.

    video_token[v]   = gate·E_id[v] + pc_merge([A(title v); A(hot comment v)])   (the history token, per mode)
    record_video[v]  = gate·E_id[v] + W_title·A(title v) + b   (a comment record's video part; pc_merge = [W_title W_comment], b)
    record_comment[c] = W_comment·A(comment c), averaged over a record's comments; None: computed per request
                        from the (memory-mapped) text table, for the few comments of the request's records
    comment_candidate[1 + j] = normalize(A(candidate comment j)); row 0 is the padding
    """

    video_token: Tensor  # [V+1, H]
    record_video: Tensor  # [V+1, H]
    record_comment: Tensor | None  # [C+1, H]
    comment_candidate: Tensor | None  # [P+1, H] (P candidate comments); None in `id` mode or without candidates


# ----------------------------------------------------------------------------- the model


class LSVCRModel(nn.Module):
    """RecCom (METHOD §2). Text tables are frozen buffers [V+1, D] / [C+1, D] with row 0 = zeros;
    every method that reads text accepts `video_text=` / `comment_text=` overrides so stage-1 LoRA
    alignment can pass tables computed live by the LLM (with gradients)."""

    def __init__(
        self,
        config: ModelConfig,
        num_videos: int,
        video_text: Tensor | None = None,
        comment_text: Tensor | None = None,
        comment_likes: Tensor | None = None,
    ):
        super().__init__()
        if config.mode not in ("id+text", "text", "id"):
            raise ConfigError(f"model.mode must be id+text, text or id; got {config.mode!r}")
        self.config = config
        self.num_videos = num_videos
        self.use_id = config.mode in ("id+text", "id")
        self.use_text = config.mode in ("id+text", "text")
        hidden = config.hidden_size

        text_dim = 0
        if self.use_text:
            if video_text is None:
                raise ConfigError(f"model.mode={config.mode} needs video text vectors (got none)")
            if video_text.shape[0] != num_videos + 1:
                raise DataError(
                    f"video text table has {video_text.shape[0]} rows; expected num_videos+1 = {num_videos + 1}"
                )
            text_dim = video_text.shape[1]
            if comment_text is None:  # video-only data: every comment index is padding
                comment_text = torch.zeros(1, text_dim)
                comment_likes = torch.zeros(1)
            if comment_text.shape[1] != text_dim:
                raise DataError(f"comment text dim {comment_text.shape[1]} != video text dim {text_dim}")
            # Kept as given, never copied or written: the tables may be read-only memory maps shared by every
            # process of a node (float32 or float16); rows become float32 when a batch gathers them.
            self.register_buffer("video_text", video_text, persistent=False)
            self.register_buffer("comment_text", comment_text, persistent=False)
            adapter_input = text_dim
            if text_dim > config.text_mlp_dim:  # raw LLM vectors: a fresh llm_emb_mlp first (METHOD 7.3)
                self.text_mlp = text_mlp(text_dim, config.text_mlp_dim)
                adapter_input = config.text_mlp_dim
            self.llm_adapter = nn.Linear(adapter_input, hidden, bias=False)
            self.pc_merge = nn.Linear(2 * hidden, hidden)
        else:
            self.video_text = None
            self.comment_text = None
        if not hasattr(self, "text_mlp"):
            self.text_mlp = None
        self.text_dim = text_dim
        self.use_like_prior = self.use_text and config.comment_like_prior
        if self.use_like_prior:
            if comment_likes is None:
                raise ConfigError("model.comment_like_prior=true needs the comments' like counts (comment_likes)")
            if comment_likes.shape[0] != self.comment_text.shape[0]:
                raise DataError(f"comment like counts have {comment_likes.shape[0]} rows; "
                                f"the comment text table has {self.comment_text.shape[0]}")
            self.register_buffer("comment_prior", like_prior(comment_likes), persistent=False)
            self.comment_like_weight = nn.Parameter(torch.tensor(0.0))

        if self.use_id:
            self.video_embedding = nn.Embedding(num_videos + 1, hidden)
            self.gate = nn.Parameter(torch.tensor(1.0))
        if config.text_only_untrained_videos:  # saved with the model; set from the training split (`keep_ids_of`)
            self.register_buffer("video_has_id", torch.ones(num_videos + 1, dtype=torch.bool))

        self.video_position = nn.Embedding(config.max_position, hidden)
        self.comment_position = nn.Embedding(config.max_position, hidden)
        self.video_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.comment_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)

        self.video_encoder = TransformerEncoder(config, config.num_layers)
        self.comment_encoder = TransformerEncoder(config, config.num_layers)
        self.video_mix = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_mix_layers))
        self.comment_mix = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_mix_layers))
        self.p_linear = nn.Linear(2 * hidden, hidden)
        self.c_linear = nn.Linear(2 * hidden, hidden)

        self.video_pooling = AdditiveAttention(hidden, config.hidden_dropout, config.layer_norm_eps,
                                               config.max_position if config.pooling_recency_bias else 0)
        self.use_repeat_logit = config.repeat_logit
        if self.use_repeat_logit:
            self.repeat_logit = nn.Parameter(torch.tensor(0.0))
        self.target_attention = MultiHeadAttention(
            hidden, config.num_heads, config.attn_dropout, config.hidden_dropout, config.layer_norm_eps
        )
        self.apply(self._init_weights)
        if self.use_id:
            with torch.no_grad():
                self.gate.fill_(1.0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) for Linear/Embedding (the pad row too, as in the official code), LN = (1, 0)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    # ------------------------------------------------------------------ item representations (§2.2)

    def _tables(self, video_text: Tensor | None, comment_text: Tensor | None) -> tuple[Tensor, Tensor]:
        return (
            self.video_text if video_text is None else video_text,
            self.comment_text if comment_text is None else comment_text,
        )

    def _gated_id(self, video_idx: Tensor) -> Tensor:
        """gate·E_id[v]; at inference with model.text_only_untrained_videos, zero for a video never a training target."""
        ids = self.gate * self.video_embedding(video_idx)
        if self.training or not hasattr(self, "video_has_id"):
            return ids
        return ids * self.video_has_id[video_idx].unsqueeze(-1).to(ids.dtype)

    def keep_ids_of(self, trained: Tensor) -> None:
        """model.text_only_untrained_videos: `trained` [V+1] bool marks the videos that keep their ID embedding at
        inference (those that are a training target); every other video is then represented by its text alone."""
        if trained.shape != (self.num_videos + 1,):
            raise DataError(f"the trained-video mask has shape {tuple(trained.shape)}; expected ({self.num_videos + 1},)")
        self.video_has_id.copy_(trained.to(torch.bool))
        self.video_has_id[0] = True  # the pad

    @staticmethod
    def _used_rows(index: Tensor) -> tuple[Tensor, Tensor]:
        """(distinct ids of `index`, 0 first; `index` re-expressed as positions in that list)."""
        with_pad = torch.cat([index.new_zeros(1), index.flatten()])  # the pad id 0 is always used row 0
        used, remapped = torch.unique(with_pad, return_inverse=True)
        return used, remapped[1:].view(index.shape)

    def _mlp(self, vectors: Tensor, keep: Tensor) -> Tensor:
        """llm_emb_mlp of raw vectors (identity without one); rows where `keep` is False stay zeros (padding)."""
        if self.text_mlp is None:
            return vectors
        return self.text_mlp(vectors) * keep.unsqueeze(-1).to(vectors.dtype)

    def project_text(self, vectors: Tensor) -> Tensor:
        """A(llm_emb_mlp(vectors)) of real (non-pad) item vectors [N, D] → [N, H] (e.g. cold-start items)."""
        return self.llm_adapter(self._mlp(vectors, torch.ones(vectors.shape[:-1], dtype=torch.bool,
                                                              device=vectors.device)))

    def _adapted_rows(self, table: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(A(table[used rows]), index into them). A is linear, so projecting only the distinct rows a
        batch uses gives the same values as A(table)[index] at a fraction of the cost of either
        projecting the whole table or every lookup (a batch repeats popular items many times)."""
        used, remapped = self._used_rows(index)
        return self.llm_adapter(self._mlp(table[used].float(), used != 0)), remapped

    def adapt_text(self, table: Tensor, index: Tensor) -> Tensor:
        """A(table[index]) [..., H]."""
        rows, remapped = self._adapted_rows(table, index)
        return F.embedding(remapped, rows)

    def adapt_text_mean(self, table: Tensor, index: Tensor) -> Tensor:
        """A(mean of table[index] over the last axis, pad entries excluded) [..., H]; all-pad → zeros.
        A commutes with the mean; `embedding_bag` never materialises the [..., K, H] gather. With an
        llm_emb_mlp the raw vectors are averaged first and the mean goes through it (the official
        scatter_mean, then the MLP). The MLP runs once per distinct bag: a batch repeats records (one user's
        samples share most of their history) and padding bags (about 5x fewer rows on the demo data)."""
        if self.text_mlp is not None:
            used, remapped = self._used_rows(index)
            bags, bag_of_row = torch.unique(remapped.reshape(-1, index.shape[-1]), dim=0, return_inverse=True)
            raw_mean = F.embedding_bag(bags, table[used].float(), mode="mean", padding_idx=0)
            projected = self.llm_adapter(self._mlp(raw_mean, (bags != 0).any(dim=-1)))
            return projected[bag_of_row].view(*index.shape[:-1], -1)
        rows, remapped = self._adapted_rows(table, index)
        mean = F.embedding_bag(remapped.reshape(-1, index.shape[-1]), rows, mode="mean", padding_idx=0)
        return mean.view(*index.shape[:-1], -1)

    def video_item_text(self, video_idx: Tensor, hot_comment: Tensor, video_text=None, comment_text=None) -> Tensor:
        """x_i = pc_merge([A(title(v_i)); A(hot comment of v_i)]); comment 0 gives a zero vector."""
        video_text, comment_text = self._tables(video_text, comment_text)
        title = self.adapt_text(video_text, video_idx)
        comment = self.adapt_text(comment_text, hot_comment)
        return self.pc_merge(torch.cat([title, comment], dim=-1))

    def comment_record_text(self, video_idx: Tensor, comments: Tensor, video_text=None, comment_text=None) -> Tensor:
        """y_j = pc_merge([A(title(v_j)); A(mean of the record's non-pad comments)]); none → zero vector."""
        video_text, comment_text = self._tables(video_text, comment_text)
        title = self.adapt_text(video_text, video_idx)
        return self.pc_merge(torch.cat([title, self.adapt_text_mean(comment_text, comments)], dim=-1))

    def _positions(self, length: int, random_positions: bool, device: torch.device) -> Tensor:
        """Stage 2: 0..L-1 (left-aligned). Stage 1: a random sorted subset of range(max_position) (§2.2)."""
        if length > self.config.max_position:
            raise DataError(
                f"history of length {length} exceeds model.max_position={self.config.max_position}; "
                "truncate it (finetune.history_length)"
            )
        if random_positions:
            return torch.randperm(self.config.max_position, device=device)[:length].sort().values
        return torch.arange(length, device=device)

    def _history_tokens(self, item_text: Tensor | None, video_idx: Tensor) -> Tensor:
        """gate·E_id[v] + item text, per mode (before position and LN)."""
        if self.config.mode == "id+text":
            return self._gated_id(video_idx) + item_text
        if self.config.mode == "id":
            return self._gated_id(video_idx)
        return item_text

    def _branch_input(self, tokens: Tensor, position: nn.Embedding, layer_norm: nn.LayerNorm,
                      random_positions: bool) -> Tensor:
        tokens = tokens + position(self._positions(tokens.shape[1], random_positions, tokens.device))
        return self.dropout(layer_norm(tokens))

    @torch.inference_mode()
    def item_tables(self, hot_comment: Tensor, candidate_comments: Tensor | None = None,
                    block_rows: int = CANDIDATE_BLOCK_ROWS, record_comments: bool = False) -> ItemTables:
        """`ItemTables` of every video (row = video_idx; `hot_comment[v]` = the comment_idx its history
        token uses) and of the `candidate_comments` (comment_idx [P]; row 1 + j; None: no comment ranking),
        with the frozen text tables. History records' comments stay in the text table (record_comment None):
        a replica reads only the rows its requests name, so it never holds a vector per comment ever written;
        `record_comments` projects every comment once instead (`comment_record_table`: a replica that can hold
        it saves the per-request projection). Tables are projected `block_rows` at a time (KuaiComt: 8M pooled
        comments)."""
        all_videos = torch.arange(self.num_videos + 1, device=self.video_position.weight.device)
        if not self.use_text:
            ids = self._gated_id(all_videos)
            return ItemTables(video_token=ids, record_video=ids, record_comment=None, comment_candidate=None)
        hidden = self.config.hidden_size
        titles = self.adapt_text(self.video_text, all_videos)
        record_video = self._history_tokens(F.linear(titles, self.pc_merge.weight[:, :hidden], self.pc_merge.bias), all_videos)
        return ItemTables(
            video_token=self._history_tokens(self.video_item_text(all_videos, hot_comment.to(all_videos.device)), all_videos),
            record_video=record_video,
            record_comment=self.comment_record_table(block_rows) if record_comments else None,
            comment_candidate=None if candidate_comments is None else self.comment_candidate_table(candidate_comments, block_rows),
        )

    def records_precompute_exactly(self) -> bool:
        """Whether a record's comment term can come from a per-comment table: A and pc_merge are linear, so the
        mean of projected comments is the projection of their mean; an llm_emb_mlp (non-linear) averages the raw
        vectors first, so it cannot."""
        return self.use_text and self.text_mlp is None

    @torch.inference_mode()
    def comment_record_table(self, block_rows: int = CANDIDATE_BLOCK_ROWS) -> Tensor:
        """[C+1, H]: row c = W_comment·A(comment c) (the comment half of pc_merge, no bias), row 0 = zeros; the
        mean of a record's rows equals `adapt_text_mean` then W_comment (`records_precompute_exactly`)."""
        if not self.records_precompute_exactly():
            raise ConfigError("comment_record_table needs a text model without llm_emb_mlp (a linear comment path)")
        device = self.video_position.weight.device
        comment_weight = self.pc_merge.weight[:, self.config.hidden_size:]
        rows = len(self.comment_text)
        table = torch.empty(rows, self.config.hidden_size, device=device)
        for start in range(0, rows, block_rows):
            raw = self.comment_text[start:start + block_rows].to(device=device, dtype=torch.float32)
            table[start:start + len(raw)] = F.linear(self.llm_adapter(raw), comment_weight)
        table[0] = 0.0  # padding: embedding_bag skips it
        return table

    @torch.inference_mode()
    def comment_candidate_table(self, candidate_comments: Tensor, block_rows: int = CANDIDATE_BLOCK_ROWS) -> Tensor:
        """[P+1, H]: row 1 + j = normalize(A(comment candidate_comments[j])), row 0 = zeros (padding);
        projected `block_rows` at a time (KuaiComt: 8M pooled comments)."""
        device = self.video_position.weight.device
        with_pad = torch.cat([candidate_comments.new_zeros(1), candidate_comments]).long().to(device)
        table = torch.empty(len(with_pad), self.config.hidden_size, device=device)
        for start in range(0, len(with_pad), block_rows):
            block = with_pad[start:start + block_rows]
            table[start:start + len(block)] = F.normalize(self.adapt_text(self.comment_text, block), dim=-1)
        return table

    def _record_tokens_from_tables(self, tables: ItemTables, videos: Tensor, comments: Tensor) -> Tensor:
        """Comment-record history tokens [B, L, H] from `tables` (the per-request part is a mean of rows)."""
        tokens = F.embedding(videos, tables.record_video)
        if not self.use_text:
            return tokens
        if tables.record_comment is None:  # mean of the raw vectors of the records' comments, then (MLP and) A
            comment_mean = self.adapt_text_mean(self.comment_text, comments)
            return tokens + F.linear(comment_mean, self.pc_merge.weight[:, self.config.hidden_size:])
        bags = F.embedding_bag(comments.reshape(-1, comments.shape[-1]), tables.record_comment, mode="mean", padding_idx=0)
        return tokens + bags.view(*comments.shape[:-1], -1)

    # ------------------------------------------------------------------ history encoding (§2.3-2.4)

    @staticmethod
    def _causal_mask(mask: Tensor) -> Tensor:
        length = mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        return causal[None] & mask[:, None, :]

    def _mix(self, layers: nn.ModuleList, query: Tensor, key_value: Tensor, key_mask: Tensor) -> Tensor:
        """Cross-attention from one branch to the other (bidirectional, padding-masked). A row whose
        other history is empty gets a zero mix output: the other branch contributes nothing."""
        if not key_mask.any():  # e.g. video-only data: skip the layer, the result would be all zeros
            return torch.zeros_like(query)
        attention_mask = key_mask[:, None, :].expand(-1, query.shape[1], -1)
        mixed = query
        for layer in layers:
            mixed = layer(mixed, key_value, attention_mask)
        has_keys = key_mask.any(dim=1).to(mixed.dtype)[:, None, None]
        return mixed * has_keys

    def encode_histories(
        self,
        batch: HistoryBatch,
        *,
        random_positions: bool = False,
        video_text: Tensor | None = None,
        comment_text: Tensor | None = None,
        outputs: tuple[str, ...] = ("video", "comment"),
        tables: ItemTables | None = None,
    ) -> HistoryStates:
        """H^v and H^c. Both encoders always run (each branch's keys feed the other's mix layer), but
        a branch's own mix layer and output projection run only if it is in `outputs`: the video
        task needs H^v alone, the comment task H^c alone (stage 1 needs both). Skipped → None.
        With `tables` (serving) the history tokens are looked up, not computed: the hot comment of a
        history video is then the one the tables were built with, and the item texts are not returned."""
        video_mask = batch.video_history != 0
        comment_mask = batch.comment_history_videos != 0
        video_item_text = comment_item_text = None
        if tables is not None:
            video_tokens = F.embedding(batch.video_history, tables.video_token)
            comment_tokens = self._record_tokens_from_tables(tables, batch.comment_history_videos,
                                                             batch.comment_history_comments)
        else:
            if self.use_text:
                video_item_text = self.video_item_text(
                    batch.video_history, batch.video_history_hot_comment, video_text, comment_text
                )
                comment_item_text = self.comment_record_text(
                    batch.comment_history_videos, batch.comment_history_comments, video_text, comment_text
                )
            video_tokens = self._history_tokens(video_item_text, batch.video_history)
            comment_tokens = self._history_tokens(comment_item_text, batch.comment_history_videos)
        video_input = self._branch_input(video_tokens, self.video_position, self.video_layer_norm, random_positions)
        comment_input = self._branch_input(comment_tokens, self.comment_position, self.comment_layer_norm,
                                           random_positions)
        video_encoded = self.video_encoder(video_input, self._causal_mask(video_mask))
        comment_encoded = self.comment_encoder(comment_input, self._causal_mask(comment_mask))
        video_states = comment_states = None
        if "video" in outputs:
            video_mixed = self._mix(self.video_mix, video_encoded, comment_encoded, comment_mask)
            video_states = self.p_linear(torch.cat([video_encoded, video_mixed], dim=-1))
        if "comment" in outputs:
            comment_mixed = self._mix(self.comment_mix, comment_encoded, video_encoded, video_mask)
            comment_states = self.c_linear(torch.cat([comment_encoded, comment_mixed], dim=-1))
        return HistoryStates(
            video_states=video_states,
            video_mask=video_mask,
            comment_states=comment_states,
            comment_mask=comment_mask,
            video_item_text=video_item_text,
            comment_item_text=comment_item_text,
        )

    # ------------------------------------------------------------------ user vectors (§2.5-2.6)

    def pool_video(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """F_v: additive-attention pooling over all non-pad positions (zero vector if none)."""
        return self.video_pooling(hidden, mask)

    def current_video_query(self, current_video: Tensor, video_text: Tensor | None = None) -> Tensor:
        """q = gate·E_id[v_cur] + A(title(v_cur)) (title only, no pc_merge), per mode."""
        return self.video_candidate_raw(current_video, video_text)

    def target_attend(self, hidden: Tensor, mask: Tensor, current_video: Tensor, video_text: Tensor | None = None) -> Tensor:
        """F_c: u = LN(Dropout(W_o·MHA(Q=q, K=V=hidden)) + q) with q from the current video."""
        query = self.current_video_query(current_video, video_text).unsqueeze(1)
        return self.target_attention(query, hidden, mask[:, None, :]).squeeze(1)

    def video_user_vector(self, states: HistoryStates) -> Tensor:
        return self.pool_video(states.video_states, states.video_mask)

    def comment_user_vector(self, states: HistoryStates, current_video: Tensor, video_text: Tensor | None = None) -> Tensor:
        return self.target_attend(states.comment_states, states.comment_mask, current_video, video_text)

    # ------------------------------------------------------------------ candidates and scores (§2.7)

    def video_candidate_raw(self, video_idx: Tensor, video_text: Tensor | None = None) -> Tensor:
        """gate·E_id[v] + A(title(v)) (`text`: A(title); `id`: gate·E_id), not normalized."""
        vector = 0
        if self.use_id:
            vector = self._gated_id(video_idx)
        if self.use_text:
            vector = vector + self.adapt_text(self.video_text if video_text is None else video_text, video_idx)
        return vector

    def video_candidate_vectors(self, video_idx: Tensor | None = None, video_text: Tensor | None = None) -> Tensor:
        """L2-normalized candidate vectors; all rows 0..V when `video_idx` is None (row 0 is padding)."""
        if video_idx is None:
            video_idx = torch.arange(self.num_videos + 1, device=self.video_position.weight.device)
        return F.normalize(self.video_candidate_raw(video_idx, video_text), dim=-1)

    def comment_candidate_vectors(self, comment_idx: Tensor, comment_text: Tensor | None = None) -> Tensor:
        if not self.use_text:
            raise ConfigError("comment recommendation needs text vectors: model.mode=id has no comment representation")
        table = self.comment_text if comment_text is None else comment_text
        return F.normalize(self.adapt_text(table, comment_idx), dim=-1)

    def _cosine_logits(self, user: Tensor, candidates: Tensor) -> Tensor:
        """user [B, H]; candidates normalized [N, H] (shared) or [B, N, H] (per row) → [B, N]."""
        user = F.normalize(user, dim=-1) / self.config.temperature  # τ folded in: no extra pass over [B, N]
        if candidates.dim() == 2:
            return user @ candidates.T
        return (candidates @ user.unsqueeze(-1)).squeeze(-1)

    def score_videos(self, batch: HistoryBatch, candidates: Tensor | None = None, *, states: HistoryStates | None = None,
                     video_text: Tensor | None = None, comment_text: Tensor | None = None) -> Tensor:
        """Logits over `candidates` [B, N] (0 = padding → -inf), or over all videos [B, V+1] when None
        (column 0, the pad, is -inf)."""
        if states is None:
            states = self.encode_histories(batch, video_text=video_text, comment_text=comment_text, outputs=("video",))
        user = self.video_user_vector(states)
        if candidates is None:
            return self.add_repeat_logit(self.score_user_vectors(user, video_text), batch.video_history)
        logits = self._cosine_logits(user, self.video_candidate_vectors(candidates, video_text))
        if self.use_repeat_logit:
            logits = repeat_logit_on_candidates(logits, candidates, batch.video_history, self.repeat_logit)
        return logits.masked_fill(candidates == 0, float("-inf"))

    def add_repeat_logit(self, scores: Tensor, video_history: Tensor) -> Tensor:
        """`scores` [B, V+1] with the learned repeat logit on each row's history videos (model.repeat_logit)."""
        return add_repeat_logit(scores, video_history, self.repeat_logit) if self.use_repeat_logit else scores

    def score_user_vectors(self, user: Tensor, video_text: Tensor | None = None) -> Tensor:
        """Logits of user vectors [N, H] over all videos [N, V+1] (column 0, the pad, is -inf)."""
        return self._logits_over_videos(user, self.video_candidate_vectors(None, video_text))

    def _logits_over_videos(self, user: Tensor, candidates: Tensor) -> Tensor:
        logits = self._cosine_logits(user, candidates)
        logits[:, 0] = float("-inf")  # in place: the matmul's backward does not need its output
        return logits

    def video_cross_entropy(self, user: Tensor, targets: Tensor, max_logits_mb: float = 0.0,
                            video_text: Tensor | None = None, video_history: Tensor | None = None) -> Tensor:
        """Mean CE of user vectors [N, H] against their target videos [N] over all videos (METHOD 2.8), with
        the logits taken `max_logits_mb` at a time (`catalog_cross_entropy`). With model.repeat_logit the
        rows' histories [N, L] (0 = padding) are needed: their videos' logits get the repeat logit."""
        query = F.normalize(user, dim=-1) / self.config.temperature  # as in _cosine_logits
        repeats = catalog_repeats(video_history, self.repeat_logit) if self.use_repeat_logit else None
        return catalog_cross_entropy(query, self.video_candidate_vectors(None, video_text), targets, max_logits_mb,
                                     repeats)

    @staticmethod
    def prefix_histories(video_history: Tensor) -> Tensor:
        """[B, L] -> [B, L, L]: row j is the history cut after position j (later positions set to 0, padding),
        the history that `every_position_user_vectors` row j has seen."""
        length = video_history.shape[1]
        seen = torch.ones(length, length, dtype=torch.bool, device=video_history.device).tril()
        return video_history[:, None, :] * seen[None]

    def every_position_user_vectors(self, batch: HistoryBatch) -> Tensor:
        """[B, L, H]: position j's user vector is the video user vector of the history cut after position
        j (`finetune.train_targets: all_positions`). Exact for video-only data: the encoders are causal and
        F_v pools prefixes (`AdditiveAttention.every_prefix`); the comment cross-attention would see the
        whole comment history, so histories with comments are refused."""
        if bool((batch.comment_history_videos != 0).any()):
            raise ConfigError("finetune.train_targets=all_positions needs video-only histories (no comment "
                              "history: its cross-attention is not causal in the video history)")
        states = self.encode_histories(batch, outputs=("video",))
        return self.video_pooling.every_prefix(states.video_states, states.video_mask)

    def score_comments(self, batch: HistoryBatch, current_video: Tensor, candidates: Tensor, *,
                       states: HistoryStates | None = None, video_text: Tensor | None = None,
                       comment_text: Tensor | None = None, tables: ItemTables | None = None,
                       candidate_rows: Tensor | None = None) -> Tensor:
        """Logits over the comment candidates [B, N] of the current video (0 = padding → -inf).
        `tables`: history tokens and candidate vectors from precomputed `ItemTables` (serving), where
        `candidate_rows` [B, N] are the candidates' rows of `tables.comment_candidate`."""
        if states is None:
            states = self.encode_histories(batch, video_text=video_text, comment_text=comment_text,
                                           outputs=("comment",), tables=tables)
        user = self.comment_user_vector(states, current_video, video_text)
        if tables is not None and tables.comment_candidate is not None:
            if candidate_rows is None:
                raise ConfigError("score_comments with ItemTables needs candidate_rows (rows of comment_candidate)")
            candidate_vectors = F.embedding(candidate_rows, tables.comment_candidate)
        else:
            candidate_vectors = self.comment_candidate_vectors(candidates, comment_text)
        logits = self._cosine_logits(user, candidate_vectors)
        if self.use_like_prior:
            logits = logits + (LIKE_PRIOR_RATE * self.comment_like_weight) * self.comment_prior[candidates]
        return logits.masked_fill(candidates == 0, float("-inf"))

    # ------------------------------------------------------------------ L_IT (§2.8)

    def id_text_contrastive_loss(self, batch: HistoryBatch, states: HistoryStates | None = None,
                                 num_negatives: int = 99, negatives_shared_by: int = 1,
                                 independent_directions: bool = True) -> Tensor:
        """Symmetric InfoNCE between E_id[v] (no gate) and the pc_merge text vector of every non-pad
        history position, per history set, summed over the two sets. Each anchor gets `num_negatives`
        uniform in-batch negatives (with replacement; an anchor's own pair is never its negative; all
        others if fewer exist). `negatives_shared_by` consecutive anchors share one draw, which turns the
        [N, K, H] gather into one small matmul per block: 1 = independent draws, as in the official code.
        `independent_directions`: the id→text and text→id terms draw their negatives separately (the official
        code takes two disjoint sets of 99 from one rand+topk, METHOD 2.8); False reuses one draw for both."""
        if not (self.use_id and self.use_text):
            return self.video_position.weight.new_zeros(())
        if states is None:
            states = self.encode_histories(batch)
        loss = self.video_position.weight.new_zeros(())
        for video_idx, item_text, mask in (
            (batch.video_history, states.video_item_text, states.video_mask),
            (batch.comment_history_videos, states.comment_item_text, states.comment_mask),
        ):
            id_vectors = F.normalize(self.video_embedding(video_idx[mask]), dim=-1)
            text_vectors = F.normalize(item_text[mask], dim=-1)
            if id_vectors.shape[0] < 2:
                continue
            id_to_text = _negative_draws(id_vectors.shape[0], num_negatives, negatives_shared_by, id_vectors.device)
            text_to_id = (_negative_draws(id_vectors.shape[0], num_negatives, negatives_shared_by, id_vectors.device)
                          if independent_directions else id_to_text)
            loss = loss + 0.5 * (
                _sampled_info_nce(id_vectors, text_vectors, id_to_text, negatives_shared_by, self.config.temperature)
                + _sampled_info_nce(text_vectors, id_vectors, text_to_id, negatives_shared_by, self.config.temperature)
            )
        return loss


def _negative_draws(count: int, num_negatives: int, shared_by: int, device: torch.device) -> Tensor | None:
    """Indices [blocks, K] of the negatives of each block of `shared_by` anchors; None = use every other pair."""
    if count - 1 <= num_negatives:
        return None
    blocks = -(-count // shared_by)
    return torch.randint(0, count, (blocks, num_negatives), device=device)


def _sampled_info_nce(anchors: Tensor, targets: Tensor, negatives: Tensor | None, shared_by: int,
                      temperature: float) -> Tensor:
    """CE over [positive, negatives]: anchor n's positive is targets[n]; its negatives are the targets its
    block (anchors n // shared_by) drew (`negatives` [blocks, K]; a draw of its own index is masked out),
    or all other targets (None)."""
    count = anchors.shape[0]
    positive = (anchors * targets).sum(-1, keepdim=True)
    if negatives is None:  # few pairs: every other pair is a negative
        logits = anchors @ targets.T
        eye = torch.eye(count, dtype=torch.bool, device=anchors.device)
        negative_logits = logits[~eye].view(count, count - 1)
    else:
        blocks, num_negatives = negatives.shape
        padded = F.pad(anchors, (0, 0, 0, blocks * shared_by - count)).view(blocks, shared_by, -1)
        negative_logits = (padded @ targets[negatives].transpose(1, 2)).reshape(blocks * shared_by, num_negatives)
        own = torch.arange(blocks * shared_by, device=anchors.device).view(blocks, shared_by, 1)
        is_own = (negatives[:, None, :] == own).reshape(blocks * shared_by, num_negatives)
        negative_logits = negative_logits.masked_fill(is_own, float("-inf"))[:count]
    logits = torch.cat([positive, negative_logits], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(count, dtype=torch.long, device=anchors.device))


def distinct_history(video_history: Tensor) -> tuple[Tensor, Tensor]:
    """(videos [N, L], first [N, L] bool): each row's history sorted, and True at the first occurrence of each
    real video (False at repeats and padding), so that `scatter_add` of `first * repeat_logit` gives a video
    that recurs in a history the logit once."""
    videos = video_history.sort(dim=1).values
    first = torch.ones_like(videos, dtype=torch.bool)
    first[:, 1:] = videos[:, 1:] != videos[:, :-1]
    return videos, first & (videos != 0)


def catalog_repeats(video_history: Tensor | None, repeat_logit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`catalog_cross_entropy`'s repeats: (videos, first) of each row's history and the repeat logit."""
    if video_history is None:
        raise ConfigError("model.repeat_logit scores history videos differently: video_cross_entropy needs each "
                          "row's video_history")
    return (*distinct_history(video_history), repeat_logit)


def add_repeat_logit(scores: Tensor, video_history: Tensor, repeat_logit: Tensor) -> Tensor:
    """scores [B, V+1] over all videos plus `repeat_logit` on each row's history videos, once per video however
    often it recurs. In place unless gradients are being recorded (a [B, V+1] copy is 338 MB at KuaiComt size)."""
    videos, first = distinct_history(video_history)
    offsets = (first * repeat_logit).to(scores.dtype)
    if torch.is_grad_enabled():
        return scores.scatter_add(1, videos, offsets)
    return scores.scatter_add_(1, videos, offsets)


def repeat_logit_on_candidates(logits: Tensor, candidates: Tensor, video_history: Tensor,
                               repeat_logit: Tensor) -> Tensor:
    """logits [B, N] of `candidates` [B, N] plus `repeat_logit` where the candidate is in the row's history."""
    in_history = (candidates[:, :, None] == video_history[:, None, :]).any(dim=-1) & (candidates != 0)
    return logits + repeat_logit * in_history


class _CatalogCrossEntropyInChunks(torch.autograd.Function):
    """Mean CE of `query @ items.T` (column 0, the pad, excluded; plus the repeat offsets when given) against
    `targets`, `rows` queries at a time. Each chunk's gradients are taken right after its loss, while its logits
    are at hand (softmax minus the one-hot, times the other factor), so the backward pass only scales them: the
    same three matrix products as autograd's forward and backward, and only one chunk of logits alive at any
    time. The repeat logit's gradient is that difference summed where it was added."""

    @staticmethod
    def forward(ctx, query: Tensor, items: Tensor, targets: Tensor, rows: int, repeat_videos: Tensor | None,
                repeat_first: Tensor | None, repeat_logit: Tensor | None) -> Tensor:
        wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[6]
        grad_query = torch.empty_like(query) if wants_grad else None
        grad_items = torch.zeros_like(items) if wants_grad else None
        grad_repeat = query.new_zeros((), dtype=torch.float64) if repeat_videos is not None else None
        total = query.new_zeros((), dtype=torch.float64)
        for start in range(0, len(query), rows):
            query_rows, target_rows = query[start:start + rows], targets[start:start + rows]
            logits = _catalog_logits(query_rows, items)
            if repeat_videos is not None:
                chunk_videos, chunk_first = repeat_videos[start:start + rows], repeat_first[start:start + rows]
                logits.scatter_add_(1, chunk_videos, (chunk_first * repeat_logit).to(logits.dtype))
            log_normalizer = torch.logsumexp(logits, dim=1)
            total += (log_normalizer - logits.gather(1, target_rows[:, None]).squeeze(1)).sum(dtype=torch.float64)
            if wants_grad:
                softmax = logits.sub_(log_normalizer[:, None]).exp_()  # in place: the chunk's logits are done
                softmax[torch.arange(len(target_rows), device=softmax.device), target_rows] -= 1.0
                grad_query[start:start + rows] = softmax @ items
                grad_items.addmm_(softmax.T, query_rows)
                if repeat_videos is not None:
                    grad_repeat += (softmax.gather(1, chunk_videos) * chunk_first).sum(dtype=torch.float64)
        ctx.count = len(query)
        ctx.save_for_backward(grad_query, grad_items, grad_repeat)
        return (total / len(query)).to(query.dtype)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_query, grad_items, grad_repeat = ctx.saved_tensors
        scale = grad_loss / ctx.count
        return (None if grad_query is None else grad_query * scale,
                None if grad_items is None else grad_items * scale, None, None, None, None,
                None if grad_repeat is None else (grad_repeat * scale).to(grad_loss.dtype))


def catalog_cross_entropy(query: Tensor, items: Tensor, targets: Tensor, max_logits_mb: float = 0.0,
                          repeats: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Mean CE of the logits `query @ items.T` [N, V+1] (column 0, the pad, is never a class) against `targets`
    [N]: the loss over a whole catalog. `repeats`: (videos, first) from `distinct_history` and the repeat
    logit added at those videos (model.repeat_logit).

    The logits, their log-softmax and its gradient are N × (V+1) floats each (the video task at KuaiComt size:
    512 × 82,453 × 4 B = 161 MB apiece, most of a training step's memory). With `max_logits_mb` > 0 the rows
    are taken a chunk at a time so that a chunk's logits stay under that size, and each chunk's gradients
    are computed with its loss (`_CatalogCrossEntropyInChunks`): nothing of size N × (V+1) is kept, and there
    is no recomputation. Loss and gradients are the one-pass ones up to float summation order."""
    rows = max(1, int(max_logits_mb * 2**20 / (4 * items.shape[0])) if max_logits_mb > 0 else len(query))
    if len(query) == 0:  # as F.cross_entropy of no rows: NaN
        return F.cross_entropy(_catalog_logits(query, items), targets)
    if rows >= len(query) or not torch.is_grad_enabled():
        return sum(F.cross_entropy(_catalog_logits(query[start:start + rows], items, repeats, start, rows),
                                   targets[start:start + rows], reduction="sum")
                   for start in range(0, len(query), rows)) / len(query)
    return _CatalogCrossEntropyInChunks.apply(query, items, targets, rows, *(repeats or (None, None, None)))


def _catalog_logits(query: Tensor, items: Tensor, repeats: tuple[Tensor, Tensor, Tensor] | None = None,
                    start: int = 0, rows: int = 0) -> Tensor:
    logits = query @ items.T
    logits[:, 0] = float("-inf")  # in place: the matmul's backward does not need its output
    if repeats is None:
        return logits
    videos, first, repeat_logit = repeats
    offsets = (first[start:start + rows] * repeat_logit).to(logits.dtype)
    return logits.scatter_add(1, videos[start:start + rows], offsets)


def count_parameters(model: nn.Module, exclude_id_table: bool = True) -> int:
    return sum(
        p.numel() for name, p in model.named_parameters() if not (exclude_id_table and name == "video_embedding.weight")
    )
