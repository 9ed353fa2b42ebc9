"""Fixtures shared by the test modules."""

import pytest
import torch


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
        from moa.pipelines.cli import run_cli

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
