"""Raw directories → one internal form (`RawTables`) that `prepare` consumes.

Three layouts are accepted (docs/formats.md, "Raw input"), detected in this order:
1. KuaiComt: `user_video_inter`, `video_features`, optional `user_comment_inter` + `comment_features`
   (both or neither), optional `user_features`; each `.csv` or `.parquet`.
2. RecBole atomic files: exactly one `NAME.inter` (tab-separated, typed header such as
   `user_id:token	item_id:token	timestamp:float`), optional `NAME.item` with a text field.
3. Plain CSV: `interactions.csv` (`user_id,item_id,timestamp`), optional `items.csv`
   (`item_id,text[,category]`); `.parquet` works too.
Layouts 2 and 3 are video-only: every interaction is a positive and the comment task is disabled.

Raw ids that are not all integers (RecBole tokens may be strings) become int64 ids through a stable
hash of the token (the same token always gets the same id, whatever else is in the data); the
mapping is kept and written to PREPARED/ as `id_map.{users,videos}.parquet`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from lsvcr.data import validate
from lsvcr.data.io import find_table, read_table
from lsvcr.data.schema import (
    COMMENT_RAW_TABLES,
    RAW_TABLES,
    REQUIRED_RAW_TABLES,
    ID_MAP,
)
from lsvcr.errors import DataError

log = logging.getLogger("lsvcr.data")

SYNTHETIC_MARKER = "SYNTHETIC.txt"
TEXT_FIELD_NAMES = ("title", "movie_title", "caption", "name", "text", "item_name", "book_title", "product_title")
CATEGORY_FIELD_NAMES = ("category", "categories", "genre", "genres", "class", "tag", "tags")


@dataclass
class RawTables:
    """Validated raw data in one internal form (ids int64, times in Unix milliseconds)."""

    interactions: pa.Table  # user_id, video_id, time_ms, is_like, long_view, is_click
    videos: pa.Table  # video_id, caption, category
    comment_interactions: pa.Table | None  # user_id, comment_id, video_id, time_ms, is_like (null: unknown)
    comments: pa.Table | None  # comment_id, video_id, content, like_count
    source: str
    synthetic: bool = False
    fixed_signal: str | None = None  # video-only imports: every interaction is a positive
    id_maps: dict[str, pa.Table] = field(default_factory=dict)

    @property
    def has_comments(self) -> bool:
        return self.comments is not None


def load_raw(raw_dir: str | Path) -> RawTables:
    """Detect the layout of `raw_dir`, read and validate it."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"raw data directory not found: {raw_dir}")
    synthetic = (raw_dir / SYNTHETIC_MARKER).exists()
    if find_table(raw_dir, "user_video_inter") is not None or find_table(raw_dir, "video_features") is not None:
        tables = load_kuaicomt(raw_dir)
    elif sorted(raw_dir.glob("*.inter")):
        tables = load_recbole(raw_dir)
    elif find_table(raw_dir, "interactions") is not None:
        tables = load_plain_csv(raw_dir)
    else:
        raise DataError(
            f"no known raw layout in {raw_dir}: expected KuaiComt tables (user_video_inter.csv|.parquet, "
            "video_features, ...), a RecBole NAME.inter file, or interactions.csv"
        )
    tables.synthetic = synthetic
    return tables


# ---------------------------------------------------------------------------------------------
# KuaiComt


