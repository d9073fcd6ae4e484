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

Output (docs/formats.md ALIGNED/): checkpoint.pt (`state_dict` keys = LSVCRModel's, so
`lsvcr finetune --init ALIGNED/checkpoint.pt` loads them), vectors/ (VECTORS format, 256-d),
train_log.jsonl, curves.png.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lsvcr import storage, train_driver
from lsvcr.batching import HistoryBatch, epoch_rows, make_batch
from lsvcr.history_views import STAGE_ONE_COMMENTS_PER_RECORD
from lsvcr.sample_arrays import ItemTables, load_item_tables
from lsvcr.sample_stream import SampleStream, open_sample_stream
from lsvcr.config import LSVCRConfig, ModelConfig, config_from_dict, config_to_dict
from lsvcr.data.prepared import COMMENTS_FILE, load_manifest, read_table, read_videos, require_prepared
from lsvcr.errors import ConfigError, DataError, ModelNotFoundError
from lsvcr.llm.alignment_losses import AlignmentLosses, alignment_losses
from lsvcr.llm.encode import run_encode
from lsvcr.llm.heads import LLMHeads, export_text_vectors, last_token, mean_pool
from lsvcr.llm.prompts import ItemTexts, PromptBuilder, PromptHistories, load_item_texts
from lsvcr.llm.registry import resolve_model
from lsvcr.model import LSVCRModel
from lsvcr.training_log import plot_curves, write_jsonl
from lsvcr.runtime import set_threads
from lsvcr.vectors import open_item_tensors, open_item_vectors, read_vector_table, read_vectors_manifest, write_item_vectors

log = logging.getLogger("lsvcr.align")

STATE_FILE = train_driver.STATE_FILE
LLAMA_STYLE_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stage_one_model_config(config: LSVCRConfig) -> ModelConfig:
    """The SR model in its stage-1 form: text only (no ID embeddings), METHOD 2.2."""
    model_config = copy.deepcopy(config.model)
    model_config.mode = "text"
    model_config.comment_like_prior = False  # a stage-2 extension: fine-tuning fits and learns its weight
    return model_config


# ----------------------------------------------------------------------------- batches


@dataclass
class AlignBatch:
    """A mixed batch in batch-local indices (row 0 of every local table = padding)."""

    history: HistoryBatch  # local indices
    num_video_rows: int
    current_video: Tensor  # [B] local video index (comment rows: the watched video)
    target_video: Tensor  # [Bv] local video index of the video rows' targets
    target_comment: Tensor  # [Bc] local comment index of one positive comment of each comment row
    videos: Tensor  # [Vb] PREPARED video_idx of the local video table (0 first)
    comments: Tensor  # [Cb] PREPARED comment_idx of the local comment table (0 first)
    video_rows: np.ndarray  # sample rows in video_samples.train
    comment_rows: np.ndarray  # sample rows in comment_samples.train
    global_history: HistoryBatch  # PREPARED indices (for prompts)
    global_current_video: np.ndarray
    global_targets: tuple[np.ndarray, np.ndarray]  # (target video_idx of video rows, comment_idx of comment rows)


def _pad_to(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    padding = []
    for have, want in reversed(list(zip(tensor.shape[1:], shape))):
        padding += [0, want - have]
    return F.pad(tensor, padding)


def concat_histories(parts: list[HistoryBatch]) -> HistoryBatch:
    """Stack HistoryBatches of different padded widths (zeros are padding)."""
    names = ("video_history", "video_history_hot_comment", "comment_history_videos", "comment_history_comments")
    merged = {}
    for name in names:
        tensors = [getattr(part, name) for part in parts]
        shape = tuple(max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim()))
        merged[name] = torch.cat([_pad_to(t, shape) for t in tensors], dim=0)
    return HistoryBatch(**merged)


