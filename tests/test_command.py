"""The ``moa`` command as users run it (a subprocess): help, version, and one clear line for user errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMALL = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.n_train", "64", "--data.init_args.n_val", "32", "--data.init_args.n_test", "32",
         "--trainer.logger", "false"]


def moa(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("moa")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "moa.pipelines.cli.command"]
    environment = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MOA_DEBUG")}
    environment.update(env or {})
    return subprocess.run([*command, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_help_lists_every_command_and_router_without_importing_torch(tmp_path):
    from moa.experts.pool import EXPERT_KINDS
    import moa.pipelines.cli.command as command
    from moa.routers import ROUTERS

    # the names the help lists are the registered ones, less the training-free routers (arrow, uniform: they
    # compose trained experts, `moa expert pool --router`, and have no fit config)
    trained = set(ROUTERS) - {"arrow", "uniform"}
    assert set(command.ROUTER_NAMES) == trained
    assert set(command.EXPERT_KIND_NAMES) == set(EXPERT_KINDS)
    # the help is fast because it loads neither torch nor Lightning
    probe = ("import sys; from moa.pipelines.cli.command import main; main(['--help']); "
             "assert not {'torch', 'lightning', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("fit", "validate", "test", "predict", "register", "serve", "batch", *trained, "MOA_DEBUG"):
        assert name in done.stdout
    assert moa(cwd=tmp_path).stdout == done.stdout  # no arguments: the same help


def test_version(tmp_path):
    from importlib.metadata import version

    done = moa("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"moa {version('moa')}"


def assert_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (["frobnicate"], ["unknown command 'frobnicate'", "fit"]),
        (["fit", "-c", "configs/topk.yaml", "--model.init_args.router", "nope"], ["unknown router 'nope'", "poly"]),
        (["fit", "-c", "configs/topk.yaml", "--trainer.no_such_option", "1"], ["no_such_option"]),
        (["fit", "-c", "missing.yaml"], ["missing.yaml"]),
        (["validate", "-c", "configs/topk.yaml", "--ckpt_path", "nowhere/last.ckpt"], ["nowhere/last.ckpt"]),
        (["fit", "-c", "configs/static.yaml", "--data.init_args.n_tasks", "8", "--trainer.max_steps", "1"],
         ["router 'static' on task_ids: n_experts=4 but the data has 8 tasks"]),  # found before the model loads
    ],
    ids=["command", "router", "option", "config", "checkpoint", "task-id"],
)
def test_user_errors_print_one_line_without_traceback(args, expected, tmp_path):
    (tmp_path / "configs").symlink_to(CONFIGS)
    extra = SMALL if args[0] in ("fit", "validate") and "missing.yaml" not in args else []
    done = moa(*args, *extra, cwd=tmp_path)
    assert_one_line_error(done, *expected)
    assert not (tmp_path / "mlflow.db").exists()


def write_typo(folder: Path, typo: str, key: str) -> str:
    """configs/topk.yaml with the option ``typo`` (e.g. ``n_experts:``) misspelt as the last part of ``key``."""
    text = (CONFIGS / "topk.yaml").read_text()
    assert text.count(f" {typo}") == 1
    (folder / "typo.yaml").write_text(text.replace(f" {typo}", f" {key.rsplit('.', 1)[-1]}:"))
    return "typo.yaml"


@pytest.mark.slow
def test_a_typo_in_a_config_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys):
    """Not jsonargparse's usage (about 60 lines) before its message: stderr is the one line naming the bad key."""
    done = moa("fit", "-c", write_typo(tmp_path, "n_experts:", "n_expert"), cwd=tmp_path)  # the real command
    assert_one_line_error(done, "'n_expert'", "MoAClassifier", "moa fit --help")
    assert len(done.stderr.strip().splitlines()) == 1 and "Given value" not in done.stderr, done.stderr
    from moa.pipelines.cli.command import main  # the same main, in-process: a trainer and a data option

    monkeypatch.chdir(tmp_path)
    for typo, key in (("max_epochs:", "trainer.max_epoch"), ("batch_size:", "batch_siz")):
        assert main(["fit", "-c", write_typo(tmp_path, typo, key)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"'{key}'" in error[0] and error[0].startswith("moa fit: error: "), error
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_moa_debug_shows_the_traceback(tmp_path):
    done = moa("fit", "-c", str(CONFIGS / "topk.yaml"), "--model.init_args.router", "nope", *SMALL, cwd=tmp_path,
               env={"MOA_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "unknown router 'nope'" in done.stderr


@pytest.mark.slow
def test_a_users_own_data_module_next_to_them_plugs_in_by_class_path(tmp_path):
    """``mydata.py`` in the working directory, named by class path: the real console script imports it."""
    (tmp_path / "mydata.py").write_text(
        "from moa.pipelines.data.tokens import MultiTaskTokens\n\n\n"
        "class FewTokens(MultiTaskTokens):\n"
        "    \"\"\"A user's module: the seeded tokens, fewer of them.\n\n"
        "    Args:\n        rows: training rows.\n    \"\"\"\n\n"
        "    def __init__(self, rows: int = 32):\n"
        "        super().__init__(n_train=rows, n_val=16, n_test=16, batch_size=16)\n"
    )
    done = moa("fit", "-c", str(CONFIGS / "topk.yaml"), "--data.class_path", "mydata.FewTokens",
               "--data.init_args.rows", "48", "--trainer.max_steps", "2", "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in done.stdout + done.stderr


@pytest.mark.slow
def test_a_value_error_that_is_not_a_user_error_keeps_its_traceback(tmp_path):
    """A plain ``ValueError`` (here from a user's buggy data module, as a bug in moa would raise it) is a fault, not
    bad input: the real console script shows its traceback; moa's own ``UserError`` stays one line (above)."""
    (tmp_path / "buggy.py").write_text(
        "from moa.pipelines.data.tokens import MultiTaskTokens\n\n\n"
        "class Buggy(MultiTaskTokens):\n"
        "    def setup(self, stage=None):\n"
        "        raise ValueError('a bug deep inside setup')\n"
    )
    done = moa("fit", "-c", str(CONFIGS / "topk.yaml"), "--data.class_path", "buggy.Buggy", *SMALL[:4],
               "--trainer.logger", "false", cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "a bug deep inside setup" in done.stderr and "in setup" in done.stderr


def test_only_user_errors_and_missing_paths_are_shown_as_one_line():
    from moa.experts.errors import UserError, UserTypeError
    from moa.pipelines.cli.command import user_error

    for shown in (UserError("bad value"), UserTypeError("bad type"), FileNotFoundError("no such file")):
        assert user_error(shown) is shown
    for fault in (ValueError("bug"), TypeError("bug"), KeyError("bug"), RuntimeError("bug")):
        assert user_error(fault) is None
    try:  # a user error wrapped by a framework (jsonargparse, Lightning) is found at the root of the chain
        try:
            raise UserError("unknown router 'nope'")
        except UserError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert str(user_error(outer)) == "unknown router 'nope'"
