"""The layout of moa's packages: no import circle anywhere, each layer importing only the layers below it, and
inside ``moa.recsys`` the one windowing function, the one look-back mask and the cheap package namespace.

The import graph is read from the source with ``ast``: every import statement, also those inside functions (where
a circle hides); only ``if TYPE_CHECKING:`` blocks are skipped (they never run). An edge goes to the module an
import names (``from a import b``: ``a.b`` when that is a module, else ``a``), not to the packages above it.

Layers, lowest first (a module imports only its own layer and those before it)::

    moa.experts <- moa.routers <- moa (core) <- moa.recsys <- moa.pipelines
    inside moa.pipelines: data <- bundle.py <- kinds <- tracking <- serving <- cli <- examples

``tracking`` sits below ``serving``: serving loads the registered models that tracking logs. ``python
tests/test_layout.py`` prints the package-level import edges, the circles and the edges against the order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import torch

from moa.recsys.data import LeaveOneOut, training_windows
from moa.recsys.layers import look_back_mask

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("moa.experts", "moa.routers", "moa", "moa.recsys", "moa.pipelines")  # lowest first
PIPELINE_LAYERS = ("data", "bundle", "kinds", "tracking", "serving", "cli", "examples")  # lowest first


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """pyproject's ``package-dir``: package name -> folder."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    return {name: root / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def module_files(dirs: dict[str, Path]) -> dict[str, Path]:
    """Every module of the packages: dotted name -> file (a package's ``__init__.py`` is the package)."""
    files: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            files[".".join((package, *parts))] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str | tuple[str, str]]:
    """What a module's code imports, wherever the statement is (relative imports resolved): ``import a.b`` as
    ``"a.b"``, ``from a import b`` as ``("a", "a.b")``."""
    names: set[str | tuple[str, str]] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] if node.level else [])
            base = ".".join(p for p in (base, node.module or "") if p)
            names.update((base, f"{base}.{alias.name}") for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def module_graph(dirs: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """``module -> the project modules it imports``, for every module of the packages (see the module docstring)."""
    files = module_files(package_dirs() if dirs is None else dirs)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for name in _imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if isinstance(name, tuple):  # from a import b: the module a.b, else a
                name = name[1] if name[1] in files else name[0]
            if name in files:
                targets.add(name)
        graph[module] = targets - {module}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: every group of two or more modules that reach each other (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def walk(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                walk(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            walk(node)
    return sorted(groups)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def circles(graph: dict[str, set[str]]) -> list[str]:
    """One circle of each group of modules that import each other, as ``a -> b -> a``."""
    out = []
    for group in strongly_connected(graph):
        members = set(group)
        cycle = find_cycle({m: graph[m] & members for m in group})
        out.append(" -> ".join(cycle))
    return out


def layer_of(module: str) -> tuple[int, int]:
    """``(package layer, pipelines sub-layer)`` of a module, lowest 0 (the package ``moa.pipelines`` itself: top)."""
    package = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    if package != "moa.pipelines":
        return LAYERS.index(package), 0
    sub = module.split(".")[2] if module.count(".") >= 2 else PIPELINE_LAYERS[-1]
    return LAYERS.index(package), PIPELINE_LAYERS.index(sub)


def unit_of(module: str) -> str:
    """The package-level unit of the summary: ``moa.experts``, ``moa (core)``, ``moa.pipelines.kinds``, ..."""
    package = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    if package == "moa.pipelines" and module.count(".") >= 2:
        return f"moa.pipelines.{module.split('.')[2]}"
    return "moa (core)" if package == "moa" else package


def against_the_order(graph: dict[str, set[str]]) -> list[str]:
    """The edges where a module imports a higher layer (or pipelines sub-layer) than its own."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def summary(graph: dict[str, set[str]]) -> str:
    """The package-level import edges (with their module-edge counts), the circles and the edges against the order."""
    edges = Counter((unit_of(a), unit_of(b)) for a, targets in graph.items() for b in targets
                    if unit_of(a) != unit_of(b))
    lines = [f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges; package-level edges:"]
    lines += [f"  {a} -> {b} ({n})" for (a, b), n in sorted(edges.items())]
    found = circles(graph)
    lines.append(f"import circles: {len(found)}")
    lines += [f"  {c}" for c in found]
    wrong = against_the_order(graph)
    lines.append(f"edges against the layer order: {len(wrong)}")
    lines += [f"  {e}" for e in wrong]
    return "\n".join(lines)


def _toy(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, code in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    return module_graph({"pkg": tmp_path / "pkg"})


def test_the_graph_finds_a_lazy_import_circle_and_skips_type_checking(tmp_path):
    graph = _toy(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": "def f():\n    from . import a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\nelse:\n    import pkg.sub.d\n",
        "sub/__init__.py": "from ..a import f\n",
        "sub/d.py": "from .. import sub\nfrom pkg.b import f\nimport os\n",
    })
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.sub.d"},
                     "pkg.sub": {"pkg.a"}, "pkg.sub.d": {"pkg.sub", "pkg.b"}}
    assert circles(graph) == ["pkg.a -> pkg.b -> pkg.a"]
    graph["pkg.a"].add("pkg.c")  # a second path through the same group: still one circle per group
    assert strongly_connected(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub", "pkg.sub.d"]]


def test_the_layer_order_flags_an_import_of_a_higher_layer():
    graph = {"moa.experts.pool": {"moa.routers.base"}, "moa.routers.base": {"moa.experts.pool"},
             "moa.pipelines.kinds.text_bundle": {"moa.pipelines.bundle", "moa.pipelines.tracking.store"},
             "moa.pipelines.bundle": {"moa.pipelines.data.text"}, "moa.pipelines.tracking.store": set(),
             "moa.pipelines.data.text": {"moa", "moa.recsys.data"}, "moa": set(), "moa.recsys.data": set()}
    assert against_the_order(graph) == ["moa.experts.pool -> moa.routers.base",
                                        "moa.pipelines.kinds.text_bundle -> moa.pipelines.tracking.store"]


def test_no_import_circle_anywhere_and_every_layer_imports_only_those_below():
    graph = module_graph()
    assert {"moa", "moa.experts.kernels.cpp", "moa.routers", "moa.recsys.trainer", "moa.pipelines.bundle",
            "moa.pipelines.cli.command"} <= set(graph)
    assert "moa.pipelines.cli.lightning_cli" in graph["moa.pipelines.cli.command"]  # lazy imports are seen
    found, wrong = circles(graph), against_the_order(graph)
    assert not found and not wrong, summary(graph)


def test_recsys_roles_import_in_their_direction():
    graph = {m.removeprefix("moa.recsys."): {t.removeprefix("moa.recsys.") for t in targets if t.startswith("moa.recsys.")}
             for m, targets in module_graph().items() if m.startswith("moa.recsys.")}
    assert {"recommender", "encoders", "trainer", "persistence", "loading", "xcross"} <= set(graph)
    assert "models" not in graph
    # the roles' direction: the model delegates to its trainer and file format, which know no model class
    assert "recommender" not in graph["trainer"] | graph["persistence"] | graph["encoders"]
    assert "xcross" not in graph["recommender"] and "loading" not in graph["recommender"] | graph["xcross"]


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


if __name__ == "__main__":
    print(summary(module_graph()))
