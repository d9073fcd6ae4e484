"""Validation of raw tables, with errors that name the table, the column and an example row.

Checked, in this order (each failure is a `DataError`):
1. a required table or column is missing (schema.py lists what `prepare` needs);
2. a column cannot be converted to its documented type (e.g. text in an id column, 1.5 in a flag);
3. a null / NaN id or a null value in a required column;
4. a duplicate id in a feature table (video_features.video_id, comment_features.comment_id,
   user_features.user_id);
5. an interaction that references an unknown video or comment, a comment whose video is unknown, or
   a comment interaction whose photo_id is not the video the comment belongs to;
6. timestamps out of order. We define this as:
   - a negative, zero or NaN timestamp;
   - an implausible timestamp: outside [2000-01-01, 2100-01-01) in the column's documented unit
     (a `time_ms` in seconds lands in January 1970 and is caught here, with a hint);
   - an interaction with a video earlier than the video's upload date. upload_dt is a calendar day
     in an unknown time zone, so an interaction counts as before the upload only when it is earlier
     than upload_dt 00:00 UTC minus one day (time zones span at most ±14 h).
   Interactions need not be sorted by time in the file: prepare sorts them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lsvcr.data.schema import RawTableSpec
from lsvcr.errors import DataError

MS_PER_DAY = 86_400_000
PLAUSIBLE_MS = (946_684_800_000, 4_102_444_800_000)  # 2000-01-01 .. 2100-01-01 UTC
_INTEGER_TEXT = r"^\s*[-+]?\d+(\.0*)?\s*$"
_NUMBER_TEXT = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$|^\s*(nan|NaN|inf|-inf)\s*$"


def example_row(table: pa.Table, row: int, max_columns: int = 8) -> str:
    """`row 17 {user_id=..., video_id=...}`: a 1-based data row (header excluded) for the error text."""
    values = []
    for name in table.column_names[:max_columns]:
        value = table.column(name)[row].as_py()
        if isinstance(value, str) and len(value) > 40:
            value = value[:37] + "..."
        values.append(f"{name}={value!r}")
    more = ", ..." if table.num_columns > max_columns else ""
    return f"row {row + 1} {{{', '.join(values)}{more}}}"


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first true value (nulls count as false), or None."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


def fail_rows(table: pa.Table, name: str, column: str, problem: str, mask: pa.Array, hint: str = "") -> None:
    row = _first_true(mask)
    if row is None:
        return
    count = int(pc.sum(pc.fill_null(mask, False).cast(pa.int64())).as_py())
    text = f"table {name}, column {column}: {problem} in {count} row(s), e.g. {example_row(table, row)}"
    raise DataError(text + (f"; {hint}" if hint else ""))


def _convert_column(table: pa.Table, name: str, column: str, target: pa.DataType) -> pa.ChunkedArray:
    values = table.column(column)
    source = values.type
    if source == target:
        return values
    if pa.types.is_string(target):
        return values.cast(pa.string())
    if pa.types.is_large_string(source) or pa.types.is_dictionary(source):
        values = values.cast(pa.string())
        source = pa.string()
    if pa.types.is_string(source):
        pattern = _INTEGER_TEXT if pa.types.is_integer(target) else _NUMBER_TEXT
        bad = pc.and_(pc.invert(pc.match_substring_regex(values, pattern)), pc.not_equal(values, ""))
        fail_rows(table, name, column, f"value is not of type {target}", bad)
        values = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
        if pa.types.is_integer(target):
            values = pc.replace_substring_regex(pc.utf8_trim_whitespace(values), r"\.0*$", "")
        return values.cast(target)
    if pa.types.is_integer(target) and pa.types.is_floating(source):
        finite = pc.is_finite(values)
        non_integral = pc.and_(finite, pc.not_equal(pc.floor(values), values))
        fail_rows(table, name, column, f"value is not an integer (expected {target})", non_integral)
        fail_rows(table, name, column, "value is NaN or infinite", pc.invert(finite))
        return values.cast(target)
    if (pa.types.is_integer(source) or pa.types.is_boolean(source) or pa.types.is_floating(source)) and (
        pa.types.is_integer(target) or pa.types.is_floating(target)
    ):
        try:
            return values.cast(target)
        except pa.ArrowInvalid as error:
            raise DataError(f"table {name}, column {column}: cannot convert {source} to {target}: {error}") from None
    raise DataError(f"table {name}, column {column}: has type {source}, expected {target}")


def conform_table(table: pa.Table, spec: RawTableSpec, name: str | None = None) -> pa.Table:
    """Check required columns, convert documented columns to their types, reject null ids.

    Returns a table with only the documented columns that are present, in schema order.
    """
    name = name or spec.name
    missing = sorted(spec.required - set(table.column_names))
    if missing:
        raise DataError(
            f"table {name}: missing column {missing[0]}"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + f"; required columns: {', '.join(sorted(spec.required))}"
        )
    columns, fields = [], []
    for field in spec.schema:
        if field.name not in table.column_names:
            continue
        columns.append(_convert_column(table, name, field.name, field.type))
        fields.append(field)
    conformed = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    for column in spec.id_columns:
        fail_rows(conformed, name, column, "missing id (null or NaN)", pc.is_null(conformed.column(column)))
    for column in sorted(spec.required - set(spec.id_columns)):
        values = conformed.column(column)
        missing_mask = pc.is_null(values, nan_is_null=True) if pa.types.is_floating(values.type) else pc.is_null(values)
        fail_rows(conformed, name, column, "missing value (null or NaN)", missing_mask)
    return conformed


def check_unique(table: pa.Table, name: str, column: str) -> None:
    """Feature tables hold one row per id."""
    ids = table.column(column).to_numpy()
    if len(ids) < 2:
        return
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    duplicate_positions = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(duplicate_positions) == 0:
        return
    duplicated = sorted_ids[duplicate_positions[0]]
    rows = np.flatnonzero(ids == duplicated)[:3] + 1
    raise DataError(
        f"table {name}, column {column}: duplicate id {duplicated} "
        f"({len(duplicate_positions)} duplicate row(s); id {duplicated} is in rows {', '.join(map(str, rows))}); "
        f"e.g. {example_row(table, int(rows[1] - 1))}"
    )


def check_references(
    table: pa.Table, name: str, column: str, known: pa.Array | pa.ChunkedArray, known_where: str
) -> None:
    """Every value of `table.column` must be one of `known` (the ids of `known_where`)."""
    unknown = pc.invert(pc.is_in(table.column(column), value_set=pa.chunked_array(known).combine_chunks()))
    fail_rows(table, name, column, f"id not found in {known_where}", unknown)


def check_timestamps(table: pa.Table, name: str, column: str, unit_ms: int) -> None:
    """NaN, non-positive and implausible timestamps (see the module docstring)."""
    values = table.column(column).cast(pa.float64())
    fail_rows(table, name, column, "timestamp is NaN", pc.is_nan(values))
    fail_rows(table, name, column, "timestamp is zero or negative", pc.less_equal(values, 0))
    low, high = PLAUSIBLE_MS[0] / unit_ms, PLAUSIBLE_MS[1] / unit_ms
    unit = "milliseconds" if unit_ms == 1 else "seconds"
    hint = f"{column} must be a Unix time in {unit} between 2000 and 2100"
    if unit_ms == 1:
        hint += " (values near 1.7e9 are seconds: multiply by 1000)"
    fail_rows(table, name, column, "implausible timestamp", pc.or_(pc.less(values, low), pc.greater_equal(values, high)), hint)


def upload_start_ms(video_features: pa.Table) -> pa.ChunkedArray | None:
    """upload_dt (YYYY-MM-DD) as Unix ms at 00:00 UTC; None when the column is absent."""
    if "upload_dt" not in video_features.column_names:
        return None
    text = pc.utf8_trim_whitespace(video_features.column("upload_dt"))
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    parsed = pc.strptime(text, format="%Y-%m-%d", unit="ms", error_is_null=True)
    unparsable = pc.and_(pc.is_valid(text), pc.is_null(parsed))
    fail_rows(video_features, "video_features", "upload_dt", "not a date of the form YYYY-MM-DD", unparsable)
    return parsed.cast(pa.int64())


def check_after_upload(
    table: pa.Table,
    name: str,
    time_column: str,
    video_column: str,
    unit_ms: int,
    video_ids: np.ndarray,
    upload_ms: np.ndarray,
) -> None:
    """An interaction earlier than its video's upload day (with one day of time-zone slack) is out of order.

    `video_ids` is sorted and `upload_ms` aligned with it (NaN-free int64, INT64_MIN where unknown).
    """
    interaction_video = table.column(video_column).to_numpy()
    position = np.searchsorted(video_ids, interaction_video)
    upload = upload_ms[np.minimum(position, len(video_ids) - 1)]
    interaction_ms = table.column(time_column).to_numpy().astype(np.float64) * unit_ms
    early = interaction_ms < (upload.astype(np.float64) - MS_PER_DAY)
    fail_rows(
        table, name, time_column,
        "interaction before the video's upload date (video_features.upload_dt)",
        pa.array(early),
        "timestamps out of order: an interaction must not precede its video's upload",
    )
