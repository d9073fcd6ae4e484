"""Stage outputs round-trip through a URI root (file:// goes through the same pyarrow path as s3://)."""

from lsvcr import storage


def test_local_root_is_used_in_place(tmp_path):
    uri = str(tmp_path / "stage")
    assert storage.local_dir(uri) == tmp_path / "stage"
    assert not storage.is_finished(uri)
    (tmp_path / "stage").mkdir()
    storage.mark_finished(tmp_path / "stage")
    assert storage.is_finished(uri)


def test_remote_root_push_then_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("LSVCR_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/bucket/run/prepared"
    local = storage.local_dir(uri)
    assert str(local).startswith(str(tmp_path / "cache"))
    (local / "sub").mkdir(parents=True)
    (local / "a.parquet").write_bytes(b"abc")
    (local / "sub" / "b.json").write_text("{}")
    assert not storage.is_finished(uri)
    storage.mark_finished(local)
    storage.push(local, uri)
    assert storage.is_finished(uri)
    assert (tmp_path / "bucket/run/prepared/sub/b.json").read_text() == "{}"
    # Another node: empty cache, pulls the finished output.
    monkeypatch.setenv("LSVCR_CACHE", str(tmp_path / "cache2"))
    pulled = storage.pull(uri)
    assert (pulled / "a.parquet").read_bytes() == b"abc" and (pulled / storage.SUCCESS_MARKER).exists()


def test_unfinished_upload_is_not_trusted(tmp_path):
    uri = f"file://{tmp_path}/bucket/x"
    (tmp_path / "bucket/x").mkdir(parents=True)
    (tmp_path / "bucket/x/half.parquet").write_bytes(b"partial")
    assert not storage.is_finished(uri)
