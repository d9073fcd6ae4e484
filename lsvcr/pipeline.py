"""The end-to-end pipeline: raw tables -> prepare -> encode -> align -> finetune (both tasks) -> evaluate ->
report (-> a short serve check in the demo).

Every stage writes below `paths.storage` (a local path or a URI) and is skipped when its finished output
(`_SUCCESS` marker, written last) already exists, so a re-submitted job resumes where it stopped.
`ray_jobs/*.py` and `lsvcr demo` are thin wrappers over `run_pipeline`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lsvcr import console, model_files, storage
from lsvcr.config import LSVCRConfig
from lsvcr.data.prepared import load_manifest
from lsvcr.errors import ConfigError

log = logging.getLogger("lsvcr.pipeline")

TASKS = ("video", "comment")
STAGES = ("prepare", "encode", "align", "finetune", "evaluate", "report")


@dataclass
class StageLayout:
    """Where each stage's output lives below the storage root."""

    root: str

    def uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def raw(self) -> str:
        return self.uri("raw")

    @property
    def prepared(self) -> str:
        return self.uri("prepared")

    @property
    def vectors(self) -> str:
        return self.uri("vectors")

    @property
    def aligned(self) -> str:
        return self.uri("aligned")

    def model(self, task: str, aligned: bool = True) -> str:
        return self.uri("models", task if aligned else f"{task}-noalign")

    def like_prior_model(self) -> str:
        """The comment model with the like prior (an extension beyond the paper), from the aligned checkpoint."""
        return self.uri("models", "comment-likeprior")

    @property
    def report(self) -> str:
        return self.uri("report")


@dataclass
class PipelineRun:
    layout: StageLayout
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    has_comments: bool = True


def _timed(run: PipelineRun, name: str, done: bool, work: Callable[[], object]) -> None:
    if done:
        log.info("stage %s: finished output exists, skipped", name)
        run.skipped.append(name)
        run.timings.setdefault(name, 0.0)
        return
    print(f"==> stage {name}", flush=True)
    started = time.perf_counter()
    work()
    run.timings[name] = round(time.perf_counter() - started, 1)
    print(f"<== stage {name}: {run.timings[name]:.1f} s", flush=True)


def stage_prepare(config: LSVCRConfig, run: PipelineRun) -> None:
    from lsvcr.data.prepare import prepare
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic

    layout = run.layout
    raw = config.paths.raw
    if not raw:
        if config.paths.synth_preset not in PRESETS:
            raise ConfigError(f"paths.synth_preset must be one of {sorted(PRESETS)}")
        raw = str(storage.local_dir(layout.raw))
        _timed(run, "synth", storage.is_finished(layout.raw),
               lambda: (write_synthetic(raw, PRESETS[config.paths.synth_preset]),
                        storage.push(Path(raw), layout.raw)))
    else:
        raw = str(storage.pull(raw)) if storage.is_remote(raw) else raw

    def work() -> None:
        local = storage.local_dir(layout.prepared)
        prepare(raw, local, config.data)
        storage.push(local, layout.prepared)

    _timed(run, "prepare", storage.is_finished(layout.prepared), work)
    manifest = load_manifest(storage.pull(layout.prepared))
    run.has_comments = bool(manifest.get("has_comments"))


def stage_encode(config: LSVCRConfig, run: PipelineRun) -> None:
    from lsvcr.llm.encode import run_encode

    layout = run.layout

    def work() -> None:
        local = storage.local_dir(layout.vectors)
        # LoRA alignment renders and runs its prompts live: only frozen alignment needs the user prompt vectors.
        run_encode(config, storage.pull(layout.prepared), local, what="all" if config.align.mode == "frozen" else "items")
        storage.push(local, layout.vectors)

    _timed(run, "encode", storage.is_finished(layout.vectors), work)


def stage_align(config: LSVCRConfig, run: PipelineRun) -> None:
    from lsvcr.llm.align import run_align

    layout = run.layout

    def work() -> None:
        local = storage.local_dir(layout.aligned)
        run_align(config, storage.pull(layout.prepared), storage.pull(layout.vectors), local)
        storage.push(local, layout.aligned)

    _timed(run, "align", storage.is_finished(layout.aligned), work)


def _task_config(config: LSVCRConfig, task: str, like_prior: bool | None = None) -> LSVCRConfig:
    import copy

    task_config = copy.deepcopy(config)
    task_config.finetune.task = task
    if like_prior is not None:
        task_config.model.comment_like_prior = like_prior
    return task_config


def model_label(config: LSVCRConfig, task: str, aligned: bool) -> str:
    """The table row of a fine-tuned model; the like prior (beyond the paper) always shows in the name."""
    prior = " + like prior" if task == "comment" and config.model.comment_like_prior else ""
    return f"LSVCR{prior} ({'aligned' if aligned else 'no alignment'})"


