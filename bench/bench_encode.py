"""Encode throughput: vLLM (the `lsvcr encode` engine, in-process) vs a Hugging Face transformers
batched forward, on the same model, the same texts and the same pooling, in one run.

    python bench/bench_encode.py [--model smollm2-135m] [--items 512] [--prompts 64] [--threads 1]

Two workloads from a synthetic PREPARED data set: item texts (captions and comments, MEAN pooling)
and stage-1 user-history prompts (LAST token). Both engines run float32 on CPU with the same number
of threads. Also reports the cosine between the two engines' vectors (they must agree).
Writes bench/results/encode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def workload(prepared: Path, items: int, prompts: int, tokenizer) -> dict[str, list[str]]:
    from lsvcr.data.prepared import read_comments, read_samples, read_videos
    from lsvcr.llm.prompts import PromptBuilder, histories_from_samples, load_item_texts

    texts = read_videos(prepared)["caption"].to_pylist()
    texts += read_comments(prepared)["content"].to_pylist()
    rng = np.random.default_rng(0)
    item_texts = [texts[i] for i in rng.choice(len(texts), size=min(items, len(texts)), replace=False)]
    samples = read_samples(prepared, "video", "train").slice(0, prompts)
    item_table = load_item_texts(prepared)
    builder = PromptBuilder(tokenizer, item_table, max_prompt_tokens=512)
    user_prompts = builder.build("video", histories_from_samples(samples, item_table, 20))
    return {"items": item_texts, "prompts": user_prompts}


def hf_encode(model, tokenizer, texts: list[str], pooling: str, batch_size: int, max_tokens: int) -> np.ndarray:
    import torch

    from lsvcr.llm.heads import last_token, mean_pool

    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths per batch: less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[r]) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, :len(ids[r])] = torch.tensor(ids[r])
                mask[i, :len(ids[r])] = 1
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            pooled = mean_pool(hidden, mask) if pooling == "MEAN" else last_token(hidden, mask.sum(1))
            out[rows] = pooled.float().numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="transformers batch size")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "encode.json"))
    args = parser.parse_args()

    from lsvcr.llm.vllm_actors import engine_env

    for key, value in engine_env(args.threads, 1).items():
        os.environ[key] = value
    import torch
    from transformers import AutoModel, AutoTokenizer

    from lsvcr.data.prepare import prepare
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic
    from lsvcr.llm.vllm_actors import VLLMEmbedder
    from lsvcr.llm.registry import resolve_model

    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with tempfile.TemporaryDirectory() as directory:
        write_synthetic(Path(directory) / "raw", PRESETS["tiny"], "parquet")
        prepare(Path(directory) / "raw", Path(directory) / "prepared")
        texts = workload(Path(directory) / "prepared", args.items, args.prompts, tokenizer)

    results: dict = {"model": args.model, "threads": args.threads, "dtype": "float32",
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared, other jobs running)"}
    hf_model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
    for name, pooling in (("items", "MEAN"), ("prompts", "LAST")):
        started = time.perf_counter()
        engine = VLLMEmbedder(str(model_path), pooling, dtype="float32", max_model_len=1024, threads=args.threads)
        engine_start = time.perf_counter() - started
        engine.embed(texts[name][:4])  # warm-up
        started = time.perf_counter()
        vllm_vectors, tokens = engine.embed(texts[name])
        vllm_seconds = time.perf_counter() - started
        del engine

        hf_encode(hf_model, tokenizer, texts[name][:4], pooling, args.batch_size, 1024)  # warm-up
        started = time.perf_counter()
        hf_vectors = hf_encode(hf_model, tokenizer, texts[name], pooling, args.batch_size, 1024)
        hf_seconds = time.perf_counter() - started
        cosine = (vllm_vectors * hf_vectors).sum(1) / (
            np.linalg.norm(vllm_vectors, axis=1) * np.linalg.norm(hf_vectors, axis=1))
        results[name] = {
            "texts": len(texts[name]), "tokens": int(tokens.sum()), "mean_tokens": round(float(tokens.mean()), 1),
            "vllm_seconds": round(vllm_seconds, 2), "vllm_engine_start_seconds": round(engine_start, 1),
            "transformers_seconds": round(hf_seconds, 2),
            "vllm_tokens_per_s": round(tokens.sum() / vllm_seconds, 1),
            "transformers_tokens_per_s": round(tokens.sum() / hf_seconds, 1),
            "vllm_over_transformers": round(hf_seconds / vllm_seconds, 3),
            "min_cosine_vllm_vs_transformers": round(float(cosine.min()), 5),
        }
        print(name, json.dumps(results[name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
