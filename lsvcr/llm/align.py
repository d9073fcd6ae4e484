"""`lsvcr align`: stage 1, personalized preference alignment (METHOD 5), on Ray Train.

    lsvcr align --data PREPARED --vectors VECTORS --mode frozen|lora --out ALIGNED

Every step takes a mixed batch of video-task and comment-task train samples (video rows first) and
computes, with the SR model in its stage-1 form (text only, random positions, history 20):
    p, n  SR preferences: F_v(H^v), F_v(H^c) for video rows; F_c(H^c; q), F_c(H^v; q) for comment rows
    z     LLM preference: contrast_adapter(last prompt token of the user's history prompt)
    t     target text: llm_adapter(llm_emb_mlp(mean-pooled LLM states of the target title / comment))
and minimises L_LM + 1.0·L_rec + 0.5·(L_VCC + L_SSC) (`alignment_losses.py`).
The SR model reads item texts through `llm_emb_mlp` too: the batch's distinct videos and comments
are looked up (or embedded live), passed through the MLP and handed to the SR model as batch-local
text tables (`video_text=` / `comment_text=` overrides, indices remapped; row 0 stays zeros).

Modes:
- `frozen` (scalable default): the LLM is not trained; its item vectors (MEAN) and user prompt
  vectors (LAST) come precomputed from `lsvcr encode`. No L_LM.
- `lora` (faithful): the LLM carries a peft LoRA adapter trained jointly; prompts are rendered per
  batch (random template, random hot comment among the top 3), item texts are embedded live with
  gradients, L_LM is the causal-LM loss of the target text after the prompt. bf16 autocast where the
  device supports it; optional gradient checkpointing.
Both: the prompt and the SR model see the same hot comments and ≤3 record comments (lsvcr.history_views' one
rule; frozen: the deterministic view the prompts were encoded with), except where METHOD 5.1's view
augmentation (`align.*view_aug*`, on by default) deliberately gives them different views.

Both run as a `TorchTrainer` with `align.num_workers` workers (DDP; gloo on CPU), checkpoint every
`align.checkpoint_every` steps, and resume from the latest checkpoint when re-run with the same
--out. After training (driver): stage-2 text vectors = llm_emb_mlp(raw item vectors) for frozen, or
for lora: merge the adapter, save the merged HF folder in ALIGNED/llm/, re-encode every item text
with vLLM (`lsvcr encode`'s path) and apply llm_emb_mlp (METHOD 5.4).

This module is the driver (`run_align`); the worker loop and the objective are in `align_worker.py`, the
stage-1 data and mixed batches in `align_data.py`, the LoRA'd LLM and the adapter merge in `lora.py`.

Output (docs/formats.md ALIGNED/): checkpoint.pt (`state_dict` keys = LSVCRModel's, so
`lsvcr finetune --init ALIGNED/checkpoint.pt` loads them), vectors/ (VECTORS format, 256-d),
train_log.jsonl, curves.png.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lsvcr import storage, train_driver
from lsvcr.config import LSVCRConfig, config_to_dict
from lsvcr.data.prepared import COMMENTS_FILE, read_table, read_videos, require_prepared
from lsvcr.errors import ConfigError, DataError
from lsvcr.llm.align_data import user_vector_table
from lsvcr.llm.align_worker import stage_one_model_config, train_loop_per_worker
from lsvcr.llm.encode import run_encode
from lsvcr.llm.heads import LLMHeads, column_statistics, export_text_vectors
from lsvcr.llm.lora import merge_lora
from lsvcr.llm.registry import resolve_model
from lsvcr.training_log import plot_curves, write_jsonl
from lsvcr.vectors import open_item_vectors, read_vectors_manifest, write_item_vectors

log = logging.getLogger("lsvcr.align")


def _llm_hidden_of(vectors_dir: Path) -> int:
    return int(read_vectors_manifest(vectors_dir)["dim"])


def _export_vectors(heads: LLMHeads, raw_vectors_dir: Path, data_dir: Path, out_dir: Path, manifest: dict) -> None:
    """Stage-2 text vectors = llm_emb_mlp(raw item vectors), written in the VECTORS format."""
    video_raw, comment_raw = open_item_vectors(raw_vectors_dir, data_dir)  # memory maps: exported in blocks
    video_ids = read_videos(data_dir, ["video_id"])["video_id"].to_numpy()
    comment_ids = comment_vectors = None
    if comment_raw is not None:
        comment_ids = read_table(data_dir, COMMENTS_FILE, ["comment_id"])["comment_id"].to_numpy()
        comment_vectors = export_text_vectors(heads, comment_raw[1:])
    write_item_vectors(out_dir, video_ids, export_text_vectors(heads, video_raw[1:]), comment_ids, comment_vectors,
                       manifest)


def frozen_standardization(vectors_dir: Path, data_dir: Path) -> dict[str, list[float]]:
    """align.standardize_llm_vectors: per-dimension mean and std of the item vectors (videos and comments) and
    of the user prompt vectors (both tasks) of VECTORS, for `LLMHeads.set_standardization`."""
    video_raw, comment_raw = open_item_vectors(vectors_dir, data_dir)
    item_mean, item_std = column_statistics([video_raw[1:]] + ([comment_raw[1:]] if comment_raw is not None else []))
    stored = [user_vector_table(vectors_dir, name) for name in ("users_video", "users_comment")]
    users = [vectors for _, vectors in filter(None, stored) if len(vectors)]
    if not users:
        raise DataError(f"VECTORS {vectors_dir} has no user vectors (frozen alignment needs `lsvcr encode --what users`)")
    user_mean, user_std = column_statistics(users)
    return {"item_shift": item_mean.tolist(), "item_scale": item_std.tolist(),
            "user_shift": user_mean.tolist(), "user_scale": user_std.tolist()}


def run_align(config: LSVCRConfig, data_dir: str | Path, vectors_dir: str | Path | None, out_dir: str | Path,
              mode: str | None = None) -> dict:
    """Train stage 1 on Ray Train and write ALIGNED/; returns a summary (seconds, final losses)."""
    config = copy.deepcopy(config)
    if mode is not None:
        config.align.mode = mode
    settings = config.align
    if settings.mode not in ("frozen", "lora"):
        raise ConfigError(f"align.mode must be frozen or lora; got {settings.mode!r}")
    started = time.perf_counter()
    out_uri = str(out_dir)
    out = storage.local_dir(out_uri).resolve()
    if storage.is_finished(out_uri):
        log.info("%s is already finished; delete it to align again", out_uri)
        return json.loads((storage.pull(out_uri) / "summary.json").read_text())
    data_dir = storage.pull(str(data_dir)).resolve()
    require_prepared(data_dir)
    vectors_dir = storage.pull(str(vectors_dir)).resolve() if vectors_dir else None
    model_path, standardization = None, None
    if settings.mode == "frozen":
        if vectors_dir is None:
            raise ConfigError("align.mode=frozen needs --vectors VECTORS (items and users from `lsvcr encode`)")
        _llm_hidden_of(vectors_dir)
        if settings.standardize_llm_vectors:
            standardization = frozen_standardization(vectors_dir, data_dir)
    else:
        if settings.standardize_llm_vectors:
            raise ConfigError("align.standardize_llm_vectors is for align.mode=frozen (in lora mode the LLM adapts)")
        model_path = resolve_model(config.encode.model)

    staging = train_driver.open_staging(out, config)
    loop_config = {"config": config_to_dict(config), "data_dir": str(data_dir),
                   "vectors_dir": str(vectors_dir) if vectors_dir else None,
                   "model_path": str(model_path) if model_path else None,
                   "log_path": str(staging / "train_log.jsonl"), "llm_standardization": standardization}
    trainer_settings = train_driver.TrainerSettings(
        num_workers=settings.num_workers, use_gpu=settings.use_gpu,
        threads_per_worker=settings.threads_per_worker, max_failures=settings.max_failures, checkpoints_to_keep=2,
        no_checkpoint_message="alignment produced no checkpoint (no train samples, or max_steps = 0?)",
        env_vars={"TOKENIZERS_PARALLELISM": "false"})
    saved = train_driver.fit(train_loop_per_worker, loop_config, trainer_settings, staging)
    train_seconds = time.perf_counter() - started

    trainable = saved["trainable"]
    sr_state = {name[len("sr."):]: value for name, value in trainable.items() if name.startswith("sr.")}
    heads_state = {name[len("heads."):]: value for name, value in trainable.items() if name.startswith("heads.")}
    llm_hidden = heads_state["contrast_adapter.weight"].shape[1]
    heads = LLMHeads(llm_hidden, settings.text_dim, config.model.hidden_size)
    if standardization is not None:
        heads.set_standardization(standardization)
    heads.load_state_dict({**heads.state_dict(), **heads_state})  # the trained weights; the fixed buffers as set

    vectors_manifest = {"model": config.encode.model, "pooling": "mean", "dtype": "float32",
                        "prompt_template": config.encode.prompt_template, "language": config.encode.language,
                        "aligned": settings.mode, "note": "llm_emb_mlp(mean-pooled LLM states), METHOD 5.4",
                        "throughput": {}}
    if settings.mode == "frozen":
        _export_vectors(heads, vectors_dir, data_dir, staging / "vectors", vectors_manifest)
    else:
        merged = merge_lora(model_path, trainable, config, staging / "llm.tmp")
        if (staging / "llm").exists():
            shutil.rmtree(staging / "llm")
        merged.rename(staging / "llm")
        raw_dir = staging / "raw_vectors"
        encoded = run_encode(config, data_dir, raw_dir, "items", model=str(staging / "llm"))
        vectors_manifest["throughput"] = encoded.get("throughput", {})
        vectors_manifest["model"] = f"{config.encode.model} + LoRA (merged: llm/)"
        if (staging / "vectors").exists():
            shutil.rmtree(staging / "vectors")
        _export_vectors(heads, raw_dir, data_dir, staging / "vectors", vectors_manifest)
        shutil.rmtree(raw_dir)

    torch.save({"model_config": asdict(stage_one_model_config(config)), "state_dict": sr_state,
                "text_mlp_state_dict": heads.llm_emb_mlp.state_dict(),
                "contrast_adapter_state_dict": heads.contrast_adapter.state_dict(),
                "mode": settings.mode, "llm": config.encode.model, "llm_hidden": llm_hidden,
                "text_dim": settings.text_dim, "steps": saved["state"]["step"],
                "llm_standardization": standardization}, staging / "checkpoint.pt")  # None: off
    history = saved["state"]["history"]
    write_jsonl(history, staging / "train_log.jsonl")
    plot_curves(history, staging / "curves.png", title=f"stage-1 alignment ({settings.mode})",
                loss_keys=("train_loss", "train_vcc", "train_ssc", "train_rec", "train_lm"), metric_keys=("lr",),
                x_key="step")
    summary = {"mode": settings.mode, "steps": saved["state"]["step"], "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - started, 1),
               "final": history[-1] if history else {}, "resumed_at": saved["state"]["resumed_at"],
               "workers": settings.num_workers}
    (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    train_driver.finalise(staging, out, out_uri, drop_ray_run=True)
    log.info("aligned (%s) in %.1f s: %s", settings.mode, summary["total_seconds"], summary["final"])
    return summary
