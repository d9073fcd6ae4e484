"""`lsvcr` command line: every argparse definition of the project lives in this package.

One module per command group (`data`, `llm`, `train`, `serve`, `demo`; `jobs` for `ray_jobs/*.py`), imported
only when one of its commands runs. For command NAME the group module defines
`add_NAME_arguments(parser)` and `NAME_command(args) -> int`, which turns the flags into a call of the typed
domain function (`lsvcr.data.prepare.prepare`, `lsvcr.finetune.run_finetune`, ...).
Every command takes `--config FILE` and repeated `--set section.key=value`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lsvcr.errors import LSVCRError

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lsvcr.cli.data", "write a synthetic dataset in the KuaiComt layout"),
    "data": ("lsvcr.cli.data", "fetch a public data set (MovieLens-100k / 1m) as RecBole atomic files"),
    "prepare": ("lsvcr.cli.data", "raw tables (KuaiComt, RecBole, CSV) -> LSVCR samples in Parquet"),
    "encode": ("lsvcr.cli.llm", "vLLM on Ray actors: item texts and user histories -> LLM vectors"),
    "align": ("lsvcr.cli.llm", "stage 1: personalized preference alignment on Ray Train"),
    "finetune": ("lsvcr.cli.train", "stage 2: recommendation-oriented fine-tuning on Ray Train"),
    "evaluate": ("lsvcr.cli.train", "ranking metrics of a fine-tuned model with the protocol beside them"),
    "tune": ("lsvcr.cli.train", "Ray Tune sweep over fine-tuning / alignment hyper-parameters"),
    "serve": ("lsvcr.cli.serve", "Ray Serve HTTP endpoints for video and comment recommendation"),
    "demo": ("lsvcr.cli.demo", "raw tables -> prepare -> encode -> align -> finetune -> evaluate -> serve"),
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (see docs/config.md)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set finetune.lr=3e-4 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="everything on the console: Ray's, vLLM's and the workers' output, debug logging (also LSVCR_VERBOSE=1)")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsvcr",
        description="LSVCR on Ray: LLM-enhanced sequential recommendation of short videos and comments.",
        epilog="Run `lsvcr COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            module = importlib.import_module(module_name)
            getattr(module, f"add_{name}_arguments")(sub_parser)
            add_common_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from lsvcr.runtime import setup_logging

    setup_logging(args.verbose)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(getattr(module, f"{args.command}_command")(args) or 0)
    except LSVCRError as error:
        print(f"lsvcr {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lsvcr {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
