"""bench/recsys_quality.py resumes: every finished run is in ``--out`` at once, a rerun reads them back and trains
nothing, a file written with other settings is refused by name, ``--report`` tables a partial run."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("recbole") is None, reason="ml-100k (recbole wheel) missing")


def test_a_rerun_reads_finished_runs_back_and_other_settings_are_refused(tmp_path, monkeypatch, capsys, bench_script):
    bench = bench_script("recsys_quality")
    out = tmp_path / "q.json"
    args = ["--quick", "--epochs", "1", "--models", "popularity", "SASRec", "--cold", "0", "--jobs", "1",
            "--out", str(out)]
    out.write_text(json.dumps({"command": "older", "records": [{"model": "SASRec"}]}))  # the format before resume
    bench.main(args)
    assert "holds no settings (an older format)" in capsys.readouterr().out
    first = json.loads(out.read_text())
    assert sorted(first["run_seconds"]) == ["SASRec|children|0|warm", "popularity|children|0|warm"]
    assert {r["job"] for r in first["records"]} == set(first["run_seconds"])
    table = out.with_suffix(".txt").read_text()

    monkeypatch.setattr(bench, "run_job", lambda job: pytest.fail(f"ran {job[:3]} again"))
    bench.main(args)  # nothing left to run: the same records and table
    assert "0 runs to do (2 read back" in capsys.readouterr().out
    assert json.loads(out.read_text())["records"] == first["records"]
    assert out.with_suffix(".txt").read_text().splitlines()[2:] == table.splitlines()[2:]

    with pytest.raises(SystemExit, match=r"written with other settings \(lr\)"):
        bench.main([*args, "--lr", "1e-2"])
    assert json.loads(out.read_text())["records"] == first["records"]  # untouched

    out.with_suffix(".txt").unlink()
    bench.main([*args[:-2], "--models", "popularity", "SASRec", "ID+text (frozen)", "--out", str(out), "--report"])
    lines = out.with_suffix(".txt").read_text().splitlines()
    assert "2 of 3 runs finished" in lines[1] and "--report" not in lines[0]
    assert lines[3].split()[:5] == ["setting", "catalogue", "model", "users", "seeds"]
    rows = [row.split()[:5] for row in lines[5:] if row.strip()]
    users = str(first["records"][0]["users"])
    assert rows == [["warm", "children", "popularity", users, "1"], ["warm", "children", "SASRec", users, "1"]]


def test_the_table_counts_each_rows_seeds_and_averages_them(bench_script):
    """A partial run's table: a row averages the seeds it has and says how many (SASRec 2, popularity 1)."""
    bench = bench_script("recsys_quality")
    values = {("SASRec", 0): 0.20, ("SASRec", 1): 0.30, ("popularity", 0): 0.10}
    records = [{"setting": "warm", "catalogue": "comedy", "model": model, "users": 50, "protocol": protocol,
                "metric": metric, "value": value}
               for (model, _seed), value in values.items()
               for protocol, metric in [*((p, m) for p in ("masked", "unmasked") for m in bench.METRICS),
                                        ("unmasked", bench.SEEN)]]
    rows = [line.split() for line in bench.table(records, ["comedy"])[2:]]
    assert [row[:5] for row in rows] == [["warm", "comedy", "popularity", "50", "1"],
                                         ["warm", "comedy", "SASRec", "50", "2"]]
    assert rows[1][5:8] == ["0.2500", "+-", "0.0707"]  # mean and sd of 0.20 and 0.30