def load_kuaicomt(raw_dir: Path) -> RawTables:
    paths = {name: find_table(raw_dir, name) for name in RAW_TABLES}
    for name in REQUIRED_RAW_TABLES:
        if paths[name] is None:
            raise DataError(f"missing table {name}: expected {raw_dir / name}.csv or .parquet")
    present = [name for name in COMMENT_RAW_TABLES if paths[name] is not None]
    if len(present) == 1:
        absent = next(name for name in COMMENT_RAW_TABLES if paths[name] is None)
        raise DataError(
            f"missing table {absent}: {present[0]} is present, and the comment task needs both "
            f"(remove {present[0]} for a video-only data set)"
        )
    tables = {
        name: validate.conform_table(read_table(path, RAW_TABLES[name]), RAW_TABLES[name])
        for name, path in paths.items()
        if path is not None
    }
    for name, table in tables.items():
        unique_column = RAW_TABLES[name].unique_column
        if unique_column:
            validate.check_unique(table, name, unique_column)

    video_features = tables["video_features"]
    user_video_inter = tables["user_video_inter"]
    video_ids = video_features.column("video_id")
    validate.check_references(user_video_inter, "user_video_inter", "video_id", video_ids, "video_features.video_id")
    validate.check_timestamps(user_video_inter, "user_video_inter", "time_ms", unit_ms=1)

    upload_ms = validate.upload_start_ms(video_features)
    if upload_ms is not None:
        order = np.argsort(video_ids.to_numpy(), kind="stable")
        sorted_ids = video_ids.to_numpy()[order]
        sorted_upload = pc.fill_null(upload_ms, np.iinfo(np.int64).min).to_numpy()[order]
        validate.check_after_upload(
            user_video_inter, "user_video_inter", "time_ms", "video_id", 1, sorted_ids, sorted_upload
        )

    comments = comment_interactions = None
    if not present:
        log.info("no comment tables (%s) in %s: comment task disabled (has_comments: false)",
                 ", ".join(COMMENT_RAW_TABLES), raw_dir)
    else:
        comment_features = tables["comment_features"]
        user_comment_inter = tables["user_comment_inter"]
        validate.check_references(comment_features, "comment_features", "video_id", video_ids, "video_features.video_id")
        validate.check_references(
            user_comment_inter, "user_comment_inter", "comment_id",
            comment_features.column("comment_id"), "comment_features.comment_id",
        )
        validate.check_references(user_comment_inter, "user_comment_inter", "photo_id", video_ids, "video_features.video_id")
        _check_comment_video_matches(user_comment_inter, comment_features)
        validate.check_timestamps(user_comment_inter, "user_comment_inter", "time_stamp", unit_ms=1000)
        if upload_ms is not None:
            validate.check_after_upload(
                user_comment_inter, "user_comment_inter", "time_stamp", "photo_id", 1000, sorted_ids, sorted_upload
            )
        comments = pa.table({
            "comment_id": comment_features.column("comment_id"),
            "video_id": comment_features.column("video_id"),
            "content": comment_features.column("comment_content"),
            "like_count": pc.fill_null(comment_features.column("comment_like_cnt"), 0),
        })
        comment_interactions = pa.table({
            "user_id": user_comment_inter.column("user_id"),
            "comment_id": user_comment_inter.column("comment_id"),
            "video_id": user_comment_inter.column("photo_id"),
            "time_ms": pc.multiply(user_comment_inter.column("time_stamp"), 1000),
            # null when the table has no is_like column (prepare then keeps the like-count snapshot as it is)
            "is_like": (pc.fill_null(user_comment_inter.column("is_like"), 0) if "is_like" in
                        user_comment_inter.column_names else pa.nulls(user_comment_inter.num_rows, pa.int64())),
        })

    category = (
        video_features.column("category") if "category" in video_features.column_names
        else pa.array([""] * video_features.num_rows, pa.string())
    )
    return RawTables(
        interactions=pa.table({
            "user_id": user_video_inter.column("user_id"),
            "video_id": user_video_inter.column("video_id"),
            "time_ms": pc.round(user_video_inter.column("time_ms")).cast(pa.int64()),
            "is_like": user_video_inter.column("is_like"),
            "long_view": user_video_inter.column("long_view"),
            "is_click": user_video_inter.column("is_click"),
        }),
        videos=pa.table({
            "video_id": video_ids,
            "caption": pc.fill_null(video_features.column("caption"), ""),
            "category": pc.fill_null(category, ""),
        }),
        comment_interactions=comment_interactions,
        comments=comments,
        source="kuaicomt",
    )


def _check_comment_video_matches(user_comment_inter: pa.Table, comment_features: pa.Table) -> None:
    """user_comment_inter.photo_id must be the video the comment was posted under."""
    comment_ids = comment_features.column("comment_id").to_numpy()
    order = np.argsort(comment_ids, kind="stable")
    position = np.searchsorted(comment_ids[order], user_comment_inter.column("comment_id").to_numpy())
    comment_video = comment_features.column("video_id").to_numpy()[order][position]
    mismatch = comment_video != user_comment_inter.column("photo_id").to_numpy()
    validate.fail_rows(
        user_comment_inter, "user_comment_inter", "photo_id",
        "photo_id differs from comment_features.video_id of the comment", pa.array(mismatch),
    )


