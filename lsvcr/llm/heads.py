"""The two heads on top of the LLM's hidden states (METHOD 4.4), shared by both alignment modes.

    item text:        mean-pooled final hidden states → llm_emb_mlp (hidden → 1024 → GELU → 256)
    user preference:  last-prompt-token final hidden state → contrast_adapter Linear(hidden → 64)

`llm_emb_mlp` survives stage 1: stage-2 text vectors are llm_emb_mlp(mean-pooled LLM states) of every
item (METHOD 5.4). `contrast_adapter` is discarded after stage 1.

Beyond the paper (frozen mode, `align.standardize_llm_vectors`): each head can first standardize its input per
dimension with fixed statistics of the encoded vectors. A frozen decoder's states share a few huge dimensions
(SmolLM2-135M on MovieLens prompts: mean cosine 0.99 between users, 0.85 between titles), and two linear heads
trained from scratch could not pull them apart: L_SSC and L_rec stayed at chance (docs/results.md). With the
paper's LoRA the LLM itself adapts; frozen, nothing else can. The default (shift 0, scale 1) is the identity.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lsvcr.errors import DataError
from lsvcr.model import TEXT_MLP_HIDDEN, text_mlp


class LLMHeads(nn.Module):
    def __init__(self, llm_hidden: int, text_dim: int = 256, preference_dim: int = 64, mlp_hidden: int = TEXT_MLP_HIDDEN):
        super().__init__()
        self.llm_emb_mlp = text_mlp(llm_hidden, text_dim, mlp_hidden)
        self.contrast_adapter = nn.Linear(llm_hidden, preference_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)
        for name in ("item", "user"):  # fixed (not trained) input standardization; identity unless set
            self.register_buffer(f"{name}_shift", torch.zeros(llm_hidden))
            self.register_buffer(f"{name}_scale", torch.ones(llm_hidden))

    def set_standardization(self, standardization: dict[str, list[float]]) -> None:
        """{item_shift, item_scale, user_shift, user_scale} (`lsvcr.llm.align.frozen_standardization`) → the buffers."""
        for name, values in standardization.items():
            getattr(self, name).copy_(torch.as_tensor(values, dtype=torch.float32))

    def item_text(self, pooled: Tensor) -> Tensor:
        """Mean-pooled LLM states [N, hidden] → text vectors [N, text_dim]."""
        return self.llm_emb_mlp((pooled - self.item_shift) / self.item_scale)

    def preference(self, last_token: Tensor) -> Tensor:
        """Last-prompt-token LLM state [B, hidden] → preference vector [B, preference_dim] (not normalised)."""
        return self.contrast_adapter((last_token - self.user_shift) / self.user_scale)


def column_statistics(tables, block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (floored at 1e-6) over the rows of several 2-D arrays (memory maps
    are read in blocks of `block_rows`), accumulated in float64."""
    count, total, squares = 0, None, None
    for table in tables:
        for start in range(0, len(table), block_rows):
            block = np.asarray(table[start:start + block_rows], dtype=np.float64)
            total = block.sum(0) if total is None else total + block.sum(0)
            squares = (block * block).sum(0) if squares is None else squares + (block * block).sum(0)
            count += len(block)
    if not count:
        raise DataError("align.standardize_llm_vectors: VECTORS has no rows to standardize over")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return mean, np.maximum(std, 1e-6)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of `hidden` [B, T, H] over the tokens where `attention_mask` [B, T] is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def last_token(hidden: Tensor, lengths: Tensor) -> Tensor:
    """hidden[b, lengths[b] - 1] for right-padded sequences."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


@torch.no_grad()
def export_text_vectors(heads: LLMHeads, raw_vectors, batch_size: int = 4096):
    """llm_emb_mlp over a NumPy table of raw (mean-pooled) LLM vectors → float32 NumPy [N, text_dim]."""
    heads = heads.eval()
    device = next(heads.parameters()).device
    out = np.zeros((len(raw_vectors), heads.llm_emb_mlp[-1].out_features), dtype=np.float32)
    for start in range(0, len(raw_vectors), batch_size):
        # A copy of the block: the table may be a read-only memory map, which torch must not wrap.
        block = torch.from_numpy(np.array(raw_vectors[start:start + batch_size], dtype=np.float32))
        out[start:start + len(block)] = heads.item_text(block.to(device)).float().cpu().numpy()
    return out
