"""Bad raw data → one clear DataError naming the table, the column and an example row; nothing written."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lsvcr.cli import main as cli_main
from lsvcr.data.prepare import prepare
from lsvcr.errors import DataError

TABLES = ("user_video_inter", "user_comment_inter", "video_features", "comment_features", "user_features")


@pytest.fixture(scope="module")
def raw_frames(tiny_raw_dir):
    return {name: pq.read_table(tiny_raw_dir / f"{name}.parquet").to_pandas() for name in TABLES}


def write_raw(directory, frames, file_format="parquet"):
    directory.mkdir()
    for name, frame in frames.items():
        if frame is None:
            continue
        if file_format == "csv":
            frame.to_csv(directory / f"{name}.csv", index=False)
        else:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), directory / f"{name}.parquet")
    return directory


def edited(frames, name, edit):
    copies = {key: frame.copy() for key, frame in frames.items()}
    copies[name] = edit(copies[name])
    return copies


def set_value(column, row, value):
    def edit(frame):
        if isinstance(value, str) or (isinstance(value, float) and not float(value).is_integer()) or (
                isinstance(value, float) and math.isnan(value)):
            frame[column] = frame[column].astype(object if isinstance(value, str) else float)
        frame.loc[row, column] = value
        return frame
    return edit


def _other_video(frames):
    return int(frames["video_features"].video_id.iloc[1])


CASES = {
    "missing table": ("video_features", lambda f: None, "parquet",
                      ["missing table video_features"]),
    "missing comment table of the pair": ("comment_features", lambda f: None, "parquet",
                                          ["missing table comment_features", "user_comment_inter is present"]),
    "missing column": ("user_video_inter", lambda f: f.drop(columns=["is_like"]), "csv",
                       ["table user_video_inter: missing column is_like", "required columns: "]),
    "text in an id column": ("user_video_inter", set_value("video_id", 2, "abc"), "csv",
                             ["table user_video_inter, column video_id", "not of type int64", "row 3", "'abc'"]),
    "fraction in a flag": ("user_video_inter", set_value("is_like", 4, 0.5), "parquet",
                           ["table user_video_inter, column is_like", "not an integer", "row 5"]),
    "NaN id": ("user_comment_inter", set_value("user_id", 1, float("nan")), "parquet",
               ["table user_comment_inter, column user_id", "missing id", "row 2"]),
    "empty id in CSV": ("comment_features", set_value("comment_id", 3, float("nan")), "csv",
                        ["table comment_features, column comment_id", "missing id", "row 4"]),
    "duplicate video id": ("video_features", lambda f: pd.concat([f, f.iloc[[7]]], ignore_index=True), "parquet",
                           ["table video_features, column video_id", "duplicate id", "row"]),
    "duplicate comment id": ("comment_features", lambda f: pd.concat([f.iloc[[0]], f], ignore_index=True), "csv",
                             ["table comment_features, column comment_id", "duplicate id", "rows 1, 2"]),
    "unknown video": ("user_video_inter", set_value("video_id", 6, 123), "parquet",
                      ["table user_video_inter, column video_id", "not found in video_features.video_id", "row 7",
                       "video_id=123"]),
    "unknown comment": ("user_comment_inter", set_value("comment_id", 0, 456), "parquet",
                        ["table user_comment_inter, column comment_id", "not found in comment_features", "row 1"]),
    "comment under another video": ("user_comment_inter", None, "parquet",
                                    ["table user_comment_inter, column photo_id", "differs from comment_features.video_id",
                                     "row 1"]),
    "negative timestamp": ("user_video_inter", set_value("time_ms", 5, -10.0), "parquet",
                           ["table user_video_inter, column time_ms", "zero or negative", "row 6"]),
    "NaN timestamp": ("user_video_inter", set_value("time_ms", 5, float("nan")), "parquet",
                      ["table user_video_inter, column time_ms", "NaN", "row 6"]),
    "seconds instead of milliseconds": (
        "user_video_inter", lambda f: f.assign(time_ms=np.floor(f.time_ms / 1000)), "parquet",
        ["table user_video_inter, column time_ms", "implausible timestamp", "seconds", "row 1"]),
    "comment interaction before the upload": ("user_comment_inter", None, "parquet",
                                              ["table user_comment_inter, column time_stamp",
                                               "before the video's upload date", "row 1"]),
    "unparsable upload date": ("video_features", set_value("upload_dt", 2, "yesterday"), "csv",
                               ["table video_features, column upload_dt", "YYYY-MM-DD", "row 3"]),
}


def _special_edit(case, frames):
    if case == "comment under another video":
        def edit(frame):
            frame.loc[0, "photo_id"] = int(frames["video_features"].video_id[
                frames["video_features"].video_id != frame.photo_id[0]].iloc[0])
            return frame
        return edit
    if case == "comment interaction before the upload":
        def edit(frame):
            upload = pd.Timestamp(frames["video_features"].set_index("video_id").upload_dt[frame.photo_id[0]])
            frame.loc[0, "time_stamp"] = int(upload.timestamp()) - 3 * 86_400
            return frame
        return edit
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_bad_raw_data_is_reported_clearly(case, raw_frames, tmp_path):
    table, edit, file_format, expected = CASES[case]
    edit = edit or _special_edit(case, raw_frames)
    frames = edited(raw_frames, table, edit)
    raw = write_raw(tmp_path / "raw", frames, file_format)
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        prepare(raw, out)
    message = str(error.value)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert "\n" not in message
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no half-written output or temp dir


def test_valid_tables_in_csv_give_the_same_samples_as_parquet(raw_frames, tmp_path, tiny_prepared_dir):
    raw = write_raw(tmp_path / "raw", raw_frames, "csv")
    manifest = prepare(raw, tmp_path / "out")
    assert manifest["has_comments"] and manifest["counts"]["video_samples"]["test"] > 0
    for name in ("videos", "comments", "video_samples.test", "comment_samples.valid", "video_samples.train"):
        from_csv = pq.read_table(tmp_path / "out" / f"{name}.parquet")
        assert from_csv.equals(pq.read_table(tiny_prepared_dir / f"{name}.parquet")), name


def test_cli_missing_column_exits_2_with_one_line(raw_frames, tmp_path, capsys):
    frames = edited(raw_frames, "comment_features", lambda f: f.drop(columns=["comment_content"]))
    raw = write_raw(tmp_path / "raw", frames, "csv")
    code = cli_main(["prepare", "--raw", str(raw), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lsvcr prepare: error: table comment_features: missing column comment_content")
    assert not (tmp_path / "out").exists()


def test_missing_raw_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no known raw layout"):
        prepare(tmp_path / "empty", tmp_path / "out")
