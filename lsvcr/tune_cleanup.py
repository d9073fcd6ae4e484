"""Cleanup after stopped Tune trials, around Ray private APIs (Train V2's worker-group callback,
`internal_kv`, `ray._private.state`); the sweep (`lsvcr.tune`) is its only user.

When Tune stops a trial (ASHA, or max_t), it kills the trial's actor mid-`fit()`: the Train controller
dies with it, and the worker group's placement group is left to Train V2's PlacementGroupCleaner, which
asks the State API (the dashboard) whether the controller is alive. On a cluster started without the
dashboard (`ray.init(include_dashboard=False)`, as here and in the tests) that query always fails, the
placement group is never removed, its CPUs stay reserved and later trials wait forever. So each trial
records its worker group's placement group (a Train callback in the controller), and the sweep removes
those whose controller is dead. With a dashboard this is a no-op (Train has already removed them).
"""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("lsvcr.tune")


def _ledger_kv():
    from ray.experimental import internal_kv

    return internal_kv


try:  # Train V2's internal worker-group callback (RunConfig accepts it beside UserCallbacks).
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback as _WorkerGroupCallback
except ImportError:  # pragma: no cover - a Ray without Train V2
    _WorkerGroupCallback = object


class TrainPlacementRecorder(_WorkerGroupCallback):
    def __init__(self, key: str):
        self.key = key

    def after_worker_group_start(self, worker_group) -> None:
        import ray

        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        record = {"placement_group": group.id.hex(), "controller": ray.get_runtime_context().get_actor_id()}
        _ledger_kv()._internal_kv_put(self.key, json.dumps(record), overwrite=True)


def reap_stopped_train_runs(prefix: str, wait_s: float = 0.0) -> int:
    """Remove recorded placement groups of dead Train controllers; returns how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    kv = _ledger_kv()
    removed = 0
    deadline = time.monotonic() + wait_s
    while True:
        pending = 0
        for key in kv._internal_kv_list(prefix):
            raw = kv._internal_kv_get(key)
            if raw is None:
                continue
            record = json.loads(raw)
            controller = ray._private.state.actors(actor_id=record["controller"]) or {}
            if controller.get("State", "DEAD") != "DEAD":
                pending += 1
                continue
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record["placement_group"])))
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)
                removed += 1
                log.info("removed the placement group of a stopped trial's Train run (%s)", key.decode()[len(prefix):])
            kv._internal_kv_del(key)
        if pending == 0 or time.monotonic() > deadline:
            return removed
        time.sleep(0.5)


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover
    _TuneCallback = object


class ReapStoppedTrainRuns(_TuneCallback):
    def __init__(self, prefix: str, every_s: float = 2.0):
        self.prefix, self.every_s, self._last = prefix, every_s, 0.0

    def on_step_begin(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            try:
                reap_stopped_train_runs(self.prefix)
            except Exception as error:  # noqa: BLE001 - cleanup must never fail the sweep
                log.warning("could not clean up stopped trials' placement groups: %s", error)
