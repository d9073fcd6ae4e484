"""The stage-1 worker (METHOD 5): the alignment objective (SR model + LLM heads, + the LoRA'd LLM in lora mode)
and the Ray Train loop that minimises it, with its checkpoint state. `lsvcr.llm.align` drives it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lsvcr import train_driver
from lsvcr.config import LSVCRConfig, ModelConfig, config_from_dict
from lsvcr.llm.align_data import (
    AlignBatch, StageOneData, load_stage_one_data, make_align_batch, mixed_epoch_batches, view_augmentation,
)
from lsvcr.llm.alignment_losses import AlignmentLosses, alignment_losses
from lsvcr.llm.heads import LLMHeads
from lsvcr.llm.lora import LiveLLM, lora_prompt_inputs
from lsvcr.llm.prompts import PromptBuilder, load_item_texts
from lsvcr.model import LSVCRModel
from lsvcr.runtime import set_threads

log = logging.getLogger("lsvcr.align")


def stage_one_model_config(config: LSVCRConfig) -> ModelConfig:
    """The SR model in its stage-1 form: text only (no ID embeddings), METHOD 2.2."""
    model_config = copy.deepcopy(config.model)
    model_config.mode = "text"
    model_config.comment_like_prior = False  # a stage-2 extension: fine-tuning fits and learns its weight
    return model_config


# ----------------------------------------------------------------------------- the objective


class AlignmentObjective(nn.Module):
    """SR model + LLM heads (+ the LoRA'd LLM in lora mode): one `forward` = the stage-1 loss."""

    def __init__(self, config: LSVCRConfig, num_videos: int, llm_hidden: int, llm: "LiveLLM | None" = None):
        super().__init__()
        settings = config.align
        placeholder = torch.zeros(num_videos + 1, settings.text_dim)  # the real tables are batch-local
        self.sr = LSVCRModel(stage_one_model_config(config), num_videos, placeholder, torch.zeros(1, settings.text_dim))
        self.heads = LLMHeads(llm_hidden, settings.text_dim, config.model.hidden_size)
        self.llm = llm
        self.temperature = config.model.temperature
        self.rec_weight = settings.rec_loss_weight
        self.contrast_weight = settings.contrast_loss_weight

    def _text_table(self, raw: Tensor, indices: Tensor) -> Tensor:
        """llm_emb_mlp of the raw LLM vectors of `indices` (0 first); row 0 forced to zeros (padding)."""
        table = self.heads.item_text(raw.float())
        return table * (indices != 0).unsqueeze(-1).to(table.dtype)

    def forward(self, batch: AlignBatch, data: StageOneData, prompt_inputs: dict | None = None) -> AlignmentLosses:
        lm_loss = None
        if self.llm is None:  # frozen: precomputed LLM vectors
            raw_videos = data.raw_video[batch.videos].to(self.heads.contrast_adapter.weight.device)
            raw_comments = data.raw_comment[batch.comments].to(raw_videos.device)
            user = torch.cat([data.user_video[torch.from_numpy(batch.video_rows)],
                              data.user_comment[torch.from_numpy(batch.comment_rows)]]).to(raw_videos.device)
        else:  # lora: the LLM runs live, with gradients into its adapter
            raw_videos = self.llm.embed_texts(batch.videos, "video")
            raw_comments = self.llm.embed_texts(batch.comments, "comment")
            user, lm_loss = self.llm.prompt_forward(prompt_inputs)
        video_text = self._text_table(raw_videos, batch.videos.to(raw_videos.device))
        comment_text = self._text_table(raw_comments, batch.comments.to(raw_comments.device))

        sr, v = self.sr, slice(0, batch.num_video_rows)
        c = slice(batch.num_video_rows, None)
        states = sr.encode_histories(batch.history, random_positions=True, video_text=video_text,
                                     comment_text=comment_text)
        preference = [sr.pool_video(states.video_states[v], states.video_mask[v])]
        other = [sr.pool_video(states.comment_states[v], states.comment_mask[v])]
        if batch.num_video_rows < len(batch.current_video):
            current = batch.current_video[c]
            preference.append(sr.target_attend(states.comment_states[c], states.comment_mask[c], current, video_text))
            other.append(sr.target_attend(states.video_states[c], states.video_mask[c], current, video_text))
        target_text = sr.llm_adapter(torch.cat([video_text[batch.target_video], comment_text[batch.target_comment]]))
        return alignment_losses(
            sr_preference=torch.cat(preference), other_branch=torch.cat(other),
            llm_preference=self.heads.preference(user.float()), target_text=target_text,
            temperature=self.temperature, rec_weight=self.rec_weight, contrast_weight=self.contrast_weight,
            lm_loss=lm_loss,
        )


def _batch_to(batch: AlignBatch, device: torch.device) -> AlignBatch:
    moved = copy.copy(batch)
    moved.history = batch.history.to(device)
    for name in ("current_video", "target_video", "target_comment"):
        setattr(moved, name, getattr(batch, name).to(device))
    return moved


# ----------------------------------------------------------------------------- the worker loop


def _linear_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return max(0.0, (total - step) / max(total - warmup, 1))


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker. `loop_config`: config (dict), data_dir, vectors_dir, model_path (lora),
    log_path (rank 0 appends train_log.jsonl rows there), llm_standardization (frozen: fixed head inputs' stats)."""
    import ray.train
    import ray.train.torch

    # 1. config, threads, this worker's place in the group
    config = config_from_dict(loop_config["config"])
    settings = config.align
    set_threads(settings.threads_per_worker)
    torch.manual_seed(settings.seed)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    data_dir = Path(loop_config["data_dir"])
    vectors_dir = Path(loop_config["vectors_dir"]) if loop_config.get("vectors_dir") else None
    frozen = settings.mode == "frozen"

    # 2. data (frozen: with the precomputed LLM vectors) and, in lora mode, the live LLM
    data = load_stage_one_data(config, data_dir, vectors_dir, frozen)

    llm = builder = None
    if frozen:
        llm_hidden = data.raw_video.shape[1]
    else:
        texts = load_item_texts(data_dir)
        llm = LiveLLM(Path(loop_config["model_path"]), config, texts, device)
        llm_hidden = llm.hidden_size
        builder = PromptBuilder(llm.tokenizer, texts, language=config.encode.language,
                                max_prompt_tokens=config.encode.max_prompt_tokens)

    # 3. the objective, optimizer and linear warm-up/decay schedule
    objective = AlignmentObjective(config, data.tables.num_videos, llm_hidden, llm).to(device)
    if loop_config.get("llm_standardization"):
        objective.heads.set_standardization(loop_config["llm_standardization"])
    trainable = [p for p in objective.parameters() if p.requires_grad]
    augmentation = view_augmentation(config)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)

    per_rank_batch = max(1, settings.batch_size // world_size)  # align.batch_size is the global batch
    steps_per_epoch = (len(data.video) + data.num_comment_samples) // world_size // per_rank_batch \
        + bool(((len(data.video) + data.num_comment_samples) // world_size) % per_rank_batch)
    total_steps = steps_per_epoch * settings.epochs
    if settings.max_steps > 0:
        total_steps = min(total_steps, settings.max_steps)
    warmup = int(math.ceil(settings.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _linear_schedule(step, total_steps, warmup))


    # 4. resume from the latest checkpoint, if Ray Train restored one
    state: dict[str, Any] = {"step": 0, "history": [], "resumed_at": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        saved = train_driver.load_checkpoint_state(checkpoint)
        _load_trainable_state(objective, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        state["resumed_at"].append(state["step"])
        log.info("resuming alignment at step %d", state["step"])

    model = objective
    if world_size > 1:
        model = train_driver.wrap_ddp(objective, move_to_device=False)

    # 5. the steps: a mixed batch, the stage-1 loss, a log row every log_every, a checkpoint every checkpoint_every
    log_path = Path(loop_config["log_path"]) if loop_config.get("log_path") and rank == 0 else None
    sums, counted, window_start = np.zeros(5), 0, time.perf_counter()
    progress = tqdm(total=total_steps, initial=state["step"], desc=f"align ({settings.mode})", disable=rank != 0,
                    mininterval=2.0)
    batches_of_epoch: dict[int, list] = {}
    epoch_losses, epoch_started = [], time.perf_counter()
    while state["step"] < total_steps:
        step = state["step"]
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in batches_of_epoch:  # the same permutation on every rank (seeded by the epoch)
            batches_of_epoch = {epoch: mixed_epoch_batches(len(data.video), data.num_comment_samples, per_rank_batch,
                                                           np.random.default_rng([settings.seed, epoch]), rank,
                                                           world_size)}
        video_rows, comment_rows = batches_of_epoch[epoch][index]
        batch_rng = np.random.default_rng([settings.seed, step, rank, 1])
        batch = make_align_batch(data, video_rows, comment_rows, batch_rng, augmentation)
        prompt_inputs = lora_prompt_inputs(llm, builder, batch, batch_rng) if llm is not None else None
        model.train()
        losses = model(_batch_to(batch, device), data, prompt_inputs)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        scheduler.step()
        values = losses.as_floats()
        sums += [values[k] for k in ("total", "vcc", "ssc", "rec", "lm")]
        counted += 1
        state["step"] = step + 1
        progress.update(1)
        progress.set_postfix(loss=f"{values['total']:.4f}", refresh=False)  # the bar redraws at mininterval
        epoch_losses.append(values["total"])
        if index + 1 == steps_per_epoch:
            if rank == 0:
                log.info("align epoch %d/%d: loss %.4f  %.1f s", epoch + 1, settings.epochs, float(np.mean(epoch_losses)),
                         time.perf_counter() - epoch_started)
            epoch_losses, epoch_started = [], time.perf_counter()
        done = state["step"] == total_steps
        if state["step"] % settings.log_every == 0 or done or state["step"] % settings.checkpoint_every == 0:
            mean = sums / max(counted, 1)
            row = {"step": state["step"], "epoch": epoch + (index + 1) / steps_per_epoch,
                   **{f"train_{name}": float(value) for name, value in zip(("loss", "vcc", "ssc", "rec", "lm"), mean)},
                   "lr": scheduler.get_last_lr()[0],
                   "seconds_per_step": (time.perf_counter() - window_start) / max(counted, 1)}
            state["history"].append(row)
            if log_path is not None:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            sums, counted, window_start = np.zeros(5), 0, time.perf_counter()
        if state["step"] % settings.checkpoint_every == 0 or done:
            _report(rank, state, objective, optimizer, scheduler)
    progress.close()


def _trainable_state(objective: AlignmentObjective) -> dict[str, Tensor]:
    """Everything that trains: the SR model, the heads and (lora) the adapter weights only."""
    return {name: p.detach().cpu().clone() for name, p in objective.named_parameters() if p.requires_grad}


def _load_trainable_state(objective: AlignmentObjective, saved: dict[str, Tensor]) -> None:
    parameters = dict(objective.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            parameters[name].copy_(value)


def _report(rank: int, state: dict, objective: AlignmentObjective, optimizer, scheduler) -> None:
    import ray.train

    metrics = dict(state["history"][-1]) if state["history"] else {"step": state["step"]}

    def payload() -> dict:
        return {"trainable": _trainable_state(objective), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "state": state}

    train_driver.report(ray.train.report, metrics, payload if rank == 0 else None, ray.train.Checkpoint)

