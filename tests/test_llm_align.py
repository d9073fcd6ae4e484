"""Stage-1 alignment: one LoRA step on a tiny random Llama (tokenizer trained locally) lowers the
loss and changes only the adapter, the SR model and the heads (base weights bit-identical); the
frozen mode end to end on Ray Train writes an ALIGNED directory that `lsvcr finetune --init` loads."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lsvcr.sample_arrays import load_comment_pools
from lsvcr.config import load_config


@pytest.mark.parametrize("preset", [None, "paper"])
def test_one_lora_step_lowers_the_loss_and_trains_only_adapter_sr_and_heads(tiny_prepared_dir, tiny_llm_dir, preset):
    from lsvcr.llm.align_data import load_stage_one_data, make_align_batch, view_augmentation
    from lsvcr.llm.align_worker import AlignmentObjective, _batch_to
    from lsvcr.llm.lora import LiveLLM, lora_prompt_inputs
    from lsvcr.llm.prompts import PromptBuilder, load_item_texts

    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml" if preset else None  # + view augmentation
    config = load_config(path, ["align.mode=lora", "align.history_length=5", "encode.max_prompt_tokens=400",
                                "encode.max_text_tokens=16", "align.max_response_tokens=16", "align.bf16=false",
                                "model.hidden_dropout=0", "model.attn_dropout=0", "align.lora_dropout=0"])
    device = torch.device("cpu")
    data = load_stage_one_data(config, tiny_prepared_dir, None, frozen=False)
    texts = load_item_texts(tiny_prepared_dir)
    llm = LiveLLM(tiny_llm_dir, config, texts, device)
    objective = AlignmentObjective(config, data.tables.num_videos, llm.hidden_size, llm)
    builder = PromptBuilder(llm.tokenizer, texts, max_prompt_tokens=config.encode.max_prompt_tokens)
    rng = np.random.default_rng(0)
    batch = make_align_batch(data, np.arange(6), np.arange(4), rng, view_augmentation(config))
    prompts = lora_prompt_inputs(llm, builder, batch, rng)
    batch = _batch_to(batch, device)

    def loss_value() -> float:
        torch.manual_seed(1)  # the same random positions every time
        with torch.no_grad():
            return objective(batch, data, prompts).total.item()

    before = {name: p.detach().clone() for name, p in objective.named_parameters()}
    trainable = [p for p in objective.parameters() if p.requires_grad]
    assert any("lora_A" in name for name, p in objective.named_parameters() if p.requires_grad)
    assert not any("lora" not in name for name, p in objective.named_parameters()
                   if p.requires_grad and name.startswith("llm."))
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    start = loss_value()
    losses = None
    for _ in range(3):
        torch.manual_seed(1)
        losses = objective(batch, data, prompts)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
    assert losses.lm.item() > 0 and losses.vcc.item() > 0
    assert loss_value() < start

    for name, parameter in objective.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        if name.startswith("llm.") and "lora_" not in name:
            assert not changed, f"base LLM weight {name} changed"
    changed = {name for name, p in objective.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert any("lora_B" in name for name in changed)
    assert any(name.startswith("sr.") for name in changed)
    assert {"heads.llm_emb_mlp.0.weight", "heads.contrast_adapter.weight"} <= changed


@pytest.mark.slow
def test_frozen_alignment_end_to_end_loads_into_finetune(ray_cluster, tiny_prepared_dir, tmp_path):
    """Frozen mode on Ray Train (2 workers) from synthetic LLM vectors (random but fixed 48-d item
    and user vectors in the VECTORS format): ALIGNED/ has a checkpoint whose SR keys load into a
    stage-2 model, 256-d stage-2 vectors for every item, a log and curves; a re-run is a no-op."""
    import json

    from lsvcr.finetune_init import load_stage1_checkpoint
    from lsvcr.llm.align import run_align
    from lsvcr.llm.encode import ShardedOutput
    from lsvcr.model import LSVCRModel
    from lsvcr.vectors import load_item_vectors

    vectors = tmp_path / "vectors"
    rng = np.random.default_rng(0)
    for name, key, table in (("videos", "video_id", "videos"), ("comments", "comment_id", "comments"),
                             ("users_video", "sample_row", "video_samples.train"),
                             ("users_comment", "sample_row", "comment_samples.train")):
        source = pq.read_table(tiny_prepared_dir / f"{table}.parquet")
        keys = source[key].to_numpy() if key in source.column_names else np.arange(len(source))
        ShardedOutput(vectors / name, len(keys), 10_000, key).write(0, keys, rng.normal(size=(len(keys), 48)))
    (vectors / "manifest.json").write_text(json.dumps({"dim": 48, "model": "synthetic"}))

    config = load_config(None, ["align.batch_size=64", "align.max_steps=6", "align.checkpoint_every=3",
                                "align.log_every=2", "align.num_workers=2", "align.threads_per_worker=1"])
    out = tmp_path / "aligned"
    summary = run_align(config, tiny_prepared_dir, vectors, out, "frozen")
    assert summary["steps"] == 6 and summary["workers"] == 2
    log_rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log_rows] == [2, 3, 4, 6]
    assert all(np.isfinite(row["train_loss"]) and row["train_lm"] == 0 for row in log_rows)
    assert (out / "curves.png").stat().st_size > 0 and (out / "_SUCCESS").exists()

    video_text, comment_text = load_item_vectors(out / "vectors", tiny_prepared_dir)
    assert video_text.shape[1] == 256 and comment_text.shape[1] == 256
    assert np.isfinite(video_text).all() and np.abs(video_text[1:]).sum(axis=1).min() > 0

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["mode"] == "frozen" and "0.weight" in checkpoint["text_mlp_state_dict"]
    stage2 = LSVCRModel(config.model, len(video_text) - 1, torch.from_numpy(video_text), torch.from_numpy(comment_text),
                        torch.from_numpy(load_comment_pools(tiny_prepared_dir).comment_likes))
    report = load_stage1_checkpoint(stage2, out / "checkpoint.pt")
    assert "llm_adapter.weight" in report["loaded"] and not report["skipped"]
    # Stage-2-only parameters; the like prior's weight exists only when the (non-paper) prior is on.
    stage2_only = {"video_embedding.weight", "gate"} | ({"comment_like_weight"} if config.model.comment_like_prior else set())
    assert set(report["missing"]) == stage2_only
    torch.testing.assert_close(stage2.state_dict()["pc_merge.weight"], checkpoint["state_dict"]["pc_merge.weight"])

    again = run_align(config, tiny_prepared_dir, vectors, out, "frozen")
    assert again == summary


@pytest.mark.slow
def test_lora_alignment_end_to_end_merges_and_reencodes(ray_cluster, tiny_prepared_dir, tiny_llm_dir, tmp_path):
    """LoRA mode on Ray Train with the tiny Llama: the adapter is merged into a plain HF folder that
    vLLM re-encodes every item with; stage-2 vectors are 256-d and differ from the untrained MLP's."""
    import json
    import shutil

    from lsvcr.llm.align import run_align
    from lsvcr.vectors import load_item_vectors

    prepared = tmp_path / "prepared"  # few train samples: each LoRA step embeds its texts live
    shutil.copytree(tiny_prepared_dir, prepared)
    for task in ("video", "comment"):
        path = prepared / f"{task}_samples.train.parquet"
        pq.write_table(pq.read_table(path).slice(0, 16), path)
    config = load_config(None, [f"encode.model={tiny_llm_dir}", "encode.max_prompt_tokens=400",
                                "encode.max_text_tokens=16", "encode.batch_size=256", "align.max_response_tokens=16",
                                "align.history_length=5", "align.batch_size=8", "align.max_steps=3",
                                "align.checkpoint_every=2", "align.log_every=1"])
    out = tmp_path / "aligned"
    summary = run_align(config, prepared, None, out, "lora")
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(row["train_lm"] > 0 for row in rows)
    assert (out / "llm" / "config.json").is_file() and not list((out / "llm").glob("adapter_*"))
    video_text, comment_text = load_item_vectors(out / "vectors", prepared)
    assert video_text.shape[1] == comment_text.shape[1] == 256
    assert np.isfinite(video_text).all() and np.abs(comment_text[1:]).sum(axis=1).min() > 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["mode"] == "lora" and checkpoint["llm_hidden"] == 64


