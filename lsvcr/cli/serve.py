"""`lsvcr serve`: the command-line arguments, then `lsvcr.serve.app.serve_until_interrupted`."""

from __future__ import annotations

import argparse

from lsvcr.config import load_config
from lsvcr.serve.app import serve_until_interrupted


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video-model", default=None, help="MODEL dir of `lsvcr finetune` (video task)")
    parser.add_argument("--comment-model", default=None, help="MODEL dir of `lsvcr finetune` (comment task)")
    parser.add_argument("--host", default=None, help="HTTP host (default serve.host = 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port = 8000)")


def serve_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    config.serve.host = args.host or config.serve.host
    config.serve.port = args.port or config.serve.port
    return serve_until_interrupted(args.video_model, args.comment_model, config)
