"""`finetune.train_targets: all_positions` (configs/movielens.yaml): every position of a history window is a
target. Checked against the per-sample objective it replaces: the windows cover every training target once,
a position's user vector is the cut history's, and on short histories the loss equals the per-sample loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lsvcr.baselines import build_model
from lsvcr.batching import HistoryBatch, make_batch, position_windows
from lsvcr.sample_arrays import load_comment_pools
from lsvcr.sample_stream import open_sample_stream
from lsvcr.config import ModelConfig, load_config
from lsvcr.data.prepare import prepare
from lsvcr.errors import ConfigError, DataError
from lsvcr.finetune import check_inputs, make_loop_config
from lsvcr.finetune_worker import build_objective, train_loop_per_worker
from lsvcr.model import LSVCRModel

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT / "configs" / "movielens.yaml"

# Two users with RecBole-style prefixes: user 1 has 7 rated items (6 train samples), user 2 has 4 (3 samples).
INTER = "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(
    f"{user}\t{item}\t{time}\n" for user, items in ((1, [3, 1, 2, 4, 5, 6, 7, 8, 9]), (2, [2, 5, 4, 1, 3, 6]))
    for time, item in enumerate(items, start=100))


def _covered(rows: np.ndarray, first: np.ndarray, starts: dict[int, int], user: np.ndarray, length: int):
    """(sample row, context size) of every counted target of the windows."""
    out = []
    for row, first_position in zip(rows.tolist(), first.tolist()):
        k = row - starts[int(user[row])] + 1  # the window's sample has k earlier items, the last `length` kept
        kept = min(k, length)
        for position in range(first_position, kept):
            out.append((row - (kept - 1 - position), position + 1))
    return out


@pytest.mark.parametrize("length,stride", [(5, 2), (5, 5), (5, 1), (3, 3)])
def test_windows_cover_every_training_target_once(length: int, stride: int) -> None:
    counts = [3, 14, 5, 6, 1]
    user = np.repeat(np.arange(1, len(counts) + 1), counts)
    starts = {u: int(np.flatnonzero(user == u)[0]) for u in np.unique(user)}
    kept = np.concatenate([np.minimum(np.arange(1, c + 1), length) for c in counts])
    rows, first = position_windows(user, kept, length, stride)
    covered = _covered(rows, first, starts, user, length)
    assert sorted(row for row, _ in covered) == list(range(len(user)))  # each target exactly once
    for row, context in covered:
        k = row - starts[int(user[row])] + 1
        assert min(k, length - stride + 1) <= context <= min(k, length)


def test_windows_need_recbole_prefixes() -> None:
    with pytest.raises(DataError, match="data.history_before: position"):
        position_windows(np.array([1, 1, 1]), np.array([1, 1, 2]), 5, 2)
    with pytest.raises(DataError, match="not grouped by user"):
        position_windows(np.array([1, 2, 1]), np.array([1, 1, 2]), 5, 2)


def _history(video_history: torch.Tensor) -> HistoryBatch:
    batch = len(video_history)
    return HistoryBatch(video_history, torch.zeros_like(video_history), torch.zeros(batch, 1, dtype=torch.long),
                        torch.zeros(batch, 1, 1, dtype=torch.long))


@pytest.mark.parametrize("architecture,recency", [("sasrec", False), ("lsvcr", False), ("lsvcr", True)])
def test_position_user_vectors_equal_the_cut_histories(architecture: str, recency: bool) -> None:
    torch.manual_seed(0)
    config = ModelConfig(mode="id", architecture=architecture, hidden_size=16, num_heads=2, inner_size=32,
                         hidden_dropout=0.0, attn_dropout=0.0, max_position=8, pooling_recency_bias=recency)
    model = build_model(config, 10, None, None).eval()
    if recency:  # not linear in the distance (softmax ignores a uniform shift), so a wrong distance shows
        with torch.no_grad():
            model.video_pooling.recency_bias.copy_(torch.tensor([3.0, -1.0, 2.0, 0.5, -2.0, 1.0, 0.0, -0.5]))
    history = torch.tensor([[3, 5, 2, 7, 0, 0], [1, 4, 4, 2, 6, 9]])
    every = model.every_position_user_vectors(_history(history))
    for position in range(history.shape[1]):
        cut = history[:, :position + 1]
        states = model.encode_histories(_history(cut))
        user = model.video_user_vector(states) if isinstance(model, LSVCRModel) else states.video_states[:, 0]
        real = cut[:, -1] != 0
        torch.testing.assert_close(every[real, position], user[real], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    (raw / "prefixes.inter").write_text(INTER)
    return raw


@pytest.fixture(scope="module")
def prepared(raw_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(raw_dir, out, load_config(MOVIELENS).data)
    return out


@pytest.mark.parametrize("architecture,repeat", [("sasrec", False), ("sasrec", True), ("lsvcr", False), ("lsvcr", True)])
def test_all_positions_loss_equals_the_per_sample_loss(prepared: Path, architecture: str, repeat: bool) -> None:
    config = load_config(MOVIELENS, [f"model.architecture={architecture}", "model.mode=id",
                                     "model.hidden_dropout=0", "model.attn_dropout=0", f"model.repeat_logit={repeat}"])
    tables = load_comment_pools(prepared)
    train = open_sample_stream(prepared, "video", "train", config.finetune.history_length)
    torch.manual_seed(0)
    model = build_model(config.model, tables.num_videos, None, None)
    if repeat:  # each position's logits move the videos of its own prefix, not the whole window's
        with torch.no_grad():
            model.repeat_logit.fill_(2.0)
    objective = build_objective(config, model)
    every_sample = make_batch(train, tables, np.arange(len(train)), rng=np.random.default_rng(0))
    rows, first = position_windows(np.asarray(train.user_all), train.lengths, config.finetune.history_length,
                                   config.finetune.target_stride)
    assert len(rows) == 2 and len(train) == 9  # one window per user replaces its 6 and 3 samples
    windows = make_batch(train, tables, rows, rng=np.random.default_rng(0))
    windows.first_target_position = torch.from_numpy(first)
    assert int((windows.position_targets() != 0).sum()) == len(train)
    _, per_sample_ce, _ = objective(every_sample)
    _, windows_ce, _ = objective(windows)
    torch.testing.assert_close(windows_ce, per_sample_ce, atol=1e-5, rtol=1e-5)


def test_all_positions_trains_and_refuses_what_it_cannot_do(raw_dir: Path, prepared: Path, tmp_path: Path) -> None:
    config = load_config(MOVIELENS, ["model.mode=id", "finetune.max_epochs=2", "finetune.batch_size=1"])
    assert config.finetune.train_targets == "all_positions"
    check_inputs(config, prepared, None)
    state = train_loop_per_worker(make_loop_config(config, prepared, None, report_to="local"))
    assert state["epoch"] == 2 and all(np.isfinite(row["train_ce"]) for row in state["history"])
    with pytest.raises(ConfigError, match="video task only"):
        load_config(MOVIELENS, ["finetune.task=comment"])
    with pytest.raises(ConfigError, match="target_stride must be between 1"):
        load_config(MOVIELENS, ["finetune.target_stride=0"])
    # The default split (history = items strictly before the target time, ties by raw id) is not RecBole's
    # prefixes; here every time is distinct, so only a history cut shorter than the prefixes shows it.
    short = tmp_path / "short"
    prepare(raw_dir, short, load_config(MOVIELENS, ["data.max_history=3"]).data)
    with pytest.raises(DataError, match="data.history_before: position"):
        train_loop_per_worker(make_loop_config(config, short, None, report_to="local"))
