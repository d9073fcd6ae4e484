"""Shared fixtures: one real local Ray cluster per test session, small synthetic data sets."""

from __future__ import annotations

import os

# Two cores: one torch thread per process, or every process fights for both (several times slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster that ends with the test process (never `ray stop`)."""
    import ray

    from lsvcr.runtime import apply_serve_ingress_environment

    apply_serve_ingress_environment()  # the serving tests run behind serve.ingress's default, set before Ray starts
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


# --- data layer (lsvcr.data): tiny synthetic KuaiComt data set, prepared, and a video-only variant ---


@pytest.fixture(scope="session")
def tiny_raw_dir(tmp_path_factory):
    """`lsvcr synth --preset tiny` (KuaiComt layout, Parquet): ~120 users, 150 videos, 8 comments/video."""
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic

    out = tmp_path_factory.mktemp("data") / "tiny_raw"
    write_synthetic(out, PRESETS["tiny"], "parquet")
    return out


@pytest.fixture(scope="session")
def tiny_prepared_dir(tiny_raw_dir, tmp_path_factory):
    """PREPARED/ of `tiny_raw_dir` with the default data config (both tasks)."""
    from lsvcr.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny_prepared"
    prepare(tiny_raw_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_video_only_prepared_dir(tmp_path_factory):
    """PREPARED/ of a RecBole export (NAME.inter with string tokens + NAME.item): comment task disabled."""
    from lsvcr.data.prepare import prepare
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic

    raw = tmp_path_factory.mktemp("data") / "tiny_recbole"
    write_synthetic(raw, PRESETS["tiny"], "recbole")
    out = tmp_path_factory.mktemp("data") / "tiny_video_only_prepared"
    prepare(raw, out)
    return out


# --- SR backbone (lsvcr.model / finetune): real MiniLM text vectors of the tiny data set ---


@pytest.fixture(scope="session")
def tiny_minilm_vectors_dir(tiny_prepared_dir, tmp_path_factory):
    """VECTORS/ of `tiny_prepared_dir`: every caption and comment embedded by all-MiniLM-L6-v2 (384-d)."""
    from lsvcr.vectors import write_minilm_vectors

    return write_minilm_vectors(tiny_prepared_dir, tmp_path_factory.mktemp("vectors") / "tiny_minilm")


# --- LLM: a tiny random decoder vLLM and peft load in seconds (encode/align tests, the console test) ---


@pytest.fixture(scope="session")
def tiny_llm_dir(tiny_prepared_dir, tmp_path_factory):
    """A 2-layer random Llama (head_dim 64, which vLLM's CPU attention accepts) with a BPE tokenizer
    trained on the data set's texts and the English prompt templates."""
    import pyarrow.parquet as pq
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lsvcr.llm.prompts import TEMPLATES

    corpus = pq.read_table(tiny_prepared_dir / "videos.parquet")["caption"].to_pylist()
    corpus += pq.read_table(tiny_prepared_dir / "comments.parquet")["content"].to_pylist()
    corpus += [text for (task, language), pair in TEMPLATES.items() if language == "en" for text in pair]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    out = tmp_path_factory.mktemp("llm") / "tiny-llama"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True))
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