def _localize(indices: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Distinct indices (0 first) and every input re-expressed as positions in that list."""
    flat = torch.cat([torch.zeros(1, dtype=torch.long)] + [t.reshape(-1) for t in indices])
    distinct, inverse = torch.unique(flat, return_inverse=True)
    out, start = [], 1
    for t in indices:
        out.append(inverse[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return distinct, out


def make_align_batch(data: "StageOneData", video_rows: np.ndarray, comment_rows: np.ndarray,
                     rng: np.random.Generator, augmentation: Any = None) -> AlignBatch:
    """A stage-1 batch; `augmentation` (lsvcr.history_views.ViewAugmentation, METHOD 5.1) gives the SR model and the
    prompt different views (`history` vs `global_history`)."""
    # The SR model sees the comments the LLM prompt shows (lsvcr.history_views' rule): lora renders its prompts from
    # this batch's own draw (`global_history`); frozen prompts were encoded once with the deterministic view.
    views = {"comments_per_record": STAGE_ONE_COMMENTS_PER_RECORD, "deterministic_views": data.raw_video is not None}
    parts, current, target_videos, target_comments = [], [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(video_rows):
        batch = make_batch(data.video, data.tables, video_rows, rng=rng, **views)
        parts.append(batch.history)
        current.append(batch.target_video)
        target_videos = batch.target_video.numpy()
    if len(comment_rows):
        batch = make_batch(data.comment, data.tables, comment_rows, rng=rng, comment_negatives=1, **views)
        parts.append(batch.history)
        current.append(batch.target_video)
        target_comments = batch.candidates[:, 0].numpy()  # column 0: a random positive comment
    history = prompt_history = concat_histories(parts)
    if augmentation is not None and augmentation.enabled:
        history, prompt_history = _augmented(history, data, rng, augmentation)
    current_video = torch.cat(current)
    videos, (video_history, comment_history_videos, current_local, target_video_local) = _localize(
        [history.video_history, history.comment_history_videos, current_video, torch.from_numpy(target_videos)])
    comments, (hot_local, record_comments_local, target_comment_local) = _localize(
        [history.video_history_hot_comment, history.comment_history_comments, torch.from_numpy(target_comments)])
    local = HistoryBatch(video_history=video_history, video_history_hot_comment=hot_local,
                         comment_history_videos=comment_history_videos, comment_history_comments=record_comments_local)
    return AlignBatch(local, len(video_rows), current_local, target_video_local, target_comment_local, videos, comments,
                      video_rows, comment_rows, prompt_history, current_video.numpy(), (target_videos, target_comments))


def _augmented(history, data: "StageOneData", rng: np.random.Generator, augmentation) -> tuple[Any, Any]:
    """(SR view, prompt view) of a batch's histories under METHOD 5.1's view augmentation."""
    from lsvcr.history_views import augment_views
    from lsvcr.model import HistoryBatch

    prompt_hot, sr_hot, prompt_records, sr_records = augment_views(
        history.video_history.numpy(), history.video_history_hot_comment.numpy(),
        history.comment_history_videos.numpy(), history.comment_history_comments.numpy(), data.tables, rng,
        augmentation, prompt_fixed=data.raw_video is not None)

    def view(hot: np.ndarray, records: np.ndarray) -> HistoryBatch:
        return HistoryBatch(video_history=history.video_history, video_history_hot_comment=torch.from_numpy(hot),
                            comment_history_videos=history.comment_history_videos,
                            comment_history_comments=torch.from_numpy(records))

    return view(sr_hot, sr_records), view(prompt_hot, prompt_records)


def view_augmentation(config: LSVCRConfig):
    """The stage-1 view augmentation of `config.align` (lsvcr.history_views.ViewAugmentation)."""
    from lsvcr.history_views import ViewAugmentation

    settings = config.align
    return ViewAugmentation(settings.video_view_aug_p, settings.comment_view_aug_p, settings.view_aug_item_p,
                            settings.view_aug_popular)


def mixed_epoch_batches(num_video: int, num_comment: int, batch_size: int, rng: np.random.Generator, rank: int,
                        world_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A shuffled epoch over the concatenation of both tasks' train samples (METHOD 5.1), sharded so
    every rank gets the same number of equally sized batches; each batch split into its
    (video rows, comment rows)."""
    batches = epoch_rows(num_video + num_comment, batch_size, rng, rank, world_size)
    return [(np.sort(rows[rows < num_video]), np.sort(rows[rows >= num_video] - num_video)) for rows in batches]


# ----------------------------------------------------------------------------- data and the objective


@dataclass
class StageOneData:
    tables: ItemTables
    video: SampleStream  # video_samples.train
    comment: SampleStream | None  # comment_samples.train (None: video-only data)
    raw_video: Tensor | None = None  # frozen: [V+1, D] LLM item vectors (row 0 zeros)
    raw_comment: Tensor | None = None  # frozen: [C+1, D]
    user_video: Tensor | None = None  # frozen: [Nv, D] LLM prompt vectors by sample row
    user_comment: Tensor | None = None  # frozen: [Nc, D]

    @property
    def num_comment_samples(self) -> int:
        return 0 if self.comment is None else len(self.comment)


def _read_user_vectors(vectors_dir: Path, name: str, num_samples: int) -> tuple[np.ndarray, Tensor]:
    """(sample rows that have a vector, their vectors) of `users_video` / `users_comment`."""
    table = read_vector_table(vectors_dir, name, "sample_row")
    if table is None:
        raise DataError(f"VECTORS {vectors_dir} has no {name} (frozen alignment needs `lsvcr encode --what users`)")
    rows = table["sample_row"].to_numpy()
    column = table["vector"].combine_chunks()
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(rows), column.type.list_size)
    if len(rows) == 0:
        raise DataError(f"VECTORS {name} is empty")
    if rows.min() < 0 or rows.max() >= num_samples or len(np.unique(rows)) != len(rows):
        raise DataError(f"VECTORS {name}: sample_row values do not index the {num_samples} train samples "
                        "(encoded from another PREPARED?)")
    order = np.argsort(rows)
    return rows[order], torch.from_numpy(np.nan_to_num(vectors[order]).astype(np.float32))


