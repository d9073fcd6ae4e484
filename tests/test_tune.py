"""`lsvcr tune` on real components: the space format and its errors, and one small Ray Tune sweep of real
Ray Train fine-tuning trials on the tiny synthetic data (MiniLM vectors) that is then restored, and
whose best config trains again with `run_finetune`."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lsvcr.cli import main as cli_main
from lsvcr.config import LSVCRConfig, load_config
from lsvcr.errors import ConfigError
from lsvcr.tune_space import apply_params, load_space, parse_space, space_to_dict

# ----------------------------------------------------------------------------- the space format


def test_shipped_space_parses_and_round_trips():
    space = load_space(Path(__file__).parents[1] / "configs" / "tune_space.yaml")
    assert space["finetune.lr"].kind == "loguniform" and space["finetune.lr"].values == (1e-4, 3e-3)
    assert space["finetune.history_length"].values == (20, 30, 50)
    assert parse_space(space_to_dict(space)) == space


def test_shipped_comment_space_parses_and_round_trips():
    space = load_space(Path(__file__).parents[1] / "configs" / "tune_space_comment.yaml")
    assert space["model.mode"].values == ("id+text", "text")
    assert space["finetune.patience"].kind == "constant" and space["finetune.patience"].values == (20,)
    assert parse_space(space_to_dict(space)) == space


def test_space_values_are_typed_and_yaml_exponents_accepted():
    # PyYAML reads 1e-4 (no dot) as a string: bounds and float choices still become numbers.
    space = parse_space(yaml.safe_load("""
        finetune.lr: {loguniform: [1e-4, 3e-3]}
        finetune.history_length: {randint: [10, 51]}
        model.temperature: {grid: [0.05, 7e-2]}
        finetune.batch_size: 64
    """))
    assert space["finetune.lr"].values == (1e-4, 3e-3)
    assert space["model.temperature"].values == (0.05, 0.07)
    assert space["finetune.batch_size"].kind == "constant" and space["finetune.batch_size"].values == (64,)
    config = apply_params(LSVCRConfig(), {"finetune.lr": 2e-4, "finetune.history_length": 30, "model.temperature": 0.05})
    assert (config.finetune.lr, config.finetune.history_length, config.model.temperature) == (2e-4, 30, 0.05)


@pytest.mark.parametrize(("text", "message"), [
    ("finetune.lrr: {loguniform: [1e-4, 1e-3]}", "'finetune.lrr': unknown config key"),
    ("finetune.lr: {normal: [0.001, 0.1]}", "'finetune.lr': unknown distribution 'normal'"),
    ("finetune.lr: {loguniform: [0, 1e-3]}", "'finetune.lr': loguniform needs 0 < low"),
    ("model.hidden_dropout: {uniform: [0.5, 0.1]}", "'model.hidden_dropout': uniform needs low < high"),
    ("model.hidden_dropout: {randint: [0, 1]}", "'model.hidden_dropout': randint needs an integer field"),
    ("finetune.history_length: {choice: [20, fifty]}", "'finetune.history_length': expected an integer, got 'fifty'"),
    ("finetune.lr: {uniform: [1e-4, 1e-3], choice: [1]}", "'finetune.lr': a distribution is a mapping with one key"),
    ("tune.num_samples: {choice: [2, 4]}", "'tune.num_samples': expected section.field with section one of"),
    ("finetune: {lr: 0.001}", "'finetune': expected section.field"),
    ("finetune.task: {grid: [video, comment]}", "'finetune.task' cannot be searched"),
    ("- finetune.lr", "expected a non-empty mapping"),
])
def test_bad_space_names_the_key(text, message):
    with pytest.raises(ConfigError) as error:
        parse_space(yaml.safe_load(text))
    assert message in str(error.value)


def test_cli_reports_a_bad_space_file_in_one_line(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("finetune.lr: {loguniform: [1e-4, 3e-3]}\nmodel.dropoutt: {uniform: [0.1, 0.5]}\n")
    code = cli_main(["tune", "--data", str(tmp_path), "--space", str(space), "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("lsvcr tune: error: search space key 'model.dropoutt': unknown config key") and "\n" not in err
    assert not (tmp_path / "sweep").exists()


# ----------------------------------------------------------------------------- a real sweep

SWEEP_SPACE = """
finetune.lr: {loguniform: [5e-4, 3e-3]}
finetune.id_text_loss_weight: {uniform: [0.0, 0.3]}
# -0.5 passes the config's type check but nn.Dropout raises inside the trial's Train worker.
model.hidden_dropout: {grid: [0.1, 0.2, 0.3, -0.5]}
"""


def _sweep_config() -> LSVCRConfig:
    config = LSVCRConfig()
    config.finetune.batch_size = 128
    config.finetune.max_failures = 0  # the failing trial should fail once, not be retried by Train
    config.tune.num_samples = 1  # x 4 grid values = 4 trials
    config.tune.max_epochs = 2
    config.tune.grace_period = 1
    config.tune.max_concurrent = 2
    return config


def _progress_files(out: Path) -> dict[str, str]:
    """Each trial's reported rows (one per epoch, with their timestamps); Tune rewrites the files on restore."""
    return {path.parent.name: path.read_text() for path in sorted((out / "experiment").glob("trial_*/progress.csv"))}


