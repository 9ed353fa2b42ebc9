"""The layout of ``moa.recsys``: its modules import each other without a circle, the one windowing function and the
one look-back mask, and the cheap package namespace.

The import graph is read from the source with ``ast`` (every import statement, also those inside functions, which
is where a circle hides; only ``if TYPE_CHECKING:`` blocks are skipped, they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moa.recsys.data import LeaveOneOut, training_windows
from moa.recsys.layers import look_back_mask

RECSYS = Path(__file__).resolve().parents[1] / "recsys"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The ``moa.recsys`` modules (by short name) that a module's code imports, wherever the import statement is."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import ... / from . import x
                base = node.module.split(".")[0] if node.module else None
                names = [base] if base else [a.name for a in node.names]
            elif node.level == 0 and (node.module or "").startswith("moa.recsys"):
                rest = node.module.split(".")[2:]
                names = rest[:1] if rest else [a.name for a in node.names]
            else:
                names = []
            found.update(n for n in names if n in modules)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["moa", "recsys"] and len(parts) > 2 and parts[2] in modules:
                    found.add(parts[2])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def recsys_import_graph(folder: Path = RECSYS) -> dict[str, set[str]]:
    """``module -> the recsys modules it imports`` for every module of the package (``__init__`` excluded: it only
    names the others lazily)."""
    files = {p.stem: p for p in folder.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_lazy_import_circle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    graph = recsys_import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert find_cycle(graph) == ["a", "b", "a"]


def test_recsys_modules_import_each_other_without_a_circle():
    graph = recsys_import_graph()
    assert {"recommender", "encoders", "trainer", "persistence", "loading", "xcross"} <= set(graph)
    assert "models" not in graph
    assert find_cycle(graph) is None, f"import circle in moa.recsys: {' -> '.join(find_cycle(graph))}"
    # the roles' direction: the model delegates to its trainer and file format, which know no model class
    assert "recommender" not in graph["trainer"] | graph["persistence"] | graph["encoders"]
    assert "xcross" not in graph["recommender"] and "loading" not in graph["recommender"] | graph["xcross"]


def test_recsys_does_not_import_the_pipelines():
    for path in RECSYS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("moa.pipelines") for n in names), f"{path.name} imports {names}"


# ---------------------------------------------------------------------------------------------------------------
# one windowing function


def test_training_windows_cut_each_sequence_from_its_end():
    # max_len 3: windows of 4 items, ending at len, len - 3, ...; consecutive windows share one item
    x, y = training_windows([[1, 2, 3, 4, 5, 6, 7], [8, 9], [10], []], max_len=3)
    assert torch.equal(x, torch.tensor([[4, 5, 6], [1, 2, 3], [0, 0, 8]]))
    assert torch.equal(y, torch.tensor([[5, 6, 7], [2, 3, 4], [0, 0, 9]]))
    assert x.dtype == y.dtype == torch.long
    # the short tail window of a longer sequence is left-padded
    x, y = training_windows([[1, 2, 3, 4, 5]], max_len=3)
    assert torch.equal(x, torch.tensor([[2, 3, 4], [0, 0, 1]]))
    assert torch.equal(y, torch.tensor([[3, 4, 5], [0, 0, 2]]))
    # the width is the longest input when that is shorter than max_len
    x, y = training_windows([torch.tensor([1, 2, 3])], max_len=5)
    assert torch.equal(x, torch.tensor([[1, 2]])) and torch.equal(y, torch.tensor([[2, 3]]))
    # no transition at all: two empty [0, max_len] tensors
    x, y = training_windows([[1], []], max_len=4)
    assert x.shape == y.shape == (0, 4) and x.dtype == y.dtype == torch.long


def test_every_trainer_cuts_its_windows_with_the_one_function():
    import moa.pipelines.kinds.recommender.module as recommendation
    import moa.recsys.trainer as trainer
    from moa.recsys.baselines import SASRec

    assert recommendation.training_windows is training_windows and trainer.training_windows is training_windows
    seqs = tuple(torch.arange(1, n + 1) for n in (9, 4, 3, 12))  # training parts: 7, 2, 1 and 10 items
    split = LeaveOneOut(("a", "b", "c", "d"), seqs, 12, "x")
    x, y = SASRec(12, hidden=8, n_layers=1, n_heads=1, inner=8, max_len=3)._windows(split)
    expected = training_windows(split.train_sequences, 3)
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


# ---------------------------------------------------------------------------------------------------------------
# one look-back mask


def test_look_back_mask_attends_to_real_items_at_or_before_each_position():
    real = torch.tensor([[False, True, True], [True, True, True]])
    mask = look_back_mask(real)
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool))
    assert torch.equal(mask[1, 0], torch.ones(3, 3, dtype=torch.bool).tril())


def test_both_user_encoders_are_the_one_sequence_encoder_with_the_one_mask(monkeypatch):
    import moa.recsys.baselines as baselines
    import moa.recsys.encoders as encoders
    import moa.recsys.layers as layers

    assert issubclass(baselines.SASRec, layers.SequenceEncoder) and issubclass(encoders.UserEncoder, layers.SequenceEncoder)
    calls = []

    def spy(real):
        calls.append(real.clone())
        return look_back_mask(real)

    monkeypatch.setattr(layers, "look_back_mask", spy)
    histories = torch.tensor([[0, 2, 3]])
    baselines.SASRec(5, hidden=8, n_layers=1, n_heads=1, inner=8, max_len=4).eval()(histories)
    user_encoder = encoders.UserEncoder(6, hidden=8, n_layers=1, heads=1, inner=8, max_len=4).eval()
    user_encoder(torch.zeros(1, 3, 8), histories != 0)
    assert len(calls) == 2 and all(torch.equal(c, histories != 0) for c in calls)


def test_sasrec_and_the_text_recommender_train_in_the_one_loop(monkeypatch):
    import moa.recsys.baselines as baselines
    import moa.recsys.trainer as trainer
    from transformers import BertConfig, BertModel

    from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender

    loops = []

    def spy(model, *args, **kwargs):
        loops.append(type(model).__name__)
        return real_train(model, *args, **kwargs)

    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", spy)
    monkeypatch.setattr(baselines, "train", spy)
    seqs = tuple(torch.arange(1, 7) % 5 + 1 for _ in range(4))
    split = LeaveOneOut(("a", "b", "c", "d"), seqs, 5, "x")
    baselines.SASRec(5, hidden=8, n_layers=1, n_heads=1, inner=8, max_len=4).fit(split, epochs=1)
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                intermediate_size=8, max_position_embeddings=16))
    config = RecommenderConfig(adapted_layers=0, hidden=8, user_layers=1, heads=1, inner=8, max_len=4)
    model = TextSeqRecommender.build(["x"], config=config, backbone=bert, experts=False)
    model.add_catalogue("x", torch.randint(1, 30, (6, 3)), torch.ones(6, 3, dtype=torch.long))
    model.fit(split, epochs=1, train_encoder=False)
    assert loops == ["SASRec", "TextSeqRecommender"]


# ---------------------------------------------------------------------------------------------------------------
# the package namespace


def test_import_moa_recsys_is_cheap_and_every_public_name_resolves():
    code = (
        "import sys, moa.recsys as r\n"
        "assert 'torch' not in sys.modules and 'pandas' not in sys.modules, 'import moa.recsys loaded torch/pandas'\n"
        "from moa.recsys.evaluate import evaluate\n"  # the harness, under its module's name
        "assert callable(evaluate) and 'evaluate' not in r.__all__\n"
        "missing = [n for n in r.__all__ if getattr(r, n, None) is None]\n"
        "assert not missing, missing\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_unknown_names_are_attribute_errors():
    import moa.recsys

    with pytest.raises(AttributeError, match="no attribute 'models'"):
        moa.recsys.models  # noqa: B018