def load_stage_one_data(config: LSVCRConfig, data_dir: Path, vectors_dir: Path | None, frozen: bool) -> StageOneData:
    settings = config.align
    has_comments = bool(load_manifest(data_dir).get("has_comments"))
    tables = load_item_tables(data_dir)
    video = open_sample_stream(data_dir, "video", "train", settings.history_length, config.data.max_comments_per_record)
    comment = (open_sample_stream(data_dir, "comment", "train", settings.history_length,
                                  config.data.max_comments_per_record) if has_comments else None)
    data = StageOneData(tables, video, comment)
    if frozen:
        # Memory maps shared by the node's workers: a batch gathers only its rows (issue #16).
        data.raw_video, raw_comment = open_item_tensors(vectors_dir, data_dir)
        data.raw_comment = raw_comment if raw_comment is not None else torch.zeros(1, data.raw_video.shape[1])
        # Train on the samples whose prompts were encoded (all, or encode.max_user_samples of them).
        rows, data.user_video = _read_user_vectors(vectors_dir, "users_video", len(video))
        data.video = video.select(rows)  # the samples that have LLM user vectors
        data.user_comment = torch.zeros(0, data.raw_video.shape[1])
        if comment is not None:
            rows, data.user_comment = _read_user_vectors(vectors_dir, "users_comment", len(comment))
            data.comment = comment.select(rows)
    return data


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


# ----------------------------------------------------------------------------- the LoRA'd LLM


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_lora_targets(model: nn.Module) -> list[str]:
    """Every linear layer inside the transformer blocks (METHOD 4.1's choice for ChatGLM3), by the
    leaf names of nn.Linear modules under `layers`/`h`/`blocks`; the LM head is never a target."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(f".{k}." in f".{name}" for k in ("layers", "h", "blocks"))}
    if not names:
        raise ConfigError("could not find the LLM's block linear layers; set align.lora_target_modules")
    return sorted(names)


class LiveLLM(nn.Module):
    """A causal LM with a LoRA adapter, used live in stage 1: item texts (mean pool), user prompts
    (last prompt token + L_LM on the response)."""

    def __init__(self, model_path: Path, config: LSVCRConfig, texts: ItemTexts, device: torch.device):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        settings = config.align
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        targets = settings.lora_target_modules or default_lora_targets(base)
        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          bias="none", task_type="CAUSAL_LM", target_modules=targets)
        self.model = get_peft_model(base, lora)
        if settings.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.enable_input_require_grads()
        self.texts = texts
        self.max_text_tokens = config.encode.max_text_tokens
        self.max_response_tokens = settings.max_response_tokens
        self.autocast = settings.bf16 and bf16_supported(device)
        self.device_type = device.type
        self.empty_token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id
        self.pad_token = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.empty_token

    @property
    def hidden_size(self) -> int:
        return self.model.get_base_model().config.hidden_size

    def _decoder(self) -> nn.Module:
        return self.model.get_base_model().model  # the transformer without the LM head (final norm applied)

    def _pad(self, sequences: list[list[int]]) -> tuple[Tensor, Tensor]:
        device = next(self.model.parameters()).device
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        return ids.to(device), mask.to(device)

    def embed_texts(self, indices: Tensor, kind: str) -> Tensor:
        """Mean-pooled final states of the captions / comment contents of `indices` (row for 0: zeros)."""
        table = self.texts.captions if kind == "video" else self.texts.contents
        strings = [str(s) for s in table[indices.cpu().numpy()]]
        token_ids = self.tokenizer(strings, add_special_tokens=False, truncation=True,
                                   max_length=self.max_text_tokens)["input_ids"]
        ids, mask = self._pad([x if x else [self.empty_token] for x in token_ids])
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self._decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return mean_pool(hidden.float(), mask)

    def prompt_inputs(self, prompts: list[str], responses: list[str]) -> dict:
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = self.tokenizer(responses, add_special_tokens=False, truncation=True,
                                      max_length=self.max_response_tokens)["input_ids"]
        eos = self.tokenizer.eos_token_id
        sequences = [p + r + [eos] for p, r in zip(prompt_ids, response_ids)]
        return {"sequences": sequences, "prompt_lengths": [len(p) for p in prompt_ids]}

    def prompt_forward(self, inputs: dict) -> tuple[Tensor, Tensor]:
        """(last-prompt-token states [B, H], L_LM): teacher-forced causal-LM loss on the responses only."""
        ids, mask = self._pad(inputs["sequences"])
        prompt_lengths = torch.tensor(inputs["prompt_lengths"], device=ids.device)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self._decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            # Logits only where a response token is predicted: position t predicts token t+1.
            lengths = mask.sum(1)
            positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
            predicts_response = (positions >= prompt_lengths[:, None] - 1) & (positions < lengths[:, None] - 1)
            logits = self.model.get_base_model().lm_head(hidden[predicts_response])
        targets = ids[:, 1:][predicts_response[:, :-1]]
        lm_loss = F.cross_entropy(logits.float(), targets)
        return last_token(hidden.float(), prompt_lengths), lm_loss


def lora_prompt_inputs(llm: LiveLLM, builder: PromptBuilder, batch: AlignBatch, rng: np.random.Generator) -> dict:
    """Render this batch's prompts (random template per row, METHOD 4.2) and responses (target texts)."""
    history = batch.global_history
    histories = PromptHistories(
        video_history=history.video_history.numpy(), hot_comment=history.video_history_hot_comment.numpy(),
        comment_history_videos=history.comment_history_videos.numpy(),
        comment_history_comments=history.comment_history_comments.numpy(),
        current_video=batch.global_current_video)
    templates = rng.integers(0, 2, len(batch.global_current_video))
    prompts: list[str] = []
    v = batch.num_video_rows
    for task, rows in (("video", slice(0, v)), ("comment", slice(v, None))):
        part = PromptHistories(**{name: getattr(histories, name)[rows] for name in
                                  ("video_history", "hot_comment", "comment_history_videos",
                                   "comment_history_comments", "current_video")})
        if len(part.current_video):
            prompts += builder.build(task, part, templates[rows])
    target_videos, target_comments = batch.global_targets
    responses = [str(s) for s in llm.texts.captions[target_videos]] + [str(s) for s in llm.texts.contents[target_comments]]
    return llm.prompt_inputs(prompts, responses)