def stage_finetune(config: LSVCRConfig, run: PipelineRun, compare_no_alignment: bool = True) -> None:
    """Both tasks from the aligned checkpoint; optionally also from scratch on the raw LLM vectors. With the
    paper's comment scoring (`model.comment_like_prior` false), the comment model is also fine-tuned once more
    from the aligned checkpoint with the like prior, reported as its own row ("LSVCR + like prior")."""
    from lsvcr.finetune import run_finetune

    layout = run.layout
    tasks = TASKS if run.has_comments else ("video",)
    if not run.has_comments:
        print("comment task disabled: the data set has no comment tables", flush=True)
    aligned = storage.pull(layout.aligned)
    for task in tasks:
        uri = layout.model(task)
        _timed(run, f"finetune-{task}", storage.is_finished(uri),
               lambda: run_finetune(_task_config(config, task), layout.prepared, storage.join(layout.aligned, "vectors"),
                                    uri, init=aligned / "checkpoint.pt"))
        if compare_no_alignment:
            uri = layout.model(task, aligned=False)
            _timed(run, f"finetune-{task}-noalign", storage.is_finished(uri),
                   lambda: run_finetune(_task_config(config, task), layout.prepared, layout.vectors, uri))
        if task == "comment" and not config.model.comment_like_prior:
            uri = layout.like_prior_model()
            _timed(run, "finetune-comment-likeprior", storage.is_finished(uri),
                   lambda: run_finetune(_task_config(config, task, like_prior=True), layout.prepared,
                                        storage.join(layout.aligned, "vectors"), uri, init=aligned / "checkpoint.pt"))


def stage_evaluate(config: LSVCRConfig, run: PipelineRun) -> dict:
    """Collect every model's metrics plus the popularity baseline under the same protocol."""
    from lsvcr.evaluate import popularity_metrics

    layout = run.layout
    results: dict = {}
    for task in TASKS if run.has_comments else ("video",):
        rows = {}
        models = [(model_label(config, task, True), layout.model(task)),
                  (model_label(config, task, False), layout.model(task, aligned=False))]
        if task == "comment" and not config.model.comment_like_prior:
            models.append((model_label(_task_config(config, task, like_prior=True), task, True),
                           layout.like_prior_model()))
        for label, uri in models:
            if storage.is_finished(uri):
                rows[label] = model_files.read_metrics(storage.pull(uri))
                if "swapped_history" in rows[label]:  # the personalization check (lsvcr.evaluate.swap_histories)
                    rows[f"{label}, another user's history"] = rows[label]["swapped_history"]
        prepared = storage.pull(layout.prepared)
        if task == "video":
            rows["popularity"] = popularity_metrics(prepared, task, _task_config(config, task))
        else:
            # The comment model's bar is popularity by training interactions (the leak-free rule used for
            # videos); popularity by like count is the stronger reference, always reported beside it.
            for signal, label in (("train_interactions", "popularity (train interactions, the bar)"),
                                  ("likes", "popularity (like count, reference)")):
                rows[label] = popularity_metrics(prepared, task, _task_config(config, task), comment_signal=signal)
        results[task] = rows
    return results


def stage_report(config: LSVCRConfig, run: PipelineRun, results: dict) -> Path:
    from lsvcr.pipeline_report import write_pipeline_report

    local = storage.local_dir(run.layout.report)
    path = write_pipeline_report(local, run.layout, results, run.timings, synthetic=not config.paths.raw,
                                 budget=(config.finetune.max_epochs, config.finetune.patience))
    storage.mark_finished(local)
    storage.push(local, run.layout.report)
    return path


def run_pipeline(config: LSVCRConfig, stages: tuple[str, ...] = STAGES,
                 compare_no_alignment: bool = True) -> PipelineRun:
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    from lsvcr.runtime import ensure_ray

    ensure_ray(serve_ingress=config.serve.ingress)  # the serve check at the end runs on this cluster
    run = PipelineRun(StageLayout(config.paths.storage))
    started = time.perf_counter()
    stage_prepare(config, run)  # always: later stages need the manifest (skipped when finished)
    if "encode" in stages:
        stage_encode(config, run)
    if "align" in stages:
        stage_align(config, run)
    if "finetune" in stages:
        stage_finetune(config, run, compare_no_alignment)
    if "evaluate" in stages or "report" in stages:
        results = stage_evaluate(config, run)
        if "report" in stages:
            report = stage_report(config, run, results)
            print(f"report: {report}", flush=True)
    run.timings["total"] = round(time.perf_counter() - started, 1)
    return run


def serve_check(config: LSVCRConfig, run: PipelineRun, seconds: float = 0.0) -> dict:
    """Serve the fine-tuned models briefly, send one sample request per endpoint, print and return the answers."""
    import urllib.request

    from lsvcr.serve.app import start_serving, stop_serving

    console.route_ray_loggers()  # ray.serve's logger gets its console handler when ray.serve is imported

    layout = run.layout
    video_model = storage.pull(layout.model("video"))
    comment_model = storage.pull(layout.model("comment")) if run.has_comments else None
    base_url = start_serving(video_model, comment_model, config)
    answers = {}
    try:
        with urllib.request.urlopen(f"{base_url}/v1/model", timeout=60) as response:
            catalog = json.loads(response.read())["catalog"]
        requests = {"videos": {"user_id": catalog["example_user_id"], "k": 5}}
        if comment_model:
            requests["comments"] = {"user_id": catalog["example_user_id"], "video_id": catalog["example_video_id"],
                                    "k": 5}
        for endpoint, body in requests.items():
            request = urllib.request.Request(f"{base_url}/v1/recommend/{endpoint}", data=json.dumps(body).encode(),
                                             headers={"content-type": "application/json"}, method="POST")
            with urllib.request.urlopen(request, timeout=60) as response:
                answers[endpoint] = {"request": body, "response": json.loads(response.read())}
            print(f"POST {base_url}/v1/recommend/{endpoint} {json.dumps(body)}")
            print(f"  -> {_shortened(json.dumps(answers[endpoint]['response']))}", flush=True)
        time.sleep(seconds)
    finally:
        with console.ray_output_to_log():
            stop_serving()
    return answers


def _shortened(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
