"""Reference baselines under the same data and evaluation protocol as LSVCR (METHOD 9.10).

- `SASRec`: ID-only self-attentive sequential recommender (Kang & McAuley 2018, RecBole's sasrec.py
  flavour): item + position embeddings, LN, dropout, standard-stacked causal Transformer, the
  **last** non-pad position as the user vector, dot-product scores, CE over all items. It uses the
  video history only. Trained by the same `lsvcr finetune` loop (`--set model.architecture=sasrec`).
- `Popularity`: videos by their number of training-target interactions; comments by like count (the
  feature table's snapshot) or, leak-free like the video baseline, by training-target interactions.
- `TextSimilarity`: videos by the cosine of their text vector with the mean of the user's history videos'
  vectors: no training, so it measures what the texts alone say about a user's next video (cold ones too).

Each exposes the scoring API of `LSVCRModel` (`score_videos`, `score_comments`; SASRec also
`video_candidate_vectors`) so evaluation code does not care which model it ranks with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsvcr.batching import HistoryBatch
from lsvcr.config import ModelConfig
from lsvcr.data.prepared import COMMENTS_FILE, has_comments, num_videos, read_table, samples_file
from lsvcr.errors import ConfigError
from lsvcr.model import (Dropout, HistoryStates, LSVCRModel, TransformerEncoder, add_repeat_logit, catalog_cross_entropy,
                         catalog_repeats, repeat_logit_on_candidates)


class SASRec(nn.Module):
    def __init__(self, config: ModelConfig, num_videos: int):
        super().__init__()
        self.config = config
        self.num_videos = num_videos
        self.use_repeat_logit = config.repeat_logit  # the same learned logit as LSVCR's (docs/model.md)
        if self.use_repeat_logit:
            self.repeat_logit = nn.Parameter(torch.tensor(0.0))
        hidden = config.hidden_size
        self.item_embedding = nn.Embedding(num_videos + 1, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_position, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)
        standard = ModelConfig(**{**config.__dict__, "stacking": "standard"})
        self.encoder = TransformerEncoder(standard, config.num_layers)
        self.apply(LSVCRModel._init_weights)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def _states(self, video_history: Tensor) -> Tensor:
        """The causal encoder's output at every position [B, L, H]."""
        mask = video_history != 0
        length = video_history.shape[1]
        if length > self.config.max_position:
            raise ConfigError(f"history length {length} exceeds model.max_position={self.config.max_position}")
        positions = torch.arange(length, device=video_history.device)
        hidden = self.dropout(self.layer_norm(self.item_embedding(video_history) + self.position_embedding(positions)))
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        return self.encoder(hidden, causal[None] & mask[:, None, :])

    def every_position_user_vectors(self, batch: HistoryBatch) -> Tensor:
        """[B, L, H]: position j's state is the user vector of the history cut after j (causal encoder)."""
        return self._states(batch.video_history)

    def score_user_vectors(self, user: Tensor) -> Tensor:
        logits = user @ self.item_embedding.weight.T
        logits[:, 0] = float("-inf")
        return logits

    def video_user_vector(self, states: HistoryStates) -> Tensor:
        return states.video_states[:, 0]

    def video_cross_entropy(self, user: Tensor, targets: Tensor, max_logits_mb: float = 0.0,
                            video_history: Tensor | None = None) -> Tensor:
        """CE over all items, the logits taken `max_logits_mb` at a time (lsvcr.model.catalog_cross_entropy);
        with model.repeat_logit, each row's history videos get the repeat logit."""
        repeats = catalog_repeats(video_history, self.repeat_logit) if self.use_repeat_logit else None
        return catalog_cross_entropy(user, self.item_embedding.weight, targets, max_logits_mb, repeats)

    def add_repeat_logit(self, scores: Tensor, video_history: Tensor) -> Tensor:
        return add_repeat_logit(scores, video_history, self.repeat_logit) if self.use_repeat_logit else scores

    prefix_histories = staticmethod(LSVCRModel.prefix_histories)

    def user_vector(self, video_history: Tensor) -> Tensor:
        mask = video_history != 0
        hidden = self._states(video_history)
        last = (mask.sum(dim=1) - 1).clamp(min=0)  # right-padded: the last real item
        user = hidden[torch.arange(len(last), device=last.device), last]
        return user * mask.any(dim=1, keepdim=True).to(user.dtype)  # empty history → zero vector

    def encode_histories(self, batch: HistoryBatch, **_) -> HistoryStates:
        user = self.user_vector(batch.video_history)
        mask = batch.video_history != 0
        return HistoryStates(user.unsqueeze(1), mask.any(dim=1, keepdim=True), user.unsqueeze(1), mask[:, :1], None, None)

    def video_candidate_vectors(self, video_idx: Tensor | None = None) -> Tensor:
        if video_idx is None:
            return self.item_embedding.weight
        return self.item_embedding(video_idx)

    def score_videos(self, batch: HistoryBatch, candidates: Tensor | None = None, *, states=None, **_) -> Tensor:
        user = self.user_vector(batch.video_history) if states is None else states.video_states[:, 0]
        if candidates is None:
            return self.add_repeat_logit(self.score_user_vectors(user), batch.video_history)
        logits = (self.item_embedding(candidates) @ user.unsqueeze(-1)).squeeze(-1)
        if self.use_repeat_logit:
            logits = repeat_logit_on_candidates(logits, candidates, batch.video_history, self.repeat_logit)
        return logits.masked_fill(candidates == 0, float("-inf"))

    def score_comments(self, *args, **kwargs) -> Tensor:
        raise ConfigError("SASRec is a video recommender (ID only): it cannot rank comments")

    def id_text_contrastive_loss(self, batch: HistoryBatch, states=None, num_negatives: int = 99,
                                 negatives_shared_by: int = 1, independent_directions: bool = True) -> Tensor:
        return self.item_embedding.weight.new_zeros(())