# ----------------------------------------------------------------------------- the worker loop


def _linear_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return max(0.0, (total - step) / max(total - warmup, 1))


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker. `loop_config`: config (dict), data_dir, vectors_dir, model_path (lora),
    log_path (rank 0 appends train_log.jsonl rows there)."""
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


# ----------------------------------------------------------------------------- the driver


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


def _merge_lora(model_path: Path, trainable: dict[str, Tensor], config: LSVCRConfig, out_dir: Path) -> Path:
    """Base LLM + the trained adapter → a merged plain Hugging Face folder (what vLLM loads)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = config.align
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    targets = settings.lora_target_modules or default_lora_targets(base)
    peft_model = get_peft_model(base, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                                 lora_dropout=settings.lora_dropout, bias="none",
                                                 task_type="CAUSAL_LM", target_modules=targets))
    prefix = "llm.model."
    adapter = {name[len(prefix):]: value for name, value in trainable.items() if name.startswith(prefix)}
    missing = set(adapter) - {name for name, _ in peft_model.named_parameters()}
    if missing:
        raise ModelNotFoundError(f"LoRA checkpoint does not match {model_path}: e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        parameters = dict(peft_model.named_parameters())
        for name, value in adapter.items():
            parameters[name].copy_(value)
    merged = peft_model.merge_and_unload()
    merged = merged.to(torch.bfloat16)
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out_dir)
    return out_dir


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
    model_path = None
    if settings.mode == "frozen":
        if vectors_dir is None:
            raise ConfigError("align.mode=frozen needs --vectors VECTORS (items and users from `lsvcr encode`)")
        _llm_hidden_of(vectors_dir)
    else:
        model_path = resolve_model(config.encode.model)

    staging = train_driver.open_staging(out, config)
    loop_config = {"config": config_to_dict(config), "data_dir": str(data_dir),
                   "vectors_dir": str(vectors_dir) if vectors_dir else None,
                   "model_path": str(model_path) if model_path else None,
                   "log_path": str(staging / "train_log.jsonl")}
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
    heads.load_state_dict(heads_state)

    vectors_manifest = {"model": config.encode.model, "pooling": "mean", "dtype": "float32",
                        "prompt_template": config.encode.prompt_template, "language": config.encode.language,
                        "aligned": settings.mode, "note": "llm_emb_mlp(mean-pooled LLM states), METHOD 5.4",
                        "throughput": {}}
    if settings.mode == "frozen":
        _export_vectors(heads, vectors_dir, data_dir, staging / "vectors", vectors_manifest)
    else:
        merged = _merge_lora(model_path, trainable, config, staging / "llm.tmp")
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
                "text_dim": settings.text_dim, "steps": saved["state"]["step"]}, staging / "checkpoint.pt")
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
