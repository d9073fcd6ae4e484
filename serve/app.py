"""Ray Serve application of the LSVCR SR backbone, for `serve run serve/config.yaml` / `serve deploy`.

`app` is an application *builder*: Serve calls it with the `args:` of the config file
(`video_model`, `comment_model`, `config`, `overrides`; see `lsvcr.serving.build_app`).
From Python, use `lsvcr.serving.start_serving(...)`; from the shell, `lsvcr serve ...`.
"""

from lsvcr.serving import build_app

app = build_app
