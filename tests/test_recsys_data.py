"""Recommendation data: atomic and Amazon loaders, item text, domains, leave-one-out, training-user fractions."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moa.recsys.data import (ML100K_DOMAINS, PAD, LeaveOneOut, assign_domain, item_text, left_pad, load_amazon,
                             load_atomic, ml100k, read_atomic)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def atomic_dir(tmp_path):
    """Five movies (ids deliberately not in file order), four users; movie 50 is never rated, user u4 rates 2."""
    d = tmp_path / "toy"
    d.mkdir()
    write(d / "toy.item",
          "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\tscore:float_seq\n"
          "10\tToy Story\t1995\tAnimation Children's Comedy\t1.5 2\n"
          "2\tHeat\t1995\tAction Crime Thriller\t\n"
          "7\tCasablanca\t1942\tDrama Romance War\t3\n"
          "30\tClerks\t1994\tComedy\t\n"
          "50\tUnrated\tV\tunknown\t\n")
    write(d / "toy.inter",
          "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
          "u1\t10\t5\t100\n"
          "u1\t2\t3\t50\n"
          "u1\t7\t4\t300\n"
          "u1\t30\t2\t200\n"
          "u2\t7\t1\t10\n"
          "u2\t2\t\t10\n"          # tie on time with the line above: file order is kept
          "u2\t30\t4\t20\n"
          "u3\t10\t5\t1\n"
          "u3\t30\t5\t2\n"
          "u3\t2\t5\t3\n"
          "u3\t99\t5\t4\n"          # item 99 is not in toy.item: dropped
          "u4\t10\t3\t5\n"
          "u4\t7\t3\t6\n")
    write(d / "toy.user", "user_id:token\tage:token\nu1\t24\nu2\t53\n")
    return d


MAPPING = {"kids": ("Children's", "Animation"), "comedy": ("Comedy",), "action": ("Action", "Thriller", "War")}


def test_read_atomic_parses_typed_headers(atomic_dir):
    items = read_atomic(atomic_dir / "toy.item")
    assert list(items.columns) == ["item_id", "movie_title", "release_year", "class", "score"]
    assert items["item_id"].tolist() == ["10", "2", "7", "30", "50"]
    assert items.loc[0, "movie_title"] == ("Toy", "Story")
    assert items.loc[0, "class"] == ("Animation", "Children's", "Comedy")
    assert items.loc[0, "score"] == (1.5, 2.0) and items.loc[1, "score"] == ()
    inter = read_atomic(atomic_dir / "toy.inter")
    assert inter["rating"].dtype == float and inter["timestamp"].tolist()[:2] == [100.0, 50.0]
    assert inter["rating"].isna().sum() == 1


def test_read_atomic_rejects_untyped_headers_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="'user_id'.*name:type"):
        read_atomic(write(tmp_path / "x.inter", "user_id\titem_id:token\n1\t2\n"))
    with pytest.raises(ValueError, match="'rating:int'"):
        read_atomic(write(tmp_path / "y.inter", "user_id:token\trating:int\n1\t2\n"))
    with pytest.raises(FileNotFoundError, match="nope.inter"):
        read_atomic(tmp_path / "nope.inter")


def test_load_atomic_builds_catalogue_text_domains_and_time_order(atomic_dir):
    ds = load_atomic(atomic_dir, domains=MAPPING, default_domain="other")
    # catalogue = rated items present in .item, indexed 1..n in numeric id order; padding 0 is not an item
    assert ds.items["item_id"].tolist() == ["2", "7", "10", "30"]
    assert ds.items.index.tolist() == [1, 2, 3, 4] and ds.n_items == 4 and ds.n_users == 4
    assert ds.texts[0] == "" and ds.texts[3] == "Toy Story (1995). Animation, Children's, Comedy."
    assert ds.texts[2] == "Casablanca (1942). Drama, Romance, War."
    # first domain in mapping order wins: Toy Story is kids (not comedy), Casablanca action (via War)
    assert ds.items["domain"].tolist() == ["action", "action", "kids", "comedy"]
    assert ds.domains == ("kids", "comedy", "action")
    assert ds.domain_ids.tolist() == [-1, 2, 2, 0, 1]
    # interactions: unknown item 99 dropped, sorted by time per user, ties in file order
    seq = {u: g["item"].tolist() for u, g in ds.interactions.groupby("user_id")}
    assert seq == {"u1": [1, 3, 4, 2], "u2": [2, 1, 4], "u3": [3, 4, 1], "u4": [3, 2]}
    assert len(ds.interactions) == 12
    assert ds.users.loc["u2", "age"] == "53" and ds.domain("kids").users is ds.users   # toy.user


def test_load_atomic_without_item_file_and_bad_fields(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    write(d / "bare.inter", "user_id:token\titem_id:token\ttimestamp:float\na\tx\t1\na\ty\t2\n")
    ds = load_atomic(d)
    assert ds.texts[1:] == ["x", "y"] and ds.domains == ("unknown",)
    write(d / "bare.inter", "user_id:token\titem_id:token\na\tx\n")
    with pytest.raises(ValueError, match="'timestamp'"):
        load_atomic(d)
    with pytest.raises(FileNotFoundError, match="other.inter"):
        load_atomic(d, "other")


def test_item_text_and_assign_domain():
    assert item_text("Heat", ["Action"], 1995) == "Heat (1995). Action."
    assert item_text("Land Before Time (1995)", [], "1995") == "Land Before Time (1995)"
    assert item_text("  A   B ", ["unknown"], "V") == "A B"
    assert assign_domain(["Comedy", "Animation"], MAPPING) == "kids"
    assert assign_domain(["Western"], MAPPING, default="other") == "other"
    assert assign_domain(["Toys & Games", "Puzzles"]) == "Toys & Games"
    assert assign_domain([], None, default="none") == "none"


def test_domain_restriction_reindexes_items(atomic_dir):
    ds = load_atomic(atomic_dir, domains=MAPPING, default_domain="other")
    action = ds.domain("action")
    assert action.name == "toy/action" and action.domains == ("action",)
    assert action.items["item_id"].tolist() == ["2", "7"] and action.items.index.tolist() == [1, 2]
    seq = {u: g["item"].tolist() for u, g in action.interactions.groupby("user_id")}
    assert seq == {"u1": [1, 2], "u2": [2, 1], "u3": [1], "u4": [2]}
    assert action.texts[1].startswith("Heat")
    with pytest.raises(KeyError, match="unknown domain 'drama'"):
        ds.domain("drama")


def test_leave_one_out_targets_histories_and_training_prefixes(atomic_dir):
    ds = load_atomic(atomic_dir, domains=MAPPING, default_domain="other")
    split = ds.leave_one_out()
    assert split.users == ("u1", "u2", "u3") and split.domain is None   # u4 has only 2 interactions
    assert split.valid.targets.tolist() == [4, 1, 4] and split.test.targets.tolist() == [2, 4, 1]
    assert [h.tolist() for h in split.valid.histories] == [[1, 3], [2], [3]]
    assert [h.tolist() for h in split.test.histories] == [[1, 3, 4], [2, 1], [3, 4]]   # includes the valid item
    assert [s.tolist() for s in split.train_sequences] == [[1, 3], [2], [3]]
    train = split.train   # every prefix of a training sequence -> its next item
    assert train.users == ("u1",) and [h.tolist() for h in train.histories] == [[1]] and train.targets.tolist() == [3]
    assert split.item_counts().tolist() == [0, 1, 1, 2, 0]
    assert split.valid.padded().tolist() == [[1, 3], [0, 2], [0, 3]]
    assert ds.domain("comedy").domains == ("comedy",)
    with pytest.raises(ValueError, match="min_interactions >= 3"):
        ds.leave_one_out(min_interactions=2)
    with pytest.raises(ValueError, match="no user has 5"):
        ds.leave_one_out(min_interactions=5)


def test_stage_batches_cover_every_example_once():
    seqs = tuple(torch.arange(1, n + 4) for n in range(7))
    split = LeaveOneOut(tuple(f"u{i}" for i in range(7)), seqs, n_items=10)
    rows = torch.cat([r for _, _, r in split.test.batches(3, shuffle=True, seed=1)])
    assert sorted(rows.tolist()) == list(range(7))
    histories, targets, rows = next(iter(split.test.batches(2, max_len=3)))
    assert histories.tolist() == [[0, 1, 2], [1, 2, 3]] and targets.tolist() == [3, 4]


def test_train_fraction_is_seeded_and_nested():
    seqs = tuple(torch.tensor([1, 2, 3, 4]) for _ in range(20))
    split = LeaveOneOut(tuple(f"u{i}" for i in range(20)), seqs, n_items=4)
    half, quarter = split.with_train_fraction(0.5, seed=3), split.with_train_fraction(0.25, seed=3)
    assert len(half.train_user_positions) == 10 and len(quarter.train_user_positions) == 5
    assert set(quarter.train_user_positions) <= set(half.train_user_positions)
    assert half.train_user_positions == split.with_train_fraction(0.5, seed=3).train_user_positions
    assert half.train_user_positions != split.with_train_fraction(0.5, seed=4).train_user_positions
    assert len(half.train) == 10 and len(half.train_sequences) == 10 and half.item_counts().tolist() == [0, 10, 10, 0, 0]
    assert len(half.valid) == len(half.test) == 20   # evaluation keeps every user
    with pytest.raises(ValueError, match="fraction"):
        split.with_train_fraction(0.0)


def test_left_pad():
    out = left_pad([torch.tensor([1, 2, 3]), [4], []], max_len=2)
    assert out.tolist() == [[2, 3], [0, 4], [0, 0]] and out.dtype == torch.long
    assert left_pad([[5]]).tolist() == [[5]] and left_pad([[]]).tolist() == [[PAD]]


def amazon_fixture(tmp_path):
    reviews = [  # 2018 field names
        {"reviewerID": "A", "asin": "p1", "unixReviewTime": 30, "overall": 5.0},
        {"reviewerID": "A", "asin": "p2", "unixReviewTime": 10, "overall": 4.0},
        {"reviewerID": "A", "asin": "p1", "unixReviewTime": 5, "overall": 1.0},   # repeat: earliest kept
        {"reviewerID": "A", "asin": "p3", "unixReviewTime": 20, "overall": 3.0},
        {"reviewerID": "B", "asin": "p3", "unixReviewTime": 1, "overall": 2.0},
        {"reviewerID": "B", "asin": "nometa", "unixReviewTime": 2, "overall": 2.0},
        {"reviewerID": "B", "asin": "notitle", "unixReviewTime": 3, "overall": 2.0},
    ]
    r = write(tmp_path / "reviews.json", "\n".join(json.dumps(x) for x in reviews) + "\n")
    meta = [
        json.dumps({"asin": "p1", "title": "Lego  Castle", "category": ["Toys & Games", "Building Toys"]}),
        json.dumps({"asin": "p2", "title": "Hammer", "category": ["Tools & Home Improvement", "Hand Tools"]}),
        # 2014 metadata: Python literal with a list of category paths
        str({"asin": "p3", "title": "Puzzle", "categories": [["Toys & Games", "Puzzles"], ["Other"]]}),
        json.dumps({"asin": "notitle", "category": ["Toys & Games"]}),
    ]
    m = write(tmp_path / "meta.json", "\n".join(meta) + "\n")
    return r, m


def test_load_amazon_reviews_and_metadata(tmp_path):
    reviews, meta = amazon_fixture(tmp_path)
    ds = load_amazon(reviews, meta)
    assert ds.items["item_id"].tolist() == ["p1", "p2", "p3"]
    assert ds.texts[1:] == ["Lego Castle. Toys & Games, Building Toys.", "Hammer. Tools & Home Improvement, Hand Tools.",
                            "Puzzle. Toys & Games, Puzzles."]
    assert ds.items["domain"].tolist() == ["Toys & Games", "Tools & Home Improvement", "Toys & Games"]
    seq = {u: g["item"].tolist() for u, g in ds.interactions.groupby("user_id")}
    assert seq == {"A": [1, 2, 3], "B": [3]}   # p1 at its first time (5), items without metadata/title dropped
    assert ds.interactions.loc[0, "rating"] == 1.0
    toys = ds.domain("Toys & Games")
    assert toys.n_items == 2 and toys.interactions["item"].tolist() == [1, 2, 2]


def test_load_amazon_2023_gzip_and_explicit_domain(tmp_path):
    reviews = [{"user_id": "U", "asin": "c1", "parent_asin": "P1", "timestamp": 1700000000000, "rating": 5.0},
               {"user_id": "U", "asin": "c2", "parent_asin": "P2", "timestamp": 1600000000000, "rating": 4.0},
               {"user_id": "U", "asin": "c3", "parent_asin": "P3", "timestamp": 1650000000000, "rating": 3.0}]
    r = tmp_path / "Toys.jsonl.gz"
    with gzip.open(r, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(x) for x in reviews))
    meta = [{"parent_asin": f"P{i}", "title": f"Toy {i}", "main_category": "Toys & Games",
             "categories": ["Toys & Games", "Dolls"]} for i in (1, 2, 3)]
    m = write(tmp_path / "meta_Toys.jsonl", "\n".join(json.dumps(x) for x in meta))
    ds = load_amazon([r], [m], domain="toys")
    assert ds.name == "amazon-toys" and ds.domains == ("toys",)
    assert ds.texts[1] == "Toy 1. Toys & Games, Dolls."
    split = ds.leave_one_out()
    assert split.domain == "toys" and split.test.targets.tolist() == [1] and split.valid.targets.tolist() == [3]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_amazon(tmp_path / "missing.json", m)
    bad = write(tmp_path / "bad.json", "{not json\n")
    with pytest.raises(ValueError, match="bad.json:1"):
        load_amazon(bad, m)


def test_ml100k_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ml-100k.inter"):
        ml100k(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("recbole") is None, reason="recbole wheel (MovieLens-100K) not installed")
def test_ml100k_from_the_recbole_wheel():
    ds = ml100k()
    assert (ds.n_users, ds.n_items, len(ds.interactions), len(ds.users)) == (943, 1682, 100_000, 943)
    assert ds.items["item_id"].astype(int).tolist() == list(range(1, 1683))   # item index == MovieLens id
    assert ds.texts[1] == "Toy Story (1995). Animation, Children's, Comedy."
    assert ds.domains == tuple(ML100K_DOMAINS)
    counts = ds.items["domain"].value_counts().to_dict()
    assert counts == {"children": 131, "comedy": 460, "action": 557, "drama": 534}
    split = ds.domain("children").leave_one_out()
    assert split.domain == "children" and split.n_items == 131 and split.n_users == 564
