"""Scale-run item vectors (issue #16): the hashed bag-of-words encoder, float16 storage, memory maps."""

import json

import numpy as np
import pytest
import torch

from lsvcr.baselines import build_model
from lsvcr.sample_arrays import load_item_tables
from lsvcr.config import load_config
from lsvcr.errors import ConfigError
from lsvcr.llm.encode import run_encode
from lsvcr.vectors import HashedBagOfWords, load_item_vectors, open_item_tensors, open_item_vectors


def test_hashed_bag_of_words_is_deterministic_and_a_real_bag_of_words():
    texts = ["The cat sat", "the CAT  sat", "sat cat the", "a dog ran far", "", None]
    first = HashedBagOfWords(dim=32, seed=3).encode(texts)
    again = HashedBagOfWords(dim=32, seed=3).encode(texts)
    assert first.dtype == np.float32 and first.shape == (6, 32)
    assert np.array_equal(first, again)  # a fresh encoder: same vectors
    assert np.allclose(first[0], first[1], atol=1e-6) and np.allclose(first[0], first[2], atol=1e-6)  # case, order
    assert np.allclose(np.linalg.norm(first[:4], axis=1), 1.0, atol=1e-5)
    assert abs(float(first[0] @ first[3])) < 0.8  # unrelated words: far apart
    assert not first[4:].any()  # no tokens: zeros
    assert not np.allclose(HashedBagOfWords(dim=32, seed=4).encode(texts)[0], first[0])


def test_hashed_encode_stage_float16_and_memory_maps(tiny_prepared_dir, tmp_path):
    config = load_config(None, ["encode.encoder=hashed", "encode.hashed_dim=16"])
    manifest = run_encode(config, tiny_prepared_dir, tmp_path / "v32", what="items")
    assert manifest["model"] == "hashed-bow" and manifest["dim"] == 16
    assert "not an LLM" in json.loads((tmp_path / "v32" / "manifest.json").read_text())["hashed"]["note"]
    video32, comment32 = load_item_vectors(tmp_path / "v32", tiny_prepared_dir)
    assert not video32[0].any() and np.allclose(np.linalg.norm(comment32[1:], axis=1), 1.0, atol=1e-5)

    half = load_config(None, ["encode.encoder=hashed", "encode.hashed_dim=16", "encode.storage_dtype=float16"])
    run_encode(half, tiny_prepared_dir, tmp_path / "v16", what="items")
    assert (tmp_path / "v16" / "comments.parquet").stat().st_size < (tmp_path / "v32" / "comments.parquet").stat().st_size
    video16, comment16 = open_item_vectors(tmp_path / "v16", tiny_prepared_dir)
    assert isinstance(comment16, np.memmap) and comment16.dtype == np.float16 and not comment16.flags.writeable
    assert np.allclose(comment16, comment32, atol=2e-3) and np.allclose(video16, video32, atol=2e-3)
    mapped32, _ = open_item_vectors(tmp_path / "v32", tiny_prepared_dir)
    assert mapped32.dtype == np.float32 and np.array_equal(mapped32, video32)
    with pytest.raises(ConfigError, match="items only"):
        run_encode(config, tiny_prepared_dir, tmp_path / "v_all", what="all")


def test_the_model_reads_memory_mapped_float16_tables_in_place(tiny_prepared_dir, tmp_path):
    """The text tables are not copied into the model (a node's workers share the pages), and float16
    storage scores like float32 to half precision."""
    config = load_config(None, ["encode.encoder=hashed", "encode.hashed_dim=16", "encode.storage_dtype=float16",
                                "model.mode=id+text"])
    run_encode(config, tiny_prepared_dir, tmp_path / "v16", what="items")
    video, comment = open_item_tensors(tmp_path / "v16", tiny_prepared_dir)
    tables = load_item_tables(tiny_prepared_dir)
    likes = torch.from_numpy(tables.comment_likes)
    torch.manual_seed(0)
    mapped = build_model(config.model, tables.num_videos, video, comment, likes).to("cpu")
    assert mapped.comment_text.dtype == torch.float16
    assert mapped.video_text.data_ptr() == video.data_ptr() and mapped.comment_text.data_ptr() == comment.data_ptr()

    copied = build_model(config.model, tables.num_videos, video.float(), comment.float(), likes)
    copied.load_state_dict(mapped.state_dict())
    rows = torch.arange(1, comment.shape[0]).view(1, -1)
    assert torch.allclose(mapped.comment_candidate_vectors(rows), copied.comment_candidate_vectors(rows), atol=1e-6)
    history = torch.arange(1, min(6, video.shape[0])).view(1, -1)
    assert torch.allclose(mapped.adapt_text_mean(mapped.comment_text, history),
                          copied.adapt_text_mean(copied.comment_text, history), atol=1e-6)
