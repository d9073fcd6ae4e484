"""RecBole's sequential protocol as a named option (configs/movielens.yaml): a hand-checked tiny table shows
what `data.tie_break`, `data.history_before` and `finetune.selection_*` change."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lsvcr.baselines import build_model
from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays
from lsvcr.config import LSVCRConfig, load_config
from lsvcr.data.prepare import prepare
from lsvcr.errors import ConfigError
from lsvcr.evaluate import evaluate_arrays
from lsvcr.finetune import check_inputs, make_loop_config
from lsvcr.finetune_worker import train_loop_per_worker

ROOT = Path(__file__).resolve().parents[1]

# File order matters: user 1 rated 3 then 1 at the same second; user 2 rated 4 then 1 at the same second.
INTER = """user_id:token\titem_id:token\ttimestamp:float
1\t3\t100
1\t1\t100
1\t2\t200
1\t4\t300
1\t5\t400
2\t2\t50
2\t5\t60
2\t4\t70
2\t1\t70
"""

# (user, split) -> (target, video history), worked out by hand.
# Default: ties by raw id, histories strictly before the target time; samples with no history dropped.
#   user 1 sorted 1(100) 3(100) 2 4 5: targets 1 and 3 have no earlier item -> dropped.
#   user 2 sorted 2 5 1(70) 4(70): 1 and 4 both see only [2, 5].
DEFAULT = {
    (1, "train"): [(2, [1, 3])], (1, "valid"): [(4, [1, 3, 2])], (1, "test"): [(5, [1, 3, 2, 4])],
    (2, "train"): [(5, [2])], (2, "valid"): [(1, [2, 5])], (2, "test"): [(4, [2, 5])],
}
# RecBole: ties in file order, every earlier item of the sorted sequence is history (its prefixes).
#   user 1 sorted 3 1 2 4 5; user 2 sorted 2 5 4 1.
RECBOLE = {
    (1, "train"): [(1, [3]), (2, [3, 1])], (1, "valid"): [(4, [3, 1, 2])], (1, "test"): [(5, [3, 1, 2, 4])],
    (2, "train"): [(5, [2])], (2, "valid"): [(4, [2, 5])], (2, "test"): [(1, [2, 5, 4])],
}


def _samples(prepared: Path) -> dict[tuple[int, str], list[tuple[int, list[int]]]]:
    users = pq.read_table(prepared / "users.parquet").to_pydict()
    user_id = dict(zip(users["user_idx"], users["user_id"]))
    video_id = dict(zip(*pq.read_table(prepared / "videos.parquet", columns=["video_idx", "video_id"]).to_pydict().values()))
    found: dict = {}
    for split in ("train", "valid", "test"):
        rows = pq.read_table(prepared / f"video_samples.{split}.parquet").to_pylist()
        for row in rows:
            found.setdefault((user_id[row["user_idx"]], split), []).append(
                (video_id[row["target_video"]], [video_id[v] for v in row["video_history"]]))
    return found


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    (raw / "ties.inter").write_text(INTER)
    return raw


def test_default_and_recbole_splits_match_the_hand_checked_table(raw_dir: Path, tmp_path: Path) -> None:
    default = prepare(raw_dir, tmp_path / "default", LSVCRConfig().data)
    assert _samples(tmp_path / "default") == DEFAULT
    assert default["counts"]["dropped_both_histories_empty"]["video"] == 3
    recbole_config = load_config(ROOT / "configs" / "movielens.yaml").data
    recbole = prepare(raw_dir, tmp_path / "recbole", recbole_config)
    assert _samples(tmp_path / "recbole") == RECBOLE
    assert recbole["counts"]["dropped_both_histories_empty"]["video"] == 2  # only each user's first item
    assert "raw row order" in recbole["split"] and "RecBole's prefixes" in recbole["split"]


def _trained_state(prepared: Path, overrides: list[str]) -> tuple[dict, LSVCRConfig]:
    config = load_config(ROOT / "configs" / "movielens.yaml",
                         ["model.architecture=sasrec", "model.mode=id", "finetune.max_epochs=4",
                          "finetune.patience=4", "finetune.batch_size=2", *overrides])
    check_inputs(config, prepared, None)
    return train_loop_per_worker(make_loop_config(config, prepared, None, report_to="local")), config


def _valid_metric(state: dict, config: LSVCRConfig, prepared: Path, **ranking) -> float:
    tables = load_comment_pools(prepared)
    model = build_model(config.model, tables.num_videos, None, None)
    model.load_state_dict(state["best_state"])
    valid = load_sample_arrays(prepared, "video", "valid", config.finetune.history_length)
    return evaluate_arrays(model, valid, tables, **ranking).result()[config.finetune.selection_metric]


def test_selection_uses_full_ranking_ndcg10_with_history_kept(raw_dir: Path, tmp_path: Path) -> None:
    # Two sampled negatives, so the sampled candidate list (3 videos) differs from full ranking (5 videos).
    prepared = tmp_path / "prepared"
    prepare(raw_dir, prepared, load_config(ROOT / "configs" / "movielens.yaml", ["data.video_negatives=2"]).data)
    torch.manual_seed(0)
    state, config = _trained_state(prepared, [])
    assert config.finetune.selection_metric == "ndcg@10" and config.finetune.selection_ranking == "full"
    logged = [row["valid_ndcg@10"] for row in state["history"]]
    assert state["best"] == max(logged) and state["history"][-1]["best_valid_ndcg@10"] == max(logged)
    assert state["best"] == pytest.approx(
        _valid_metric(state, config, prepared, full_ranking=True, exclude_seen=False), abs=1e-9)

    sampled_state, sampled_config = _trained_state(
        prepared, ["finetune.selection_ranking=sampled", "finetune.selection_metric=ndcg@5"])
    assert sampled_state["best"] == pytest.approx(_valid_metric(sampled_state, sampled_config, prepared), abs=1e-9)
    # The two rankings of the same weights differ on this table (3 sampled candidates vs all 5 videos).
    assert _valid_metric(state, config, prepared) != pytest.approx(
        _valid_metric(state, config, prepared, full_ranking=True, exclude_seen=False))


def test_bad_protocol_values_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.tie_break must be one of raw_id, file_order"):
        load_config(None, ["data.tie_break=time"])
    with pytest.raises(ConfigError, match="selection_ranking=full ranks all videos"):
        load_config(None, ["finetune.selection_ranking=full", "finetune.task=comment"])
