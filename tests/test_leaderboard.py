"""Leaderboard statistics against hand computations, resume without redo, and failed runs kept."""

import json
import math

import pytest
from scipy import stats

from recbole_layersel import leaderboard
from recbole_layersel.leaderboard import mean_ci95, paired_p_value, run_entry, summarise, to_csv, to_markdown
from tests.conftest import write_atomic_dataset


def test_mean_and_95_percent_interval():
    mean, half_width = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half_width == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) * sd(=1) / sqrt(3)
    assert mean_ci95([0.5]) == (0.5, 0.0)


def test_paired_t_test():
    values = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    reference = {1: 1.1, 2: 2.3, 3: 3.2, 4: 4.6, 5: 9.0}  # seed 5 has no partner and is ignored
    differences = [-0.1, -0.3, -0.2, -0.6]
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    t = mean / (sd / 2)
    assert paired_p_value(values, reference) == pytest.approx(2 * stats.t.sf(abs(t), 3))
    assert paired_p_value({1: 1.0}, {1: 2.0}) is None
    assert paired_p_value({1: 1.0, 2: 2.0}, {1: 0.5, 2: 1.5}) is None  # identical differences


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    write_atomic_dataset(tmp_path / "data", "tiny")
    monkeypatch.setitem(leaderboard.ENTRIES, "BPR-tiny", ("BPR", {"embedding_size": 4}))
    return {"data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "epochs": 1,
            "show_progress": False, "topk": [5, 10], "metrics": ["NDCG", "MRR", "Precision", "Recall", "Hit"]}


def test_finished_runs_are_not_redone(tiny, tmp_path, monkeypatch):
    out = tmp_path / "results"
    first = run_entry("BPR-tiny", "tiny", 1, out, tiny)
    assert first["status"] == "ok", first.get("traceback")
    assert set(first["test"]) >= {"ndcg@10", "hit@10"} and first["parameters"] > 0
    path = out / "runs" / "tiny" / "BPR-tiny" / "seed1.json"
    assert json.loads(path.read_text()) == first

    def no_new_process(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(leaderboard.multiprocessing, "get_context", no_new_process)
    assert run_entry("BPR-tiny", "tiny", 1, out, tiny) == first


def test_a_failing_entry_is_reported_as_failed(tiny, tmp_path):
    out = tmp_path / "results"
    ok = run_entry("BPR-tiny", "tiny", 1, out, tiny)
    failed = run_entry("BPR-tiny", "missing-dataset", 1, out, tiny)
    assert failed["status"] == "failed" and "dataset 'missing-dataset' not found" in failed["error"]
    failed["entry"] = "broken"
    table = summarise([ok, failed], ["BPR-tiny", "broken"])
    assert [row["entry"] for row in table] == ["BPR-tiny", "broken"]
    assert table[1]["seeds"] == 0 and table[1]["failed"] == 1
    markdown = to_markdown(table, "tiny")
    assert "| broken | failed (1): LayerSelError: dataset 'missing-dataset' not found" in markdown
    assert "broken,0,1," in to_csv(table)