# ---------------------------------------------------------------------------------------------
# Video-only layouts: RecBole atomic files and plain CSV


def map_raw_ids(tokens: list[pa.ChunkedArray]) -> tuple[list[pa.Array], pa.Table | None]:
    """Raw id tokens (strings) → int64 ids, consistently across `tokens`.

    All-integer tokens are used as they are (no mapping). Otherwise each distinct token gets the first
    63 bits of its BLAKE2b hash, so the mapping does not depend on row order or on other tokens.
    Returns the converted arrays and the mapping table (`id`, `raw_id`) or None.
    """
    texts = [pc.utf8_trim_whitespace(column.cast(pa.string())) for column in tokens]
    all_integer = all(pc.all(pc.match_substring_regex(t, r"^-?\d{1,18}$")).as_py() is not False for t in texts)
    if all_integer:
        return [t.cast(pa.int64()) for t in texts], None
    distinct = pc.unique(pa.chunked_array([chunk for t in texts for chunk in t.chunks], pa.string()))
    distinct = distinct.take(pc.sort_indices(distinct))
    hashed = np.fromiter(
        (int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
         for token in distinct.to_pylist()),
        dtype=np.int64, count=len(distinct),
    )
    if len(np.unique(hashed)) != len(hashed):
        raise DataError("raw id tokens collide after hashing to int64; rename the colliding ids")
    mapping = pa.table({"id": hashed, "raw_id": distinct}, schema=ID_MAP)
    return [pa.array(hashed).take(pc.index_in(t, value_set=distinct)) for t in texts], mapping


def _timestamps_to_ms(values: pa.ChunkedArray, table: pa.Table, name: str, column: str) -> pa.Array:
    """Float timestamps → int64 ms. Values below 1e11 are taken as seconds (RecBole's convention)."""
    values = values.cast(pa.float64())
    validate.fail_rows(table, name, column, "missing or NaN timestamp", pc.is_null(values, nan_is_null=True))
    validate.fail_rows(table, name, column, "negative timestamp", pc.less(values, 0))
    scale = 1000.0 if (pc.max(values).as_py() or 0) < 1e11 else 1.0
    return pc.round(pc.multiply(values, scale)).cast(pa.int64())


def _video_only(
    interactions: pa.Table, items: pa.Table | None, inter_name: str, item_name: str,
    user_column: str, item_column: str, time_column: str, text_column: str | None, category_column: str | None,
    source: str,
) -> RawTables:
    validate.fail_rows(interactions, inter_name, user_column, "missing id", pc.is_null(interactions.column(user_column)))
    validate.fail_rows(interactions, inter_name, item_column, "missing id", pc.is_null(interactions.column(item_column)))
    item_tokens = [interactions.column(item_column)]
    if items is not None:
        validate.fail_rows(items, item_name, item_column, "missing id", pc.is_null(items.column(item_column)))
        item_tokens.append(items.column(item_column))
    (user_ids,), user_map = map_raw_ids([interactions.column(user_column)])
    item_ids, video_map = map_raw_ids(item_tokens)
    time_ms = _timestamps_to_ms(interactions.column(time_column), interactions, inter_name, time_column)
    if items is not None:
        videos_table = pa.table({"video_id": item_ids[1]})
        validate.check_unique(pa.table({item_column: items.column(item_column)}), item_name, item_column)
        validate.check_references(
            pa.table({item_column: item_ids[0]}), inter_name, item_column, item_ids[1], f"{item_name}.{item_column}"
        )
        caption = items.column(text_column).cast(pa.string()) if text_column else None
        category = items.column(category_column).cast(pa.string()) if category_column else None
    else:
        videos_table = pa.table({"video_id": pc.unique(item_ids[0])})
        caption = category = None
        log.warning("%s: no item table: video captions are empty, so text features carry no signal", source)
    if caption is None:
        caption = pa.array([""] * videos_table.num_rows, pa.string())
    if category is None:
        category = pa.array([""] * videos_table.num_rows, pa.string())
    ones = pa.array(np.ones(interactions.num_rows, dtype=np.int64))
    log.info("%s is a video-only data set: comment task disabled (has_comments: false)", source)
    return RawTables(
        interactions=pa.table({
            "user_id": user_ids, "video_id": item_ids[0], "time_ms": time_ms,
            "is_like": ones, "long_view": ones, "is_click": ones,
        }),
        videos=videos_table.append_column("caption", pc.fill_null(caption, "")).append_column(
            "category", pc.fill_null(category, "")),
        comment_interactions=None,
        comments=None,
        source=source,
        fixed_signal="interaction",
        id_maps={name: table for name, table in (("users", user_map), ("videos", video_map)) if table is not None},
    )


