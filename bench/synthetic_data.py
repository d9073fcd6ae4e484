"""Shared by the benchmarks: a synthetic PREPARED directory, built once under a work directory."""

from __future__ import annotations

from pathlib import Path


def synthetic_prepared(work: Path, preset: str, file_format: str = "parquet") -> Path:
    """`lsvcr synth --preset PRESET --format FORMAT` → `lsvcr prepare`, reused when already there."""
    from lsvcr.data.prepare import prepare
    from lsvcr.data.synth import PRESETS, write_synthetic

    prepared = Path(work) / "prepared"
    if not (prepared / "manifest.json").is_file():
        raw = Path(work) / "raw"
        if not raw.is_dir():
            write_synthetic(raw, PRESETS[preset], file_format)
        prepare(raw, prepared)
    return prepared