def test_view_augmentation_gives_the_llm_and_the_sr_model_different_views(tiny_prepared_dir):
    """METHOD 5.1, seeded: in aug mode an item shows the SR model another of the video's top-3 hot comments than
    the prompt, and a record splits (own comments + as many popular ones the user did not touch) between the
    prompt (even positions) and the SR model (odd); frozen keeps the prompt's view; probability 0 = no change."""
    from lsvcr.batching import make_batch
    from lsvcr.history_views import STAGE_ONE_COMMENTS_PER_RECORD, ViewAugmentation, augment_views
    from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays
    from lsvcr.config import LSVCRConfig
    from lsvcr.llm.align_data import view_augmentation

    defaults = view_augmentation(LSVCRConfig())
    assert (defaults.video_p, defaults.comment_p, defaults.item_p, defaults.popular) == (0.5, 0.5, 0.3, 10)
    tables = load_comment_pools(tiny_prepared_dir)
    arrays = load_sample_arrays(tiny_prepared_dir, "comment", "train", 20, 8)
    history = make_batch(arrays, tables, np.arange(len(arrays)), rng=np.random.default_rng(0), comment_negatives=1,
                         comments_per_record=STAGE_ONE_COMMENTS_PER_RECORD).history
    inputs = (history.video_history.numpy(), history.video_history_hot_comment.numpy(),
              history.comment_history_videos.numpy(), history.comment_history_comments.numpy(), tables)
    videos, hot, record_videos, records = inputs[0], inputs[1], inputs[2], inputs[3]

    always = ViewAugmentation(1.0, 1.0, 1.0)
    prompt_hot, sr_hot, prompt_records, sr_records = augment_views(*inputs, np.random.default_rng(3), always, False)
    assert np.array_equal(prompt_hot, hot)
    several = (videos != 0) & (tables.hot_count[videos] >= 2)
    assert several.any() and (sr_hot[several] != hot[several]).all()
    top = tables.comment_pool[videos, :3]
    assert ((top == sr_hot[..., None]).any(-1) | (videos == 0)).all()  # still one of the top 3
    for row, slot in zip(*np.nonzero((record_videos != 0) & (records != 0).any(-1))):
        own = records[row, slot][records[row, slot] != 0]
        llm = prompt_records[row, slot][prompt_records[row, slot] != 0]
        sr = sr_records[row, slot][sr_records[row, slot] != 0]
        assert len(llm) == len(sr) == len(own)  # 2n shuffled, n each
        assert set(own) <= set(llm) | set(sr)
        popular = set(tables.comment_pool[record_videos[row, slot], :10].tolist()) - set(own.tolist()) - {0}
        if popular:
            assert (set(llm) | set(sr)) - set(own) <= popular
    again = augment_views(*inputs, np.random.default_rng(3), always, False)
    assert all(np.array_equal(a, b) for a, b in zip(again, (prompt_hot, sr_hot, prompt_records, sr_records)))

    frozen = augment_views(*inputs, np.random.default_rng(3), always, True)
    assert np.array_equal(frozen[0], hot) and np.array_equal(frozen[2], records)
    assert not np.array_equal(frozen[3], records)

    off = augment_views(*inputs, np.random.default_rng(3), ViewAugmentation(0.0, 0.0, 0.3), False)
    assert all(np.array_equal(a, b) for a, b in zip(off, (hot, hot, records, records)))
    assert not ViewAugmentation(0.5, 0.5, 0.0).enabled
    half = augment_views(*inputs, np.random.default_rng(3), defaults, False)
    changed = (half[1] != hot)[several].mean()
    assert 0.05 < changed < 0.3  # about 0.5 * 0.3 of the items with two or more hot comments


