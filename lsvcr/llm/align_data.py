"""Stage-1 data and its mixed batches (METHOD 5.1): the train samples of both tasks (memory-mapped), in frozen mode
with the precomputed LLM item and user vectors, and the batches that mix video and comment rows in batch-local
indices. The SR model sees the comments the prompt shows (`lsvcr.history_views`' rule) unless the view
augmentation deliberately gives them different views.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lsvcr.batching import HistoryBatch, epoch_rows, make_batch
from lsvcr.config import LSVCRConfig
from lsvcr.data.prepared import load_manifest
from lsvcr.errors import DataError
from lsvcr.history_views import STAGE_ONE_COMMENTS_PER_RECORD, ViewAugmentation, augment_views
from lsvcr.sample_arrays import CommentPools, load_comment_pools
from lsvcr.sample_stream import SampleStream, open_sample_stream
from lsvcr.vectors import open_item_tensors, read_vector_table


# ----------------------------------------------------------------------------- batches


@dataclass
class AlignBatch:
    """A mixed batch in batch-local indices (row 0 of every local table = padding)."""

    history: HistoryBatch  # local indices
    num_video_rows: int
    current_video: Tensor  # [B] local video index (comment rows: the watched video)
    target_video: Tensor  # [Bv] local video index of the video rows' targets
    target_comment: Tensor  # [Bc] local comment index of one positive comment of each comment row
    videos: Tensor  # [Vb] PREPARED video_idx of the local video table (0 first)
    comments: Tensor  # [Cb] PREPARED comment_idx of the local comment table (0 first)
    video_rows: np.ndarray  # sample rows in video_samples.train
    comment_rows: np.ndarray  # sample rows in comment_samples.train
    global_history: HistoryBatch  # PREPARED indices (for prompts)
    global_current_video: np.ndarray
    global_targets: tuple[np.ndarray, np.ndarray]  # (target video_idx of video rows, comment_idx of comment rows)


def _pad_to(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    padding = []
    for have, want in reversed(list(zip(tensor.shape[1:], shape))):
        padding += [0, want - have]
    return F.pad(tensor, padding)


def concat_histories(parts: list[HistoryBatch]) -> HistoryBatch:
    """Stack HistoryBatches of different padded widths (zeros are padding)."""
    names = ("video_history", "video_history_hot_comment", "comment_history_videos", "comment_history_comments")
    merged = {}
    for name in names:
        tensors = [getattr(part, name) for part in parts]
        shape = tuple(max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim()))
        merged[name] = torch.cat([_pad_to(t, shape) for t in tensors], dim=0)
    return HistoryBatch(**merged)


def _localize(indices: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Distinct indices (0 first) and every input re-expressed as positions in that list."""
    flat = torch.cat([torch.zeros(1, dtype=torch.long)] + [t.reshape(-1) for t in indices])
    distinct, inverse = torch.unique(flat, return_inverse=True)
    out, start = [], 1
    for t in indices:
        out.append(inverse[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return distinct, out


def make_align_batch(data: "StageOneData", video_rows: np.ndarray, comment_rows: np.ndarray,
                     rng: np.random.Generator, augmentation: Any = None) -> AlignBatch:
    """A stage-1 batch; `augmentation` (lsvcr.history_views.ViewAugmentation, METHOD 5.1) gives the SR model
    and the prompt different views (`history` vs `global_history`)."""
    # The SR model sees the comments the LLM prompt shows (lsvcr.history_views' rule): lora renders its prompts from
    # this batch's own draw (`global_history`); frozen prompts were encoded once with the deterministic view.
    views = {"comments_per_record": STAGE_ONE_COMMENTS_PER_RECORD, "deterministic_views": data.raw_video is not None}
    parts, current, target_videos, target_comments = [], [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(video_rows):
        batch = make_batch(data.video, data.tables, video_rows, rng=rng, **views)
        parts.append(batch.history)
        current.append(batch.target_video)
        target_videos = batch.target_video.numpy()
    if len(comment_rows):
        batch = make_batch(data.comment, data.tables, comment_rows, rng=rng, comment_negatives=1, **views)
        parts.append(batch.history)
        current.append(batch.target_video)
        target_comments = batch.candidates[:, 0].numpy()  # column 0: a random positive comment
    history = prompt_history = concat_histories(parts)
    if augmentation is not None and augmentation.enabled:
        history, prompt_history = _augmented(history, data, rng, augmentation)
    current_video = torch.cat(current)
    videos, (video_history, comment_history_videos, current_local, target_video_local) = _localize(
        [history.video_history, history.comment_history_videos, current_video, torch.from_numpy(target_videos)])
    comments, (hot_local, record_comments_local, target_comment_local) = _localize(
        [history.video_history_hot_comment, history.comment_history_comments, torch.from_numpy(target_comments)])
    local = HistoryBatch(video_history=video_history, video_history_hot_comment=hot_local,
                         comment_history_videos=comment_history_videos, comment_history_comments=record_comments_local)
    return AlignBatch(local, len(video_rows), current_local, target_video_local, target_comment_local, videos, comments,
                      video_rows, comment_rows, prompt_history, current_video.numpy(), (target_videos, target_comments))


def _augmented(history, data: "StageOneData", rng: np.random.Generator, augmentation) -> tuple[Any, Any]:
    """(SR view, prompt view) of a batch's histories under METHOD 5.1's view augmentation."""
    prompt_hot, sr_hot, prompt_records, sr_records = augment_views(
        history.video_history.numpy(), history.video_history_hot_comment.numpy(),
        history.comment_history_videos.numpy(), history.comment_history_comments.numpy(), data.tables, rng,
        augmentation, prompt_fixed=data.raw_video is not None)

    def view(hot: np.ndarray, records: np.ndarray) -> HistoryBatch:
        return HistoryBatch(video_history=history.video_history, video_history_hot_comment=torch.from_numpy(hot),
                            comment_history_videos=history.comment_history_videos,
                            comment_history_comments=torch.from_numpy(records))

    return view(sr_hot, sr_records), view(prompt_hot, prompt_records)


def view_augmentation(config: LSVCRConfig) -> ViewAugmentation:
    """The stage-1 view augmentation of `config.align` (lsvcr.history_views.ViewAugmentation)."""
    settings = config.align
    return ViewAugmentation(settings.video_view_aug_p, settings.comment_view_aug_p, settings.view_aug_item_p,
                            settings.view_aug_popular)


def mixed_epoch_batches(num_video: int, num_comment: int, batch_size: int, rng: np.random.Generator, rank: int,
                        world_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A shuffled epoch over the concatenation of both tasks' train samples (METHOD 5.1), sharded so
    every rank gets the same number of equally sized batches; each batch split into its
    (video rows, comment rows)."""
    batches = epoch_rows(num_video + num_comment, batch_size, rng, rank, world_size)
    return [(np.sort(rows[rows < num_video]), np.sort(rows[rows >= num_video] - num_video)) for rows in batches]


# ----------------------------------------------------------------------------- the data


@dataclass
class StageOneData:
    tables: CommentPools
    video: SampleStream  # video_samples.train
    comment: SampleStream | None  # comment_samples.train (None: video-only data)
    raw_video: Tensor | None = None  # frozen: [V+1, D] LLM item vectors (row 0 zeros)
    raw_comment: Tensor | None = None  # frozen: [C+1, D]
    user_video: Tensor | None = None  # frozen: [Nv, D] LLM prompt vectors by sample row
    user_comment: Tensor | None = None  # frozen: [Nc, D]

    @property
    def num_comment_samples(self) -> int:
        return 0 if self.comment is None else len(self.comment)


def user_vector_table(vectors_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(sample rows, their vectors [N, D]) of `users_video` / `users_comment`, as stored; None when absent."""
    table = read_vector_table(vectors_dir, name, "sample_row")
    if table is None:
        return None
    column = table["vector"].combine_chunks()
    return (table["sample_row"].to_numpy(),
            column.values.to_numpy(zero_copy_only=False).reshape(table.num_rows, column.type.list_size))


def _read_user_vectors(vectors_dir: Path, name: str, num_samples: int) -> tuple[np.ndarray, Tensor]:
    """(sample rows that have a vector, their vectors) of `users_video` / `users_comment`."""
    stored = user_vector_table(vectors_dir, name)
    if stored is None:
        raise DataError(f"VECTORS {vectors_dir} has no {name} (frozen alignment needs `lsvcr encode --what users`)")
    rows, vectors = stored
    if len(rows) == 0:
        raise DataError(f"VECTORS {name} is empty")
    if rows.min() < 0 or rows.max() >= num_samples or len(np.unique(rows)) != len(rows):
        raise DataError(f"VECTORS {name}: sample_row values do not index the {num_samples} train samples "
                        "(encoded from another PREPARED?)")
    order = np.argsort(rows)
    return rows[order], torch.from_numpy(np.nan_to_num(vectors[order]).astype(np.float32))


def load_stage_one_data(config: LSVCRConfig, data_dir: Path, vectors_dir: Path | None, frozen: bool) -> StageOneData:
    settings = config.align
    has_comments = bool(load_manifest(data_dir).get("has_comments"))
    tables = load_comment_pools(data_dir)
    video = open_sample_stream(data_dir, "video", "train", settings.history_length, config.data.max_comments_per_record)
    comment = (open_sample_stream(data_dir, "comment", "train", settings.history_length,
                                  config.data.max_comments_per_record) if has_comments else None)
    data = StageOneData(tables, video, comment)
    if frozen:
        # Memory maps shared by the node's workers: a batch gathers only its rows (issue #16).
        data.raw_video, raw_comment = open_item_tensors(vectors_dir, data_dir)
        data.raw_comment = raw_comment if raw_comment is not None else torch.zeros(1, data.raw_video.shape[1])
        # Train on the samples whose prompts were encoded (all, or encode.max_user_samples of them).
        rows, data.user_video = _read_user_vectors(vectors_dir, "users_video", len(video))
        data.video = video.select(rows)  # the samples that have LLM user vectors
        data.user_comment = torch.zeros(0, data.raw_video.shape[1])
        if comment is not None:
            rows, data.user_comment = _read_user_vectors(vectors_dir, "users_comment", len(comment))
            data.comment = comment.select(rows)
    return data

