"""Building and running the Serve application: the typed app builder of `serve run` / `serve deploy`
(`ServeAppArgs`, Serve's `app_builder` pattern), `start_serving` / `stop_serving` for Python callers, and
`serve_until_interrupted` behind `lsvcr serve`.

No `from __future__ import annotations` here: Serve reads the builder's parameter annotation at run
time to turn the config's `args:` into a `ServeAppArgs`.
"""

import json
import logging
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from ray import serve
from ray.serve import Application

from lsvcr.config import SERVE_INGRESS_ENVIRONMENT, LSVCRConfig, ServeConfig, load_config
from lsvcr.errors import ConfigError
from lsvcr.runtime import ensure_ray, serve_ingress_in_effect
from lsvcr.serve.deployments import RecommenderModel
from lsvcr.serve.model_dir import check_model_dir

APP_NAME = "lsvcr"

log = logging.getLogger("lsvcr.serve")


class ServeAppArgs(BaseModel):
    """The `args:` of an application in serve/config.yaml.

    `video_model` / `comment_model`: MODEL dirs (either optional), `config`: an LSVCR YAML file whose
    `serve:` section is used, `overrides`: a list of `section.key=value`.
    """

    model_config = ConfigDict(extra="forbid")
    video_model: str | None = None
    comment_model: str | None = None
    config: str | None = None
    overrides: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _known_args_only(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            unknown = set(raw) - set(cls.model_fields)
            if unknown:
                raise ValueError(f"unknown Serve application arg(s) {sorted(unknown)} (known: {sorted(cls.model_fields)})")
            if raw.get("overrides") is None:
                raw = {**raw, "overrides": []}
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ServeAppArgs":
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            raise ConfigError(first["msg"].removeprefix("Value error, ")) from None


def build_application(video_model_dir: str | None, comment_model_dir: str | None,
                      serve_config: ServeConfig) -> Application:
    """Bind the model deployment (also the HTTP ingress) with the resources and autoscaling of `serve_config`."""
    if not video_model_dir and not comment_model_dir:
        raise ConfigError("serving needs at least one model: give --video-model and/or --comment-model")
    for task, model_dir in (("video", video_model_dir), ("comment", comment_model_dir)):
        if model_dir:
            check_model_dir(model_dir, task)
    settings = {f: getattr(serve_config, f) for f in serve_config.__dataclass_fields__}
    return RecommenderModel.options(
        autoscaling_config={
            "min_replicas": serve_config.min_replicas,
            "max_replicas": serve_config.max_replicas,
            "target_ongoing_requests": serve_config.target_ongoing_requests,
            "upscale_delay_s": serve_config.upscale_delay_s,
            "downscale_delay_s": serve_config.downscale_delay_s,
        },
        # Enough in flight per replica for @serve.batch to fill a batch while the previous one computes.
        max_ongoing_requests=serve_config.max_ongoing_requests,
        max_surge_percent=serve_config.max_surge_percent,  # > 0: a rollout starts new replicas before stopping old ones
        ray_actor_options={"num_cpus": serve_config.num_cpus_per_replica},
        logging_config={"enable_access_log": serve_config.access_log},
    ).bind(
        str(Path(video_model_dir).resolve()) if video_model_dir else None,
        str(Path(comment_model_dir).resolve()) if comment_model_dir else None,
        settings,
    )


def build_app(args: ServeAppArgs) -> Application:
    """Ray Serve application builder (`import_path: serve.app:app` with `args:` in serve/config.yaml).
    Serve passes a validated `ServeAppArgs`; a plain dict (a Python caller) is validated here."""
    if not isinstance(args, ServeAppArgs):
        args = ServeAppArgs.from_dict(args)
    config = load_config(args.config, list(args.overrides))
    # `serve run` / `serve deploy`: the cluster exists already (this runs in it), with its own ingress.
    _warn_on_other_ingress(serve_ingress_in_effect(), config.serve.ingress)
    return build_application(args.video_model, args.comment_model, config.serve)


def start_serving(video_model_dir: str | Path | None, comment_model_dir: str | Path | None,
                  config: LSVCRConfig | ServeConfig | None = None) -> str:
    """Start Serve on this Ray cluster (starting a local one if needed) and return the base URL."""
    serve_config = config.serve if isinstance(config, LSVCRConfig) else (config or ServeConfig())
    application = build_application(
        str(video_model_dir) if video_model_dir else None,
        str(comment_model_dir) if comment_model_dir else None,
        serve_config,
    )
    ensure_ray(serve_ingress=serve_config.ingress)
    serve.start(http_options={"host": serve_config.host, "port": serve_config.port})
    serve.run(application, name=APP_NAME, route_prefix="/")
    base_url = f"http://{serve_config.host}:{serve_config.port}"
    _wait_until_healthy(base_url)
    _warn_on_other_ingress(model_info(base_url).get("serve", {}).get("ingress"), serve_config.ingress)
    return base_url


def model_info(base_url: str) -> dict[str, Any]:
    """`GET /v1/model` of a running app ({} if it does not answer: this is for messages, never for a decision)."""
    try:
        with urllib.request.urlopen(f"{base_url}/v1/model", timeout=30) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as error:
        log.debug("GET %s/v1/model: %s", base_url, error)
        return {}


def _warn_on_other_ingress(running: str | None, wanted: str) -> None:
    """A cluster that was already running keeps the ingress it was started with: say so when that is not
    the configured one (the replicas report what their environment says)."""
    if running is not None and running != wanted:
        variables = " ".join(f"{k}={v!r}" for k, v in SERVE_INGRESS_ENVIRONMENT[wanted].items())
        log.warning("serve.ingress=%s but this Ray cluster serves through %s: start the cluster (ray start / "
                    "ray.init) with %s in its environment", wanted, running, variables)


def _wait_until_healthy(base_url: str, timeout_s: float = 20.0) -> None:
    """The app is RUNNING when `serve.run` returns; this also proves the proxy answers on *our* port
    (Serve keeps the HTTP options of an instance that was already running in the cluster)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"Serve started but {base_url}/healthz does not answer ({error}); if Serve was already "
                    "running on this cluster with other HTTP options, call stop_serving() (serve.shutdown) first"
                ) from None
        time.sleep(0.5)


def stop_serving() -> None:
    """Delete the app, then stop Serve. Behind HAProxy a replica drains for Ray's 30 s before it exits
    (docs/serving.md); `serve.shutdown` alone gives up on it after 30 s and kills the controller mid-call,
    which Ray reports on the console. Deleting first lets the replicas finish their drain."""
    try:
        serve.delete(APP_NAME)
    except Exception as error:  # noqa: BLE001 - no app (never deployed, already deleted): shut down anyway
        log.debug("serve.delete(%s): %s", APP_NAME, error)
    serve.shutdown()



def serve_until_interrupted(video_model_dir: str | None, comment_model_dir: str | None, config: LSVCRConfig) -> int:
    """`lsvcr serve`: start Serve, print how to call it, and serve until Ctrl-C or SIGTERM."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and `kill` both stop Serve cleanly (a background job may start with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    base_url = start_serving(video_model_dir, comment_model_dir, config)
    try:
        catalog = model_info(base_url).get("catalog", {})
        endpoint = "videos" if video_model_dir else "comments"
        body = {"user_id": catalog.get("example_user_id"), "k": 5}
        if endpoint == "comments":
            body["video_id"] = catalog.get("example_video_id")
        print(f"LSVCR serving at {base_url}  (GET {base_url}/healthz, GET {base_url}/v1/model)")
        print(f"try: curl -s -X POST {base_url}/v1/recommend/{endpoint} "
              f"-H 'content-type: application/json' -d '{json.dumps(body)}'")
        print("Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
        return 0
    finally:
        stop_serving()