@pytest.fixture(scope="session")  # session: it must run before the session-scoped `ray_cluster`
def _local_ray_first():
    """Start the session's Ray with address="local" before `ray_cluster` does: a plain `ray.init()` joins
    the cluster named in /tmp/ray/ray_current_cluster, which a `ray start --head` elsewhere on this shared
    machine may have left behind (then `num_cpus` is refused)."""
    import ray

    from lsvcr.runtime import apply_serve_ingress_environment

    if not ray.is_initialized():
        apply_serve_ingress_environment()  # as `ray_cluster` does: the serving tests may run on this cluster
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module")
def sweep(_local_ray_first, ray_cluster, tiny_prepared_dir, tiny_minilm_vectors_dir, tmp_path_factory):
    from lsvcr.tune import run_tune

    out = tmp_path_factory.mktemp("tune") / "sweep"
    space_file = out.parent / "space.yaml"
    space_file.write_text(SWEEP_SPACE)
    args = (_sweep_config(), load_space(space_file), tiny_prepared_dir, tiny_minilm_vectors_dir, out)
    summary = run_tune(*args)
    return {"out": out, "summary": summary, "args": args}


@pytest.mark.slow
def test_sweep_reports_every_trial_and_writes_the_best_config(sweep):
    out, summary = sweep["out"], sweep["summary"]
    table = pd.read_csv(out / "trials.csv")
    parquet = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 4 and list(parquet["trial_id"]) == list(table["trial_id"])
    assert list(parquet["status"]) == list(table["status"]) and list(parquet.columns) == list(table.columns)
    assert list(table.columns[:2]) == ["trial_id", "status"]
    assert {"finetune.lr", "model.hidden_dropout", "objective", "epochs_run", "seconds", "error"} <= set(table.columns)

    failed = table[table["model.hidden_dropout"] < 0]
    assert len(failed) == 1 and failed["status"].item() == "error"
    assert "dropout probability" in failed["error"].item()
    good = table[table["model.hidden_dropout"] > 0]
    assert set(good["status"]) <= {"completed", "stopped_early"} and (good["status"] == "completed").any()
    assert good["objective"].between(0, 1).all() and (good["epochs_run"] >= 1).all()
    assert (good.loc[good["status"] == "completed", "epochs_run"] == 2).all()
    for trial_id in good.loc[good["status"] == "completed", "trial_id"]:
        assert (out / "trials" / trial_id / "model" / "metrics.json").is_file()  # a full MODEL/ per finished trial

    best = table.loc[table["objective"].idxmax()]
    assert summary.best_trial_id == best["trial_id"] and math.isclose(summary.best_objective, best["objective"])
    best_config = load_config(out / "best_config.yaml")
    assert math.isclose(best_config.finetune.lr, best["finetune.lr"], rel_tol=1e-12)
    assert math.isclose(best_config.finetune.id_text_loss_weight, best["finetune.id_text_loss_weight"], rel_tol=1e-12)
    assert best_config.model.hidden_dropout == best["model.hidden_dropout"]
    assert best_config.finetune.max_epochs == LSVCRConfig().finetune.max_epochs  # the user's budget, not the sweep's
    assert (out / "tune.png").stat().st_size > 10_000


@pytest.mark.slow
def test_stopped_and_finished_trials_leave_no_reserved_cpus(sweep):
    import ray
    from ray.experimental import internal_kv

    from lsvcr.tune import EXPERIMENT_NAME

    prefix = f"lsvcr-tune:{Path(sweep['out']).resolve() / EXPERIMENT_NAME}:"
    assert internal_kv._internal_kv_list(prefix) == []  # every trial's Train placement group was accounted for
    groups = ray.util.placement_group_table().values()
    assert not [g for g in groups if g["state"] == "CREATED" and any("CPU" in b for b in g["bundles"].values())]


@pytest.mark.slow
def test_restored_sweep_does_not_rerun_finished_trials(sweep):
    from lsvcr.tune import run_tune

    out = sweep["out"]
    rows_before = pd.read_csv(out / "trials.csv").set_index("trial_id")
    finished = list(rows_before.index[rows_before["status"] != "error"])
    before = {trial: rows for trial, rows in _progress_files(out).items() if trial.removeprefix("trial_") in finished}
    trial_dirs = sorted(p.name for p in (out / "experiment").glob("trial_*"))
    summary = run_tune(*sweep["args"])  # same --out: Tuner.restore(resume_errored=True)
    rows_after = pd.read_csv(out / "trials.csv").set_index("trial_id")
    assert sorted(p.name for p in (out / "experiment").glob("trial_*")) == trial_dirs
    after = _progress_files(out)
    assert before and {trial: after[trial] for trial in before} == before  # no finished trial reported a new epoch
    pd.testing.assert_frame_equal(rows_after.loc[finished], rows_before.loc[finished])
    bad_dropout = rows_after["model.hidden_dropout"] < 0
    assert rows_after.loc[bad_dropout, "status"].eq("error").all()  # errored trials are retried; this one fails again
    assert summary.best_objective >= sweep["summary"].best_objective

    with pytest.raises(ConfigError, match="different space.yaml"):
        other = parse_space({"finetune.lr": {"loguniform": [1e-4, 1e-3]}})
        run_tune(sweep["args"][0], other, *sweep["args"][2:])


@pytest.mark.slow
def test_best_config_trains_with_run_finetune(sweep, tiny_prepared_dir, tiny_minilm_vectors_dir, tmp_path):
    from lsvcr.finetune import run_finetune

    config = load_config(sweep["out"] / "best_config.yaml", ["finetune.max_epochs=1"])
    result = run_finetune(config, tiny_prepared_dir, tiny_minilm_vectors_dir, tmp_path / "model")
    assert result.metrics["epochs_run"] == 1
    assert 0 <= result.metrics["test"]["ndcg@5"] <= 1
    assert load_config(result.out_dir / "config.yaml").finetune.lr == config.finetune.lr
