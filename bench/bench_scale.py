"""Scale benchmark (issue #16): wall time and peak RSS of every process, per stage, at growing sizes.

Sizes: `demo` (the demo preset), `demo10` (10x its users and videos), `kuaicomt` (KuaiComt's published
sizes, `lsvcr synth --preset kuaicomt`). Stages, each the real CLI in a subprocess watched with psutil
(the whole process tree, Ray's raylet and workers included, sampled every 0.25 s): synth, prepare,
encode (the hashed bag-of-words encoder: scale runs only, not LLM results), finetune_video and
finetune_comment (1 epoch each), evaluate_video, evaluate_comment, and serve (bench/scale_serve.py:
`lsvcr serve` on both trained models, then 1,000 HTTP requests on 127.0.0.1; its start and request
times are in the row's `serve`). On request (`--stages tune_video`): a 2-trial Ray Tune sweep of
configs/tune_space.yaml, one trial at a time, each one epoch cut to 100 steps then a full validation.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scale.py --work /tmp/scale --sizes demo demo10
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scale.py --work /tmp/scale --sizes kuaicomt --stages synth

Results merge into bench/results/scale.json (`{"sizes": {NAME: {"stages": {STAGE: {"seconds",
"peak_rss_gb", ...}}, "counts": {...}}}}`; a stage that did not run is absent or carries its error),
and bench/results/scale.png plots time and peak RSS against the number of video training samples.
RSS counts the pages a process has resident, memory-mapped file pages included (shared by processes);
`peak_private_gb` is RSS less its file-backed and shared pages (psutil's `shared`), what the process alone holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsvcr.data.prepared import is_prepared, load_manifest, samples_file  # noqa: E402
from lsvcr.data.schema import SPLITS, TASKS  # noqa: E402
from lsvcr.data.synth import PRESETS  # noqa: E402
from lsvcr.config import load_config  # noqa: E402
from lsvcr.runtime import allocator_environment  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"
PLOT = ROOT / "bench" / "results" / "scale.png"
STAGES = ("synth", "prepare", "encode", "finetune_video", "finetune_comment", "evaluate_video", "evaluate_comment",
          "serve")
# Not in the default list: a Ray Tune sweep at the size (2 trials, one at a time, each 1 epoch cut to
# TUNE_STEPS batches then a full validation): what a trial holds, not what a sweep learns.
OPTIONAL_STAGES = ("tune_video",)
TUNE_TRIALS, TUNE_STEPS = 2, 100
SERVE_REQUESTS = 1000
GB = 1024 ** 3
RAY_START_TIMEOUT = "timed out during startup"
# The memory allocator's settings, recorded beside each stage's peaks (they are the lever on glibc's retention).
ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                       "MIMALLOC_PURGE_DELAY", "MIMALLOC_ARENA_EAGER_COMMIT")


def size_params(name: str):
    demo = PRESETS["demo"]
    if name == "demo":
        return demo
    if name == "demo10":
        return dataclasses.replace(demo, users=demo.users * 10, videos=demo.videos * 10)
    if name == "kuaicomt":
        return PRESETS["kuaicomt"]
    raise SystemExit(f"unknown size {name!r}: demo, demo10 or kuaicomt")


def stage_command(stage: str, work: Path, params, storage_dtype: str = "float32") -> list[str]:
    lsvcr = [sys.executable, "-m", "lsvcr"]
    raw, prepared, vectors = work / "raw", work / "prepared", work / "vectors"
    # A lost worker resumes at its last 500-step checkpoint, not the epoch's start (the KuaiComt video epoch is
    # ~3,150 steps, ~70 min; the 2026-12-06 row predates this and lost 42 min to one such restart).
    one_epoch = ["--set", "finetune.max_epochs=1", "--set", "finetune.num_workers=1",
                 "--set", "finetune.checkpoint_every_steps=500"]
    if stage == "synth":
        preset = "kuaicomt" if params == PRESETS["kuaicomt"] else "demo"
        return lsvcr + ["synth", "--out", str(raw), "--preset", preset, "--users", str(params.users),
                        "--videos", str(params.videos)]
    if stage == "prepare":
        return lsvcr + ["prepare", "--raw", str(raw), "--out", str(prepared), "--force"]
    if stage == "encode":
        return lsvcr + ["encode", "--data", str(prepared), "--out", str(vectors), "--what", "items",
                        "--set", "encode.encoder=hashed", "--set", "encode.hashed_dim=64",
                        "--set", f"encode.storage_dtype={storage_dtype}"]
    if stage.startswith("finetune_"):
        task = stage.split("_", 1)[1]
        return lsvcr + ["finetune", "--data", str(prepared), "--vectors", str(vectors), "--task", task,
                        "--out", str(work / f"model_{task}")] + one_epoch
    if stage.startswith("tune_"):
        task = stage.split("_", 1)[1]
        return lsvcr + ["tune", "--data", str(prepared), "--vectors", str(vectors), "--task", task,
                        "--space", str(ROOT / "configs" / "tune_space.yaml"), "--out", str(work / f"tune_{task}"),
                        "--samples", str(TUNE_TRIALS), "--max-concurrent", "1", "--scheduler", "none",
                        "--set", "tune.max_epochs=1", "--set", f"finetune.max_steps_per_epoch={TUNE_STEPS}"]
    if stage.startswith("evaluate_"):
        task = stage.split("_", 1)[1]
        return lsvcr + ["evaluate", "--model", str(work / f"model_{task}")]
    if stage == "serve":
        return [sys.executable, str(ROOT / "bench" / "scale_serve.py"), "--prepared", str(prepared),
                "--video-model", str(work / "model_video"), "--comment-model", str(work / "model_comment"),
                "--requests", str(SERVE_REQUESTS), "--out", str(work / "serve_report.json")]
    raise SystemExit(f"unknown stage {stage!r}")


def paused_seconds(pause_log: Path, start: float, end: float) -> float:
    """Seconds of [start, end] (wall clock) the quiet watchers held the tree stopped: 'pause T' / 'resume T'
    lines, possibly from several watchers (stopped while any of them holds it)."""
    if not pause_log.is_file():
        return 0.0
    total, holders, paused_at = 0.0, 0, 0.0
    for line in pause_log.read_text().splitlines():
        word, stamp = line.split()[:2]
        if word == "pause":
            paused_at = float(stamp) if holders == 0 else paused_at
            holders += 1
        elif word == "resume" and holders > 0:
            holders -= 1
            if holders == 0:
                total += max(0.0, min(float(stamp), end) - max(paused_at, start))
    if holders > 0:
        total += max(0.0, end - max(paused_at, start))
    return total


def run_watched(command: list[str], log_path: Path, pause_log: Path | None = None) -> dict:
    """Run `command`; wall time (less any quiet-protocol pause), the peak RSS of each process of its tree,
    and the peak total."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    started, wall_started = time.perf_counter(), time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with log_path.open("w") as log:
        process = psutil.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peaks: dict[int, tuple[str, int]] = {}
        labels: dict[int, str] = {}  # a Ray worker's title changes from ray::IDLE to its actor's
        private_peaks: dict[int, int] = {}  # RSS less file-backed and shared pages (memory maps, Ray's object store)
        peak_total = 0
        while process.poll() is None:
            total = 0
            try:
                tree = [process] + process.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for member in tree:
                try:
                    memory = member.memory_info()
                    label = _label(member, labels.get(member.pid))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                labels[member.pid] = label
                total += memory.rss
                if memory.rss > peaks.get(member.pid, ("", 0))[1]:
                    peaks[member.pid] = (label, memory.rss)
                private_peaks[member.pid] = max(private_peaks.get(member.pid, 0), memory.rss - memory.shared)
            peak_total = max(peak_total, total)
            time.sleep(0.25)
    seconds = time.perf_counter() - started
    paused = paused_seconds(pause_log, wall_started, time.time()) if pause_log else 0.0
    by_process = sorted(((labels.get(pid, label), rss, private_peaks.get(pid, 0)) for pid, (label, rss) in peaks.items()),
                        key=lambda item: -item[1])
    result = {
        "seconds": round(seconds - paused, 2),
        "peak_rss_gb": round(by_process[0][1] / GB, 3) if by_process else None,
        "peak_private_gb": round(by_process[0][2] / GB, 3) if by_process else None,
        "peak_total_rss_gb": round(peak_total / GB, 3),
        "processes": [{"process": label, "peak_rss_gb": round(rss / GB, 3), "peak_private_gb": round(private / GB, 3)}
                      for label, rss, private in by_process[:6]],
        "returncode": process.returncode,
        "load_average_at_start": load_at_start,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    allocator = {name: os.environ[name] for name in ALLOCATOR_VARIABLES if os.environ.get(name)}
    if allocator:
        result["allocator_environment"] = allocator  # inherited by the stage's whole tree (raylet, workers)
    if paused:
        result["paused_seconds"] = round(paused, 2)  # subtracted; the quiet watcher stopped the whole tree
    for role, marker in (("training_worker", "TrainWorker"), ("serve_replica", "ServeReplica")):
        members = [(rss, private) for label, rss, private in by_process if marker in label]
        if members:
            result[f"peak_rss_gb_{role}"] = round(max(rss for rss, _ in members) / GB, 3)
            result[f"peak_private_gb_{role}"] = round(max(private for _, private in members) / GB, 3)
    return result


def _label(process: psutil.Process, previous: str | None) -> str:
    cmdline = process.cmdline()
    if cmdline and cmdline[0].startswith("ray::"):
        title = cmdline[0].split()[0]
        return previous if title == "ray::IDLE" and previous else title
    if previous:
        return previous
    if "-m" in cmdline and "lsvcr" in cmdline:
        return "lsvcr " + cmdline[cmdline.index("lsvcr") + 1]
    return process.name()


def counts(work: Path) -> dict:
    out: dict = {}
    if is_prepared(work / "prepared"):
        out["prepared"] = load_manifest(work / "prepared").get("counts", {})
        for task in TASKS:
            for split in SPLITS:
                path = work / "prepared" / samples_file(task, split)
                if path.is_file():
                    out.setdefault("samples", {})[path.name.removesuffix(".parquet")] = pq.ParquetFile(path).metadata.num_rows
    raw = work / "raw"
    for name in ("user_video_inter", "user_comment_inter", "comment_features", "video_features"):
        path = raw / f"{name}.parquet"
        if path.is_file():
            out.setdefault("raw", {})[name] = pq.ParquetFile(path).metadata.num_rows
    return out


def plot(results: dict, out: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted(results["sizes"].items(),
                   key=lambda kv: kv[1].get("counts", {}).get("samples", {}).get("video_samples.train", 0))
    for stage in STAGES + OPTIONAL_STAGES:
        xs, times, mems = [], [], []
        for _, row in sizes:
            entry = row["stages"].get(stage)
            samples = row.get("counts", {}).get("samples", {}).get("video_samples.train")
            if entry and samples and entry.get("returncode") == 0:
                xs.append(samples)
                times.append(entry["seconds"])
                mems.append(entry["peak_rss_gb"])
        if xs:
            line, = ax_time.plot(xs, times, marker="o", label=stage)
            ax_mem.plot(xs, mems, marker="o", label=stage, color=line.get_color())
        workers = [(row["counts"]["samples"]["video_samples.train"], row["stages"][stage]["peak_rss_gb_training_worker"])
                   for _, row in sizes if "peak_rss_gb_training_worker" in row["stages"].get(stage, {})
                   and row["stages"][stage].get("returncode") == 0]
        if workers:
            ax_mem.plot(*zip(*workers), marker="x", linestyle=":", color=line.get_color(),
                        label=f"{stage}: training worker")
    for ax, title in ((ax_time, "wall time (s)"), (ax_mem, "peak RSS of the largest process (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("video training samples")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.axhline(6.0, color="grey", linestyle="--", linewidth=1)
    ax_time.legend(fontsize=7)
    ax_mem.legend(fontsize=6)
    fig.suptitle("lsvcr scale benchmark (bench/bench_scale.py; 2-core shared machine)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _allocator(overrides: list[str]) -> str:
    """finetune.allocator as the stage's --set overrides leave it (the config's default otherwise)."""
    return load_config(overrides=overrides).finetune.allocator


def merge_stage(results_path: Path, size: str, stage: str, entry: dict, params: dict, size_counts: dict) -> None:
    """Read the results as they are now (another run may have written other stages since), set this one."""
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"sizes": {}}
    results["protocol"] = ("each stage the real CLI in a subprocess; psutil samples the RSS of its whole process "
                           "tree every 0.25 s; encode = hashed bag of words (dim 64, scale runs only; storage dtype in its "
                           "command); "
                           "finetune = 1 epoch, 1 Ray Train worker; default configs otherwise")
    row = results["sizes"].setdefault(size, {"stages": {}})
    row["params"] = params
    # A stage run in a fresh work dir (e.g. synth alone) sees fewer files: keep the counts it cannot see.
    merged = dict(row.get("counts", {}))
    for key, value in size_counts.items():
        merged[key] = {**merged.get(key, {}), **value}
    row["counts"] = merged
    row["stages"][stage] = entry
    results_path.write_text(json.dumps(results, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (one subdirectory per size)")
    parser.add_argument("--sizes", nargs="+", default=["demo", "demo10"])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES + OPTIONAL_STAGES,
                        help="default: %(default)s; also tune_video (a 2-trial Ray Tune sweep, "
                             f"{TUNE_STEPS} steps per trial)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON to merge into (default: %(default)s)")
    parser.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32",
                        help="encode's storage of the item vectors (float16 halves the memory maps every "
                             "worker and replica shares); recorded in the encode stage's command")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the finetune and tune stages (e.g. a probe's "
                             "finetune.max_steps_per_epoch=250); recorded in the stage's command")
    parser.add_argument("--pause-log", type=Path, default=None,
                        help="'pause T' / 'resume T' lines of a watcher that SIGSTOPs the stage's process tree "
                             "while another benchmark needs the CPU: the paused seconds are subtracted")
    args = parser.parse_args()
    failed = False
    results_path = args.results
    for name in args.sizes:
        params = size_params(name)
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        for stage in args.stages:
            command = stage_command(stage, work, params, args.storage_dtype)
            if stage.startswith(("finetune_", "tune_")):
                command += [part for override in args.overrides for part in ("--set", override)]
            print(f"[{name}] {stage}: {' '.join(command[1:])}", flush=True)
            entry = run_watched(command, work / f"{stage}.log", args.pause_log)
            for retry in range(2):  # Ray's local start has a fixed 30 s timeout, short on a loaded machine
                if entry["returncode"] == 0 or RAY_START_TIMEOUT not in (work / f"{stage}.log").read_text():
                    break
                print(f"[{name}] {stage}: Ray did not start in time (load {os.getloadavg()[0]:.1f}); retrying",
                      flush=True)
                entry = run_watched(command, work / f"{stage}.log", args.pause_log) | {"ray_start_retries": retry + 1}
            entry["command"] = " ".join(["python"] + command[1:])
            if stage.startswith(("finetune_", "tune_")):  # what the Ray Train workers start with (finetune.allocator)
                entry["worker_allocator_environment"] = allocator_environment(_allocator(args.overrides))
            if stage == "serve" and (work / "serve_report.json").is_file():
                entry["serve"] = json.loads((work / "serve_report.json").read_text())
            merge_stage(results_path, name, stage, entry, dataclasses.asdict(params), counts(work))
            print(f"[{name}] {stage}: {entry['seconds']} s, peak {entry['peak_rss_gb']} GB "
                  f"(tree {entry['peak_total_rss_gb']} GB), rc {entry['returncode']}, load {entry['load_average']}",
                  flush=True)
            if entry["returncode"] != 0:
                print(f"[{name}] {stage} failed: see {work / f'{stage}.log'}", flush=True)
                failed = True
                break
    if results_path.is_file():
        plot(json.loads(results_path.read_text()), results_path.with_suffix(".png"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