class Popularity(nn.Module):
    """Scores = log(1 + count); ties are many, and the evaluation breaks them pessimistically."""

    def __init__(self, video_counts: np.ndarray, comment_likes: np.ndarray):
        super().__init__()
        self.num_videos = len(video_counts) - 1
        self.register_buffer("video_score", torch.log1p(torch.as_tensor(video_counts, dtype=torch.float32)))
        self.register_buffer("comment_score", torch.log1p(torch.as_tensor(comment_likes, dtype=torch.float32).clamp(min=0)))

    def _scores(self, table: Tensor, candidates: Tensor, batch_size: int) -> Tensor:
        if candidates is None:
            scores = table.expand(batch_size, -1).clone()
            scores[:, 0] = float("-inf")
            return scores
        return table[candidates].masked_fill(candidates == 0, float("-inf"))

    def score_videos(self, batch: HistoryBatch, candidates: Tensor | None = None, **_) -> Tensor:
        return self._scores(self.video_score, candidates, batch.batch_size)

    def score_comments(self, batch: HistoryBatch, current_video: Tensor, candidates: Tensor, **_) -> Tensor:
        return self._scores(self.comment_score, candidates, batch.batch_size)


class TextSimilarity(nn.Module):
    """Training-free content ranking of videos: score = cos(text vector of the video, mean of the unit text vectors
    of the videos in the user's history as evaluation gives it, the last finetune.history_length). A user without
    history scores every video 0 (a tie, ranked pessimistically)."""

    def __init__(self, video_text: Tensor):
        super().__init__()
        self.num_videos = video_text.shape[0] - 1
        self.register_buffer("video_vectors", F.normalize(video_text.float(), dim=-1))  # the pad row stays 0

    def score_videos(self, batch: HistoryBatch, candidates: Tensor | None = None, **_) -> Tensor:
        user = F.normalize(self.video_vectors[batch.video_history].sum(dim=1), dim=-1)  # pad rows add nothing
        if candidates is None:
            scores = user @ self.video_vectors.T
            scores[:, 0] = float("-inf")
            return scores
        scores = (self.video_vectors[candidates] @ user.unsqueeze(-1)).squeeze(-1)
        return scores.masked_fill(candidates == 0, float("-inf"))

    def score_comments(self, batch: HistoryBatch, current_video: Tensor, candidates: Tensor, **_) -> Tensor:
        raise ConfigError("the text-similarity baseline ranks videos only")


COMMENT_POPULARITY = ("likes", "train_interactions")


def training_target_counts(prepared_dir: str | Path) -> np.ndarray:
    """[V+1]: how often each video is a target in the video task's training split."""
    targets = read_table(prepared_dir, samples_file("video", "train"), ["target_video"])["target_video"]
    return np.bincount(targets.to_numpy(), minlength=num_videos(prepared_dir) + 1)


def fit_popularity(prepared_dir: str | Path, comment_signal: str = "likes") -> Popularity:
    """Video popularity = how often a video is a target in the video task's training split. Comment
    popularity = the comment's like count (`likes`: comments.parquet's count, which by default leaves out
    every like of the data's own users, data.like_counts; it still holds the crowd's later likes) or how often it is a positive in the comment task's training
    split (`train_interactions`: the same leak-free rule as for videos)."""
    if comment_signal not in COMMENT_POPULARITY:
        raise ConfigError(f"comment popularity signal must be one of {COMMENT_POPULARITY}; got {comment_signal!r}")
    counts = training_target_counts(prepared_dir)
    comment_scores = np.zeros(1)
    if has_comments(prepared_dir):
        comments = read_table(prepared_dir, COMMENTS_FILE, ["comment_idx", "like_count"])
        comment_scores = np.zeros(len(comments) + 1)
        if comment_signal == "likes":
            comment_scores[comments["comment_idx"].to_numpy()] = comments["like_count"].to_numpy()
        else:
            positives = read_table(prepared_dir, samples_file("comment", "train"), ["pos_comments"])
            flat = pc.list_flatten(positives["pos_comments"]).to_numpy()
            comment_scores = np.bincount(flat, minlength=len(comments) + 1).astype(np.float64)
    return Popularity(counts, comment_scores)


def build_model(config: ModelConfig, num_videos: int, video_text: Tensor | None, comment_text: Tensor | None,
                comment_likes: Tensor | None = None) -> nn.Module:
    """`model.architecture`: lsvcr (the paper's backbone) or sasrec (the ID-only baseline).
    `comment_likes` [C+1] (the PREPARED comments' like counts) feeds `model.comment_like_prior`."""
    if config.architecture == "sasrec":
        return SASRec(config, num_videos)
    if config.mode == "id":
        return LSVCRModel(config, num_videos)
    return LSVCRModel(config, num_videos, video_text, comment_text, comment_likes)
