"""The catalog a replica serves from PREPARED/ (docs/formats.md): raw id <-> index maps, each video's
comment pool, every user's latest history; and the cold videos of VECTORS/ (a text vector, no index)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsvcr.errors import DataError
from lsvcr.data.prepared import COMMENTS_FILE, USER_HISTORIES_FILE, has_comments, read_table, read_videos
from lsvcr.vectors import read_vector_table



class IdIndex:
    """Vectorised raw-id -> dense-index lookup. `ids_by_index[i]` is the raw id of index i (i >= 1)."""

    def __init__(self, ids_by_index: np.ndarray):
        ids = np.asarray(ids_by_index[1:], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[order]
        self.indices = (order + 1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def lookup(self, raw_ids: Any) -> np.ndarray:
        """Index of each raw id; 0 where the id is unknown."""
        raw = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
        if len(self.sorted_ids) == 0:
            return np.zeros(len(raw), dtype=np.int64)
        position = np.searchsorted(self.sorted_ids, raw).clip(max=len(self.sorted_ids) - 1)
        return np.where(self.sorted_ids[position] == raw, self.indices[position], 0)


def _list_column(column) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> Arrow column as (offsets [N+1] starting at 0, flat values), without a Python loop."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values


@dataclass
class UserHistory:
    """One user's history in index space (chronological, oldest first)."""

    video_history: np.ndarray
    comment_history_videos: np.ndarray
    comment_history_comments: list[np.ndarray]


class Catalog:
    """What a replica needs from PREPARED/: id maps, each video's comment pool, stored user histories."""

    def __init__(self, prepared_dir: str | Path):
        self.prepared_dir = Path(prepared_dir)
        videos = read_videos(self.prepared_dir, ["video_idx", "video_id", "hot_comments"]).sort_by("video_idx")
        self.num_videos = videos.num_rows
        self.video_ids = np.concatenate([[0], videos.column("video_id").to_numpy()]).astype(np.int64)
        self.video_index = IdIndex(self.video_ids)
        pool_offsets, pool_values = _list_column(videos.column("hot_comments"))
        self.pool_offsets = np.concatenate([[0], pool_offsets])  # video_idx i -> pool_offsets[i]:[i+1]
        self.pool_comments = pool_values
        pool_sizes = np.diff(self.pool_offsets)
        self.hot_comment = np.zeros(self.num_videos + 1, dtype=np.int64)  # comment_list[0] (METHOD 2.2, eval)
        self.hot_comment[pool_sizes > 0] = pool_values[self.pool_offsets[:-1][pool_sizes > 0]]

        if has_comments(self.prepared_dir):
            columns = ["comment_idx", "comment_id", "video_idx"]
            comments = read_table(self.prepared_dir, COMMENTS_FILE, columns).sort_by("comment_idx")
            self.comment_ids = np.concatenate([[0], comments.column("comment_id").to_numpy()]).astype(np.int64)
            self.comment_video = np.concatenate([[0], comments.column("video_idx").to_numpy()]).astype(np.int64)
        else:
            self.comment_ids = np.zeros(1, dtype=np.int64)
            self.comment_video = np.zeros(1, dtype=np.int64)
        self.comment_index = IdIndex(self.comment_ids)
        self._load_user_histories()

    def _load_user_histories(self) -> None:
        """The stored end-of-data history of every user, kept as flat Arrow-style arrays."""
        if not (self.prepared_dir / USER_HISTORIES_FILE).exists():
            raise DataError(f"{self.prepared_dir / USER_HISTORIES_FILE} is missing: re-run `lsvcr prepare` "
                            "(serving needs each user's latest history)")
        table = read_table(self.prepared_dir, USER_HISTORIES_FILE)
        self.user_ids = table.column("user_id").to_numpy().astype(np.int64)
        self.user_index = IdIndex(np.concatenate([[0], self.user_ids]))
        self._video_offsets, self._video_values = _list_column(table.column("video_history"))
        self._record_offsets, self._record_videos = _list_column(table.column("comment_history_videos"))
        nested = table.column("comment_history_comments").combine_chunks()
        self._comment_offsets, self._comment_values = _list_column(nested.flatten())

    def user_history(self, user_id: int) -> UserHistory | None:
        row = int(self.user_index.lookup([user_id])[0]) - 1
        if row < 0:
            return None
        videos = self._video_values[self._video_offsets[row]:self._video_offsets[row + 1]]
        start, end = self._record_offsets[row], self._record_offsets[row + 1]
        offsets = self._comment_offsets[start:end + 1]
        values = self._comment_values
        return UserHistory(
            video_history=videos,
            comment_history_videos=self._record_videos[start:end],
            comment_history_comments=[values[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
        )

    def comment_pool(self, video_idx: int) -> np.ndarray:
        return self.pool_comments[self.pool_offsets[video_idx]:self.pool_offsets[video_idx + 1]]

    def comment_pool_rows(self, video_idx: int) -> np.ndarray:
        """The rows of `comment_pool(video_idx)` in `ItemTables.comment_candidate` (row 0 is the padding)."""
        return np.arange(self.pool_offsets[video_idx], self.pool_offsets[video_idx + 1], dtype=np.int64) + 1

    def example_video_id(self) -> int | None:
        """A video with a comment pool (a valid `video_id` of a comment request)."""
        with_comments = np.flatnonzero(np.diff(self.pool_offsets)[1:] > 0)
        return int(self.video_ids[with_comments[0] + 1]) if len(with_comments) else None

    def example_user_id(self) -> int | None:
        return int(self.user_ids[0]) if len(self.user_ids) else None



def read_cold_video_vectors(vectors_dir: Path, catalog: Catalog) -> tuple[np.ndarray, torch.Tensor]:
    """Videos with a text vector in VECTORS/ but no index in PREPARED/ (uploaded after training):
    their raw ids and text vectors, scored through the text-only candidate path."""
    table = read_vector_table(vectors_dir, "videos", "video_id")
    ids = table.column("video_id").to_numpy().astype(np.int64)
    cold = np.flatnonzero(catalog.video_index.lookup(ids) == 0)
    vectors = table.column("vector").combine_chunks().take(cold)
    dim = vectors.type.list_size
    text = np.nan_to_num(vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim))
    return ids[cold], torch.from_numpy(text)