def test_standardized_heads_and_their_statistics():
    """align.standardize_llm_vectors: statistics accumulated in blocks equal NumPy's over all rows; the heads
    are the identity on their inputs until set, then standardize both inputs with the fixed buffers."""
    from lsvcr.llm.heads import LLMHeads, column_statistics

    rng = np.random.default_rng(0)
    first, second = rng.normal(3.0, 2.0, size=(7, 5)), rng.normal(-1.0, 0.5, size=(4, 5))
    first[:, 4] = second[:, 4] = 0.25  # a constant column: its scale is floored, not 0
    mean, std = column_statistics([first, second], block_rows=3)
    both = np.concatenate([first, second])
    np.testing.assert_allclose(mean, both.mean(0))
    np.testing.assert_allclose(std[:4], both.std(0)[:4])
    assert std[4] == 1e-6

    heads = LLMHeads(5, text_dim=8, preference_dim=4)
    x = torch.from_numpy(both).float()
    torch.testing.assert_close(heads.item_text(x), heads.llm_emb_mlp(x))
    torch.testing.assert_close(heads.preference(x), heads.contrast_adapter(x))
    heads.set_standardization({"item_shift": mean.tolist(), "item_scale": std.tolist(),
                               "user_shift": (mean * 2).tolist(), "user_scale": (std * 2).tolist()})
    shift, scale = torch.from_numpy(mean).float(), torch.from_numpy(std).float()
    torch.testing.assert_close(heads.item_text(x), heads.llm_emb_mlp((x - shift) / scale))
    torch.testing.assert_close(heads.preference(x), heads.contrast_adapter((x - 2 * shift) / (2 * scale)))
    restored = LLMHeads(5, text_dim=8, preference_dim=4)
    restored.load_state_dict(heads.state_dict())  # the buffers travel with the weights
    torch.testing.assert_close(restored.item_text(x), heads.item_text(x))


