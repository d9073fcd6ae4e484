"""Shared by the benchmarks: a synthetic PREPARED directory built once, and one in-process training run."""

from __future__ import annotations

from pathlib import Path


def synthetic_prepared(work: Path, preset: str, file_format: str = "parquet") -> Path:
    """`lsvcr synth --preset PRESET --format FORMAT` → `lsvcr prepare`, reused when already there."""
    from lsvcr.data.prepare import prepare
    from lsvcr.data.prepared import is_prepared
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic

    prepared = Path(work) / "prepared"
    if not is_prepared(prepared):
        raw = Path(work) / "raw"
        if not raw.is_dir():
            write_synthetic(raw, PRESETS[preset], file_format)
        prepare(raw, prepared)
    return prepared


def train_in_process(config, data: Path, vectors: Path | None, log_path: Path, seed: int, init: Path | None = None):
    """One fine-tuning run in this process (no Ray), its log at `log_path`, from stage-1 weights `init` if given;
    returns (best model, loop state)."""
    import torch

    from lsvcr.baselines import build_model
    from lsvcr.sample_arrays import load_comment_pools
    from lsvcr.evaluate import load_text_tables
    from lsvcr.finetune import make_loop_config
    from lsvcr.finetune_worker import train_loop_per_worker

    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    torch.manual_seed(seed)
    state = train_loop_per_worker(make_loop_config(config, data, vectors, init, log_path=log_path, report_to="local"))
    video_text, comment_text = load_text_tables(config, data, vectors)
    tables = load_comment_pools(data)
    trained = build_model(config.model, tables.num_videos, video_text, comment_text,
                          torch.from_numpy(tables.comment_likes))
    trained.load_state_dict(state["best_state"])
    return trained, state
