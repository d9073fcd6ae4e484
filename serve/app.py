"""Ray Serve application of the LSVCR SR backbone, for `serve run serve/config.yaml` / `serve deploy`.

`app` is an application *builder*: Serve calls it with the `args:` of the config file, validated into
a `ServeAppArgs` (`video_model`, `comment_model`, `config`, `overrides`; see `lsvcr.serve.app`).
From Python, use `lsvcr.serve.app.start_serving(...)`; from the shell, `lsvcr serve ...`.
"""

from lsvcr.serve.app import build_app

app = build_app