def test_standardizing_is_for_frozen_alignment_only(tiny_prepared_dir, tmp_path):
    from lsvcr.errors import ConfigError
    from lsvcr.llm.align import run_align

    config = load_config(None, ["align.standardize_llm_vectors=true"])
    with pytest.raises(ConfigError, match="align.standardize_llm_vectors is for align.mode=frozen"):
        run_align(config, tiny_prepared_dir, None, tmp_path / "aligned", "lora")


@pytest.mark.slow
def test_standardized_frozen_alignment_ignores_a_shared_offset(ray_cluster, tiny_prepared_dir, tmp_path):
    """A frozen LLM's states share huge dimensions. With align.standardize_llm_vectors, stage 1 on vectors
    that all carry one large common offset trains exactly as on the vectors without it: same losses, same
    exported stage-2 vectors (without the switch, the offset dominates every head input)."""
    import json

    from lsvcr.llm.align import run_align
    from lsvcr.llm.encode import ShardedOutput
    from lsvcr.vectors import load_item_vectors

    rng = np.random.default_rng(0)
    tables = {}
    for name, key, table in (("videos", "video_id", "videos"), ("comments", "comment_id", "comments"),
                             ("users_video", "sample_row", "video_samples.train"),
                             ("users_comment", "sample_row", "comment_samples.train")):
        source = pq.read_table(tiny_prepared_dir / f"{table}.parquet")
        keys = source[key].to_numpy() if key in source.column_names else np.arange(len(source))
        tables[name] = (key, keys, rng.normal(size=(len(keys), 48)))
    offset = np.zeros(48)
    offset[[3, 17]] = [400.0, -250.0]  # "massive activations"
    config = load_config(None, ["align.batch_size=32", "align.max_steps=8", "align.log_every=2",
                                "align.num_workers=1", "align.threads_per_worker=1", "align.standardize_llm_vectors=true"])
    runs = {}
    for label, shift in (("plain", 0.0), ("offset", 1.0)):
        vectors = tmp_path / f"vectors_{label}"
        for name, (key, keys, values) in tables.items():
            ShardedOutput(vectors / name, len(keys), 10_000, key).write(0, keys, values + shift * offset)
        (vectors / "manifest.json").write_text(json.dumps({"dim": 48, "model": "synthetic"}))
        out = tmp_path / f"aligned_{label}"
        runs[label] = run_align(config, tiny_prepared_dir, vectors, out, "frozen")
        saved = torch.load(out / "checkpoint.pt", weights_only=False)["llm_standardization"]
        np.testing.assert_allclose(saved["item_shift"][3], 400.0 * shift, atol=1.0)  # the statistics it used
    assert runs["plain"]["final"]["train_ssc"] == pytest.approx(runs["offset"]["final"]["train_ssc"], rel=1e-3)
    plain, _ = load_item_vectors(tmp_path / "aligned_plain" / "vectors", tiny_prepared_dir)
    shifted, _ = load_item_vectors(tmp_path / "aligned_offset" / "vectors", tiny_prepared_dir)
    np.testing.assert_allclose(shifted, plain, rtol=1e-3, atol=1e-4)
