"""The one config system: YAML sections, dotted overrides, clear errors."""

import pytest

from lsvcr.config import LSVCRConfig, load_config, save_config
from lsvcr.errors import ConfigError


def test_defaults_are_the_papers():
    config = LSVCRConfig()
    assert (config.model.hidden_size, config.model.num_heads, config.model.inner_size) == (64, 2, 256)
    assert config.model.temperature == 0.07 and config.model.hidden_dropout == 0.3
    assert (config.finetune.lr, config.finetune.weight_decay, config.finetune.batch_size) == (1e-3, 1e-5, 512)
    assert (config.finetune.comment_negatives, config.finetune.id_text_loss_weight) == (19, 0.1)
    assert (config.align.lora_r, config.align.lora_alpha, config.align.lora_dropout) == (8, 32, 0.1)
    assert (config.align.rec_loss_weight, config.align.contrast_loss_weight) == (1.0, 0.5)
    # The comment row is the paper's scoring (METHOD 2.7); the like prior is an extension, off unless asked for.
    assert config.model.comment_like_prior is False
    assert load_config().model.comment_like_prior is False
    assert config.model.pooling_recency_bias is False  # F_v as the paper has it (METHOD 2.5)
    assert config.model.repeat_logit is False  # the paper's scores (METHOD 2.7)
    assert config.model.text_only_untrained_videos is False  # every video keeps its ID (METHOD 2.2)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  lr: 0.0005\n  task: comment\nmodel:\n  mode: text\n")
    config = load_config(path, ["finetune.lr=2e-3", "align.lora_target_modules=[q_proj, v_proj]"])
    assert config.finetune.lr == 2e-3 and config.finetune.task == "comment"
    assert config.model.mode == "text"
    assert config.align.lora_target_modules == ["q_proj", "v_proj"]


def test_round_trip(tmp_path):
    config = load_config(overrides=["model.stacking=standard", "tune.num_samples=3"])
    save_config(config, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.lrr=1", "unknown config key 'finetune.lrr'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("finetune.batch_size=abc", "finetune.batch_size: expected an integer"),
        ("model.mode=gru", "model.mode must be one of"),
        ("serve.ingress=nginx", "serve.ingress must be one of haproxy, proxy"),
        ("finetune.history_length=80", "must not exceed model.max_position"),
        ("finetune.lr=-1", "finetune.lr must be positive"),
        ("finetune.contrast_negatives_shared_by=0", "finetune.contrast_negatives_shared_by must be positive"),
        ("finetune.max_steps_per_epoch=-1", "finetune.max_steps_per_epoch must be 0"),
        ("finetune.checkpoint_every_steps=-2", "finetune.checkpoint_every_steps must be 0"),
        ("finetune.max_logits_mb=-64", "finetune.max_logits_mb must be 0"),
        ("serve.record_comment_table_max_mb=-1", "serve.record_comment_table_max_mb must be 0"),
        ("serve.max_surge_percent=150", r"serve.max_surge_percent must be a percentage in \[0, 100\]"),
        ("finetune.allocator=jemalloc", "finetune.allocator must be one of auto, mimalloc, system"),
        ("finetune.lr", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_recency_bias_needs_lsvcrs_pooling():
    with pytest.raises(ConfigError, match="model.pooling_recency_bias is a term of LSVCR's F_v pooling"):
        load_config(overrides=["model.pooling_recency_bias=true", "model.architecture=sasrec"])
    assert load_config(overrides=["model.pooling_recency_bias=true"]).model.pooling_recency_bias is True


def test_text_only_untrained_videos_needs_lsvcr_with_id_and_text():
    switch = "model.text_only_untrained_videos=true"
    for other in ("model.mode=id", "model.mode=text", "model.architecture=sasrec"):
        with pytest.raises(ConfigError, match="model.text_only_untrained_videos drops ID embeddings .* needs "
                                              "model.architecture=lsvcr and model.mode=id\\+text"):
            load_config(overrides=[switch, other])
    assert load_config(overrides=[switch]).model.mode == "id+text"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_base_file_is_applied_first_then_the_file_then_overrides(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "protocol.yaml").write_text("finetune:\n  lr: 0.0005\n  patience: 7\nmodel:\n  mode: id\n")
    (tmp_path / "presets" / "tuned.yaml").write_text("base: protocol.yaml\nfinetune:\n  lr: 0.002\n")
    (tmp_path / "mine.yaml").write_text("base: presets/tuned.yaml\nmodel:\n  temperature: 0.1\n")
    config = load_config(tmp_path / "mine.yaml", ["finetune.patience=3"])
    assert (config.finetune.lr, config.finetune.patience) == (0.002, 3)  # the file over its base; --set over both
    assert (config.model.mode, config.model.temperature) == ("id", 0.1)
    assert load_config(tmp_path / "presets" / "protocol.yaml").finetune.lr == 0.0005

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="each other's base"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"not found: .*gone.yaml \(the base of .*orphan.yaml\)"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "typo.yaml").write_text("base: protocol.yaml\nmodle:\n  mode: id\n")
    (tmp_path / "protocol.yaml").write_text("finetune:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(tmp_path / "typo.yaml")


def test_movielens_lsvcr_preset_is_the_protocol_plus_its_documented_keys():
    """configs/movielens_lsvcr.yaml = configs/movielens.yaml + the five model keys its header and docs/results.md
    name; the protocol part (data, finetune) is movielens.yaml's, and the defaults stay the paper's."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    tuned = load_config(configs / "movielens_lsvcr.yaml")
    assert tuned == load_config(configs / "movielens.yaml", [
        "model.temperature=0.1", "model.hidden_dropout=0.3", "model.attn_dropout=0.3",
        "model.pooling_recency_bias=true", "model.repeat_logit=true"])
    assert tuned.data == load_config(configs / "movielens.yaml").data
    assert not LSVCRConfig().model.repeat_logit and not load_config(configs / "paper.yaml").model.repeat_logit


def test_shipped_reference_is_current_and_loads():
    from pathlib import Path

    from lsvcr.config import reference_yaml

    shipped = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"
    assert shipped.read_text() == reference_yaml(), "regenerate configs/reference.yaml (see docs/config.md)"
    assert load_config(shipped) == LSVCRConfig()


def test_paper_preset_loads_with_the_authors_settings():
    """configs/paper.yaml: every CPU-motivated default set back to the authors' value, each line citing METHOD."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"
    config = load_config(path)
    assert (config.encode.history_length, config.align.history_length, config.finetune.history_length) == (20, 20, 50)
    assert (config.encode.max_prompt_tokens, config.encode.max_model_len, config.align.max_response_tokens) == (
        3840, 4096, 256)
    assert config.align.mode == "lora" and config.align.gradient_checkpointing
    assert (config.align.video_view_aug_p, config.align.comment_view_aug_p, config.align.view_aug_item_p) == (
        0.5, 0.5, 0.3)
    assert config.finetune.contrast_negatives_shared_by == 1 and config.finetune.contrast_negatives_per_direction
    assert config.model.comment_like_prior is False and not config.finetune.length_bucketing
    for line in path.read_text().splitlines():
        if line.startswith("  ") and ":" in line:
            assert "METHOD" in line or "storage" in line or "synth_preset" in line, f"no METHOD section: {line}"