def _read_recbole_file(path: Path) -> tuple[pa.Table, dict[str, str]]:
    """A RecBole atomic file: tab-separated, header `name:type` per column. Returns (table, types)."""
    with open(path, encoding="utf-8") as handle:
        header = [entry.strip().strip('"') for entry in handle.readline().rstrip("\r\n").split("\t")]
    names, types = [], {}
    for entry in header:
        name, _, kind = entry.partition(":")
        if kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataError(f"table {path.name}: header field {entry!r} must look like name:token|token_seq|float|float_seq")
        names.append(name)
        types[name] = kind
    column_types = {name: (pa.float64() if kind == "float" else pa.string()) for name, kind in types.items()}
    try:
        table = pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pa_csv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as error:
        raise DataError(f"table {path.name}: cannot read {path}: {error}") from None
    return table, types


def load_recbole(raw_dir: Path) -> RawTables:
    inter_paths = sorted(raw_dir.glob("*.inter"))
    if len(inter_paths) > 1:
        raise DataError(f"several RecBole .inter files in {raw_dir}: {', '.join(p.name for p in inter_paths)}; keep one")
    inter_path = inter_paths[0]
    dataset = inter_path.stem
    interactions, _ = _read_recbole_file(inter_path)
    for column in ("user_id", "item_id", "timestamp"):
        if column not in interactions.column_names:
            raise DataError(
                f"table {inter_path.name}: missing column {column} "
                f"(header has: {', '.join(interactions.column_names)})"
            )
    item_path = raw_dir / f"{dataset}.item"
    items, text_column, category_column = None, None, None
    if item_path.is_file():
        items, types = _read_recbole_file(item_path)
        if "item_id" not in items.column_names:
            raise DataError(f"table {item_path.name}: missing column item_id (header has: {', '.join(items.column_names)})")
        text_column = next((n for n in TEXT_FIELD_NAMES if n in types), None) or next(
            (n for n, kind in types.items() if kind == "token_seq" and n not in CATEGORY_FIELD_NAMES), None)
        category_column = next((n for n in CATEGORY_FIELD_NAMES if n in types), None)
        if text_column is None:
            log.warning("%s has no text field (token_seq such as movie_title): captions are empty", item_path.name)
    return _video_only(
        interactions, items, inter_path.name, item_path.name, "user_id", "item_id", "timestamp",
        text_column, category_column, source=f"recbole:{dataset}",
    )


def load_plain_csv(raw_dir: Path) -> RawTables:
    inter_path = find_table(raw_dir, "interactions")
    string_ids = {"user_id": pa.string(), "item_id": pa.string()}
    interactions = _read_with_types(inter_path, string_ids)
    for column in ("user_id", "item_id", "timestamp"):
        if column not in interactions.column_names:
            raise DataError(
                f"table {inter_path.name}: missing column {column} (columns present: {', '.join(interactions.column_names)})"
            )
    item_path = find_table(raw_dir, "items")
    items = None
    if item_path is not None:
        items = _read_with_types(item_path, {"item_id": pa.string(), "text": pa.string(), "category": pa.string()})
        for column in ("item_id", "text"):
            if column not in items.column_names:
                raise DataError(f"table {item_path.name}: missing column {column} (columns present: {', '.join(items.column_names)})")
    return _video_only(
        interactions, items, inter_path.name, item_path.name if item_path else "items.csv",
        "user_id", "item_id", "timestamp", "text" if items is not None else None,
        "category" if items is not None and "category" in items.column_names else None, source="csv",
    )


def _read_with_types(path: Path, column_types: dict[str, pa.DataType]) -> pa.Table:
    if path.suffix == ".parquet":
        return read_table(path)
    try:
        return pa_csv.read_csv(
            path, convert_options=pa_csv.ConvertOptions(column_types=column_types, strings_can_be_null=False)
        )
    except pa.ArrowInvalid as error:
        raise DataError(f"table {path.name}: cannot read {path}: {error}") from None
