"""Every Arrow schema of the data layer, in one place.

Raw input: the KuaiComt layout (../shared/KUAICOMT_SCHEMA.md, METHOD 8). Each raw table has a full
schema (the documented columns and types, what `lsvcr synth` writes), a set of *required* columns and
a few optional ones that `lsvcr prepare` uses when present. A used column that is missing (if required)
or not convertible to its type is a `DataError`; columns prepare does not use are not even loaded.

Prepared output: the `PREPARED/` contract of docs/formats.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class RawTableSpec:
    name: str
    schema: pa.Schema  # every documented column
    required: frozenset[str]
    id_columns: tuple[str, ...]  # must never be null/NaN
    unique_column: str | None = None  # feature tables: one row per id
    optional_used: frozenset[str] = frozenset()  # read and checked when present

    @property
    def used(self) -> frozenset[str]:
        """The columns prepare reads; the others are not loaded (KuaiComt's 120M-row table is wide)."""
        return self.required | self.optional_used

    def field_type(self, column: str) -> pa.DataType | None:
        index = self.schema.get_field_index(column)
        return None if index < 0 else self.schema.field(index).type


USER_VIDEO_INTER = RawTableSpec(
    name="user_video_inter",
    schema=pa.schema([
        ("user_id", pa.int64()),
        ("video_id", pa.int64()),
        ("p_hourmin", pa.int64()),
        ("time_ms", pa.float64()),
        ("is_click", pa.int64()),
        ("is_like", pa.int64()),
        ("is_follow", pa.int64()),
        ("is_comment", pa.int64()),
        ("is_forward", pa.int64()),
        ("is_collect", pa.int64()),
        ("is_hate", pa.int64()),
        ("long_view", pa.int64()),
        ("play_time_ms", pa.float64()),
        ("duration_ms", pa.float64()),
        ("profile_stay_time", pa.int64()),
        ("comment_stay_time", pa.int64()),
    ]),
    required=frozenset({"user_id", "video_id", "time_ms", "is_click", "is_like", "long_view"}),
    id_columns=("user_id", "video_id"),
)

USER_COMMENT_INTER = RawTableSpec(
    name="user_comment_inter",
    schema=pa.schema([
        ("user_id", pa.int64()),
        ("comment_id", pa.int64()),
        ("time_stamp", pa.int64()),  # seconds
        ("photo_id", pa.int64()),
        ("is_like", pa.int64()),
        ("is_reply", pa.int64()),
    ]),
    required=frozenset({"user_id", "comment_id", "time_stamp", "photo_id"}),
    optional_used=frozenset({"is_like"}),  # like counts without the data's own users' likes (prepare)
    id_columns=("user_id", "comment_id", "photo_id"),
)

USER_FEATURES = RawTableSpec(
    name="user_features",
    schema=pa.schema(
        [
            ("user_id", pa.int64()),
            ("user_active_degree", pa.string()),
            ("is_live_author", pa.int64()),
            ("produce_video_num", pa.int64()),
            ("follow_count", pa.int64()),
            ("follow_user_num_range", pa.string()),
            ("fans_count", pa.int64()),
            ("fans_user_num_range", pa.string()),
            ("friend_user_num_range", pa.string()),
            ("register_days", pa.int64()),
        ]
        + [(f"onehot_feat{i}", pa.int64()) for i in range(21)]
    ),
    required=frozenset({"user_id"}),
    id_columns=("user_id",),
    unique_column="user_id",
)

VIDEO_FEATURES = RawTableSpec(
    name="video_features",
    schema=pa.schema([
        ("video_id", pa.int64()),
        ("author_id", pa.int64()),
        ("video_type", pa.string()),
        ("upload_dt", pa.string()),  # YYYY-MM-DD
        ("caption", pa.string()),
        ("duration", pa.float64()),  # milliseconds
        ("category", pa.string()),
    ]),
    required=frozenset({"video_id", "caption"}),
    id_columns=("video_id",),
    unique_column="video_id",
    optional_used=frozenset({"upload_dt", "category"}),
)

COMMENT_FEATURES = RawTableSpec(
    name="comment_features",
    schema=pa.schema([
        ("comment_id", pa.int64()),
        ("comment_content", pa.string()),
        ("video_id", pa.int64()),
        ("comment_like_cnt", pa.int64()),
        ("comment_reply_out", pa.int64()),
        ("show_comment_cnt_td", pa.int64()),
    ]),
    required=frozenset({"comment_id", "comment_content", "video_id", "comment_like_cnt"}),
    id_columns=("comment_id", "video_id"),
    unique_column="comment_id",
)

RAW_TABLES: dict[str, RawTableSpec] = {
    spec.name: spec
    for spec in (USER_VIDEO_INTER, USER_COMMENT_INTER, USER_FEATURES, VIDEO_FEATURES, COMMENT_FEATURES)
}
REQUIRED_RAW_TABLES = ("user_video_inter", "video_features")
# Present together or not at all: without them the comment task is disabled (video-only data set).
COMMENT_RAW_TABLES = ("user_comment_inter", "comment_features")

# ---------------------------------------------------------------------------------------------
# PREPARED/ (docs/formats.md)

VIDEOS = pa.schema([
    ("video_idx", pa.int32()),
    ("video_id", pa.int64()),
    ("caption", pa.string()),
    ("category", pa.string()),
    ("hot_comments", pa.list_(pa.int32())),
])

COMMENTS = pa.schema([
    ("comment_idx", pa.int32()),
    ("comment_id", pa.int64()),
    ("video_idx", pa.int32()),
    ("content", pa.string()),
    ("like_count", pa.int64()),
])

USERS = pa.schema([
    ("user_idx", pa.int32()),
    ("user_id", pa.int64()),
])

# End-of-data histories per user (what serving feeds the model for a known user).
USER_HISTORIES = pa.schema([
    ("user_idx", pa.int32()),
    ("user_id", pa.int64()),
    ("video_history", pa.list_(pa.int32())),
    ("comment_history_videos", pa.list_(pa.int32())),
    ("comment_history_comments", pa.list_(pa.list_(pa.int32()))),
])

# Raw-token → int64 id mappings written when an importer had to map non-integer ids.
ID_MAP = pa.schema([
    ("id", pa.int64()),
    ("raw_id", pa.string()),
])

_SAMPLE_BASE = [
    ("user_idx", pa.int32()),
    ("target_video", pa.int32()),
    ("target_time_ms", pa.int64()),
    ("video_history", pa.list_(pa.int32())),
    ("comment_history_videos", pa.list_(pa.int32())),
    ("comment_history_comments", pa.list_(pa.list_(pa.int32()))),
]
_EVAL_COLUMNS = [("candidates", pa.list_(pa.int32())), ("labels", pa.list_(pa.int8()))]


def sample_schema(task: str, split: str) -> pa.Schema:
    """Schema of `{task}_samples.{split}.parquet` (task: video | comment)."""
    fields = list(_SAMPLE_BASE)
    if task == "comment":
        fields.append(("pos_comments", pa.list_(pa.int32())))
    if split in ("valid", "test"):
        fields.extend(_EVAL_COLUMNS)
    return pa.schema(fields)


TASKS = ("video", "comment")
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
