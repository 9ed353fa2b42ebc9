"""The ``moa`` command: dispatch to a subcommand, and one clear line for user errors.

Kept free of heavy imports so ``moa --help`` and ``moa --version`` answer at once; each subcommand imports what
it needs when it runs. Errors that a user can mend (a bad value, a missing file, an unknown router) print as
``moa: error: <message>`` with exit status 2; ``MOA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

LIGHTNING_COMMANDS = {
    "fit": "train a model from a config (Lightning CLI), tracked in MLflow",
    "validate": "evaluate a model or checkpoint (--ckpt_path) on the validation split",
    "test": "evaluate a model or checkpoint (--ckpt_path) on the test split",
    "predict": "write predictions (add moa.pipelines.cli.lightning_cli.ParquetPredictionWriter to the callbacks)",
}
OTHER_COMMANDS = {
    "register": "log a model bundle (any kind) to MLflow, register it, promote it to @champion when it wins",
    "serve": "REST server of a registered model on 127.0.0.1",
    "batch": "score a file of rows (or every user) with a registered model",
    "expert": "expert library: register a LoRA adapter as an expert, assemble a served pool from registry URIs",
    "data": "moa data prepare OUT_DIR: the real tweet and BBC corpora as train/val/test files",
}
# Kept in step with moa.routers.ROUTERS and moa.experts.EXPERT_KINDS by tests/test_command.py (listed here so
# the help needs no torch import).
ROUTER_NAMES = ("lora", "topk", "static", "poly", "mhr", "flylora", "remix", "xcross")
EXPERT_KIND_NAMES = ("lora", "hyper")
# moa's own user errors (moa.experts.errors.UserError: raised for bad input) and missing paths; any other
# ValueError / TypeError is a fault and keeps its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("moa")
    except PackageNotFoundError:  # running from a source tree
        import moa

        return moa.__version__


def usage() -> str:
    width = max(map(len, {**LIGHTNING_COMMANDS, **OTHER_COMMANDS}))
    lines = ["usage: moa <command> [options]    (moa <command> --help: the command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in {**LIGHTNING_COMMANDS, **OTHER_COMMANDS}.items()]
    lines += [
        "",
        f"routers (model.init_args.router): {', '.join(ROUTER_NAMES)}",
        f"expert kinds (model.init_args.expert_kind): {', '.join(EXPERT_KIND_NAMES)}",
        "",
        "options: -h/--help, --version",
        "example: moa fit -c configs/topk.yaml --model.init_args.router poly",
        "MOA_DEBUG=1 shows the traceback of an error.",
    ]
    return "\n".join(lines)


def command_function(name: str) -> Callable[[list[str] | None], int | None]:
    """The function of command ``name``, importing only its own module (`moa serve` or `moa batch` never load
    Lightning); plain imports, so the layout test's import graph sees them."""
    if name in LIGHTNING_COMMANDS:
        from moa.pipelines.cli.lightning_cli import lightning_main as function
    elif name == "register":
        from moa.pipelines.tracking.registry import main as function
    elif name == "serve":
        from moa.pipelines.serving.serve_command import serve_main as function
    elif name == "batch":
        from moa.pipelines.serving.batch import batch_main as function
    elif name == "expert":
        from moa.pipelines.tracking.expert_library import main as function
    else:
        from moa.pipelines.data.corpora import prepare_main as function
    return function


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (jsonargparse and Lightning wrap the error a user needs to see)."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)  # `from None` ends it
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def user_error(error: BaseException) -> BaseException | None:
    """The error to show a user in one line, or None if this is not one (then the traceback is the message)."""
    from moa.experts.errors import UserError  # only when an error is shown: `moa --help` stays light

    for candidate in (root_cause(error), error):
        if isinstance(candidate, (UserError, *USER_ERRORS)):
            return candidate
    return None


def _message(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(args: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"moa {version()}")
        return 0
    command = argv[0]
    if command not in LIGHTNING_COMMANDS and command not in OTHER_COMMANDS:
        print(f"moa: error: unknown command {command!r}; choose from {', '.join([*LIGHTNING_COMMANDS, *OTHER_COMMANDS])}",
              file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "" not in sys.path and os.getcwd() not in sys.path:  # class paths of the user's own modules next to them,
        sys.path.insert(0, os.getcwd())                     # as `python -m` finds them
    try:
        if command in LIGHTNING_COMMANDS:  # None: Lightning reads sys.argv itself (and warns if given both)
            return command_function(command)(None if args is None else argv)
        return command_function(command)(argv[1:]) or 0
    except SystemExit as done:  # argparse / jsonargparse already printed their message
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    except Exception as error:  # noqa: BLE001 - user errors become one line, anything else keeps its traceback
        shown = user_error(error)
        if shown is None or os.environ.get("MOA_DEBUG", "") not in ("", "0"):
            raise
        print(f"moa {command}: error: {_message(shown)}  (MOA_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
