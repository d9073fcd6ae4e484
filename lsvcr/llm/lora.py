"""The LoRA'd LLM of stage 1's `lora` mode (METHOD 4.1, 5): a causal LM with a peft adapter trained live (item
texts mean-pooled, user prompts with L_LM on the response), the prompts of a batch, and the merge of the trained
adapter into a plain Hugging Face folder that vLLM re-encodes with. peft and transformers load lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsvcr.config import LSVCRConfig
from lsvcr.errors import ConfigError, ModelNotFoundError
from lsvcr.llm.align_data import AlignBatch
from lsvcr.llm.heads import last_token, mean_pool
from lsvcr.llm.prompts import ItemTexts, PromptBuilder, PromptHistories



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


def merge_lora(model_path: Path, trainable: dict[str, Tensor], config: LSVCRConfig, out_dir: Path) -> Path:
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

