"""Fixtures shared by the test modules."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

#: Set (to anything but "" or "0") to let the C++ kernel's tests skip where it does not build; unset, a failed
#: build fails them (CI and ``./run test`` must not go green with the kernel broken). ``MOA_NO_CPP=1`` (the kernel
#: turned off on purpose) skips them either way.
ALLOW_NO_CPP = "MOA_ALLOW_NO_CPP"


def require_cpp_kernel() -> None:
    """Skip a test of the C++ kernel when it is turned off (``MOA_NO_CPP=1``) or, under ``MOA_ALLOW_NO_CPP=1``,
    did not build; fail it when the build failed without that opt-out. Read here, in the tests, not in the library:
    users without a compiler still get the ``grouped`` fallback at run time."""
    from moa.experts.kernels import cpp

    if not cpp.ENABLED:
        pytest.skip("the C++ kernel is disabled (MOA_NO_CPP=1)")
    if cpp.available():
        return
    if os.environ.get(ALLOW_NO_CPP, "") not in ("", "0"):
        pytest.skip(f"the C++ kernel did not build ({ALLOW_NO_CPP} is set): {cpp.BUILD_ERROR}")
    pytest.fail(f"the C++ kernel did not build (set {ALLOW_NO_CPP}=1 to skip its tests where it cannot be built): "
                f"{cpp.BUILD_ERROR}", pytrace=False)


@pytest.fixture
def require_cpp():
    """:func:`require_cpp_kernel`, for test modules (they cannot import conftest under ``--import-mode=importlib``)."""
    return require_cpp_kernel


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU (OpenMP threads spin-waiting) they run
    many times slower on two; tests of tiny models use one thread and restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fit_config():
    """``fit_config(args)``: build a ``moa fit`` config's model, data and trainer through the real CLI parser
    (``args`` without the subcommand), fit on one thread, and check what every fit must do: an expert weight
    changed (LoRA pools, or HypeLoRA's shared hypernetwork), the frozen base did not, a finite loss was logged.
    Returns the CLI (``cli.model``, ``cli.trainer``) for further checks."""

    def run(args):
        from moa.pipelines.cli.lightning_cli import run_cli

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cli = run_cli(list(args), run=False)
            before = {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}
            frozen = {n: p.detach().clone() for n, p in cli.model.named_parameters() if not p.requires_grad}
            assert before and frozen
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            torch.set_num_threads(threads)
        after = dict(cli.model.named_parameters())
        changed = [n for n, value in before.items() if not torch.equal(value, after[n])]
        assert any(".pool." in n or ".shared." in n for n in changed), f"no expert weight changed; changed: {changed}"
        assert all(torch.equal(value, after[n]) for n, value in frozen.items())  # the base stays frozen
        assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])
        return cli

    return run


def moa_command() -> list[str]:
    """The installed ``moa`` console script (or its module, where the script is missing)."""
    script = Path(sys.executable).with_name("moa")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moa.pipelines.cli.command"]


def moa_environment(env=None) -> dict[str, str]:
    """This process's environment without ``MLFLOW_TRACKING_URI`` (each test's store is its working folder's), plus
    ``env``."""
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env or {})}


@pytest.fixture(scope="session")
def moa_cli():
    """``moa_cli(args, cwd, env=None, timeout=300)``: run ``moa`` as a subprocess (:func:`moa_command` in
    :func:`moa_environment`), assert it succeeded, return its output."""

    def run(args, cwd, env=None, timeout=300) -> str:
        done = subprocess.run([*moa_command(), *args], cwd=cwd, env=moa_environment(env), capture_output=True,
                              text=True, timeout=timeout)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"moa {' '.join(args)} failed:\n{output[-4000:]}"
        return output

    return run


@pytest.fixture(scope="session")
def moa_start():
    """``moa_start(args, cwd, **popen)``: start ``moa`` as :func:`moa_cli` runs it, without waiting for it."""
    return lambda args, cwd, **popen: subprocess.Popen([*moa_command(), *args], cwd=cwd, env=moa_environment(),
                                                       **popen)


def runs_of(db: Path, experiment: str):
    """``(client, runs)`` of ``experiment`` in the MLflow sqlite store ``db`` (no runs when it has no such experiment)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    return client, ([] if found is None else client.search_runs([found.experiment_id]))


@pytest.fixture(scope="session")
def mlflow_runs():
    """``mlflow_runs(db, experiment)``: :func:`runs_of`, for test modules (they cannot import conftest)."""
    return runs_of


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str):
    """A fresh module of ``bench/<name>.py``, registered under its own name (the scripts import their helpers,
    e.g. ``router_harness``, by name from bench/, and dataclasses resolve their annotations in ``sys.modules``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench_script():
    """``bench_script(name)``: :func:`load_bench_script`, for test modules (they cannot import conftest)."""
    return load_bench_script


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a plain folder (``moa.pretrained``: the installed GGUF, dequantised once
    into the user's cache; about 30 s the first time on this CPU, then a lookup)."""
    from moa.pretrained import resolve_pretrained

    return resolve_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """``(model, tokenizer)`` of the real SmolLM2, loaded as users load it (``from_pretrained``: eval mode). Shared
    by the session: tests that train copy it (``copy.deepcopy``) or attach adapters to a fresh load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)
