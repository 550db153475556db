"""Leaderboard statistics against hand computations, resume without redo, and failed runs kept."""

import json
import math
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from scipy import stats

from recbole_layersel import leaderboard
from recbole_layersel.errors import LayerSelError
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
    assert set(first["valid"]) >= {"ndcg@10", "hit@10"}  # the best epoch's, which early stopping chose
    assert (first["epochs_run"], first["best_epoch"], first["stopped_by"]) == (1, 0, "epoch cap")
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


@pytest.mark.parametrize("name, expected", [
    ("BPR", ("BPR", {}, None)),
    ("LayerSelLLM-random", ("LayerSelLLM", {"layer_strategy": "random"}, None)),
    ("LayerSelLLM-importance-k4",  # exactly k: no saturation stop
     ("LayerSelLLM", {"layer_strategy": "importance", "num_layers": 4, "selection_patience": None}, None)),
    ("LayerSelLLM-random-k4", ("LayerSelLLM", {"layer_strategy": "random", "num_layers": 4}, None)),
    ("LayerSelLLM-importance-int8",
     ("LayerSelLLM", {"layer_strategy": "importance", "quantize": "int8"}, None)),
    ("LayerSelLLM-importance@amazon-electronics",
     ("LayerSelLLM", {"layer_strategy": "importance"}, "amazon-electronics")),
    ("LayerSelLLM-first-k2-s25", ("LayerSelLLM", {"layer_strategy": "first", "num_layers": 2,
                                                  "window_stride": 25}, None)),
    ("SASRec-allpos-s10", ("SASRecAllPositions", {"window_stride": 10}, None)),
])
def test_entry_names_say_what_runs(name, expected):
    assert leaderboard.entry_settings(name) == expected


def test_set_items_go_to_every_entry_or_the_one_named():
    extra = leaderboard.entry_extras(["epochs=20", "SASRec.stopping_step=3", "title_field=\"title\""],
                                     ["BPR", "SASRec"])
    assert extra == {"BPR": {"epochs": 20, "title_field": "title"},
                     "SASRec": {"epochs": 20, "stopping_step": 3, "title_field": "title"}}


@pytest.mark.parametrize("item, message", [
    ("epochs", r"--set 'epochs': write KEY=VALUE"),
    ("SASRec.=3", r"--set 'SASRec.=3': write KEY=VALUE"),
    ("seed=7", r"--set 'seed=7': the leaderboard sets seed for each run; choose seeds with --seeds"),
    ("GRU4Rec.epochs=3", r"names entry 'GRU4Rec', which is not among --entries"),
])
def test_bad_set_items_are_refused_before_anything_runs(item, message, tmp_path, capsys):
    with pytest.raises(LayerSelError, match=message):
        leaderboard.entry_extras([item], ["BPR", "SASRec"])
    args = ["--dataset", "tiny", "--entries", "BPR", "--out", str(tmp_path), "--set", item]
    assert leaderboard.main(args) == 2
    assert "error: --set" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["LayerSelLLM-best", "GRU", "LayerSelLLM-importance-kx", "SASRec-allpos-s"])
def test_unknown_entries_are_named_before_anything_runs(name, tmp_path, capsys):
    assert leaderboard.main(["--dataset", "tiny", "--entries", name, "--out", str(tmp_path)]) == 2
    assert f"unknown entry {name!r}" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_cross_domain_entries_reuse_the_source_selection_of_the_same_seed(tmp_path, monkeypatch):
    calls = []

    def fake_child(model, dataset, config_dict):
        calls.append((dataset, config_dict))
        if config_dict.get("hooks_only"):
            return {"status": "ok", "selected_layers": [3, 7]}
        return {"status": "ok", "test": {}, "selected_layers": config_dict["selected_layers"]}

    monkeypatch.setattr(leaderboard, "_in_child", fake_child)
    record = run_entry("LayerSelLLM-importance@source", "target", 5, tmp_path, {"epochs": 1})
    assert [dataset for dataset, _ in calls] == ["source", "target"]
    assert calls[0][1] == {"epochs": 1, "layer_strategy": "importance", "hooks_only": True,
                           "distill_steps": 0, "seed": 5}
    assert calls[1][1]["selected_layers"] == [3, 7] and record["selected_layers"] == [3, 7]
    assert (tmp_path / "runs" / "source" / "selection" / "seed5.json").is_file()
    run_entry("LayerSelLLM-importance-k2@source", "target", 5, tmp_path, {"epochs": 1})  # selection reused
    assert [dataset for dataset, _ in calls] == ["source", "target", "target"]


def test_charts_are_written_and_the_frontier_needs_two_sizes(tmp_path, monkeypatch):
    def record(entry, seed, layers, ndcg):
        test = dict.fromkeys(leaderboard.METRICS, ndcg)
        return {"entry": entry, "seed": seed, "status": "ok", "test": test, "train_seconds": 1.0,
                "inference_users_per_second": 10.0 * len(layers), "parameters": 5, "selected_layers": layers}

    records = [record("LayerSelLLM-importance", s, [0, 1], 0.1 + s / 100) for s in (1, 2)]
    assert not leaderboard.plot_frontier(records, "tiny", None, tmp_path / "frontier.png")
    text_only = record("LayerSelLLM-text", 1, [], 0.05)  # k = 0 is a point of the frontier
    assert leaderboard.plot_frontier([*records, text_only], "tiny", None, tmp_path / "frontier.png")
    records += [record("LayerSelLLM-full", s, [0, 1, 2, 3], 0.2) for s in (1, 2)]
    bench = [{"k": 2, "speedup": 1.9, "ideal": 2.0}, {"k": 4, "speedup": 1.0, "ideal": 1.0}]
    assert leaderboard.plot_frontier(records, "tiny", bench, tmp_path / "frontier.png")
    figures = []
    monkeypatch.setattr(leaderboard, "save_figure", lambda figure, path: figures.append(figure))
    bench_with_training = [{**row, "train_speedup": row["speedup"] * 0.9} for row in bench]
    for rows in (bench, bench_with_training):
        leaderboard.plot_frontier(records, "tiny", rows, tmp_path / "frontier.png")
    speedups = [[line.get_label() for line in figure.axes[1].get_lines()] for figure in figures]
    assert "measured training-step speed-up" not in speedups[0]
    assert "measured training-step speed-up" in speedups[1]
    # one legend for both axes, outside them, where it hides no point
    assert [len(figure.legends) for figure in figures] == [1, 1]
    assert not any(axes.get_legend() for figure in figures for axes in figure.axes)
    assert figures[1].legends[0].get_texts()[0].get_text().startswith("NDCG@10")
    monkeypatch.undo()
    entries = ["LayerSelLLM-importance", "LayerSelLLM-full", "BPR"]
    markdown = leaderboard.write_tables(records, entries, "tiny", tmp_path, 6, bench)
    assert "4 of 6 planned runs (entries x seeds) finished." in markdown
    assert "| LayerSelLLM-full | 2 | 0.2000 ± 0.0000" in markdown and "| 40 | 5 | 4 |" in markdown
    assert "| BPR | not run yet |" in markdown
    for name in ("tiny.md", "tiny.csv", "tiny.png", "tiny-frontier.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_tables_only_reads_finished_runs_and_starts_none(tmp_path, monkeypatch, capsys):
    test = dict.fromkeys(leaderboard.METRICS, 0.05)
    record = {"entry": "BPR", "seed": 7, "status": "ok", "test": test, "train_seconds": 3.0,
              "inference_users_per_second": 100.0, "parameters": 9, "selected_layers": None}
    path = tmp_path / "runs" / "tiny" / "BPR" / "seed7.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    monkeypatch.setattr(leaderboard, "_in_child", lambda *a: pytest.fail("a run was started"))
    args = ["--dataset", "tiny", "--entries", "BPR", "SASRec", "--seeds", "7", "8", "--out", str(tmp_path)]
    assert leaderboard.main([*args, "--tables-only"]) == 0
    table = (tmp_path / "tiny.md").read_text()
    assert "1 of 4 planned runs" in table and "| BPR | 1 | 0.0500 | 0.0500 |" in table
    assert "| SASRec | not run yet |" in table and table in capsys.readouterr().out + "\n"


def test_a_finished_run_of_another_config_or_code_is_refused_or_redone(tiny, tmp_path, monkeypatch):
    out = tmp_path / "results"
    runs = []

    def fake_child(model, dataset, config_dict):
        runs.append(config_dict)
        return {"status": "ok", "test": {}, "code": {"recbole_layersel.model": "digest-of-today"}}

    monkeypatch.setattr(leaderboard, "_in_child", fake_child)
    monkeypatch.setattr(leaderboard, "_module_sha256", lambda name: "digest-of-today")
    first = run_entry("BPR-tiny", "tiny", 1, out, tiny)
    assert first["config"]["embedding_size"] == 4 and first["config"]["epochs"] == 1
    assert first["version"] == leaderboard.__version__ and "data_path" not in first["config"]
    assert run_entry("BPR-tiny", "tiny", 1, out, tiny) == first and len(runs) == 1
    changed = r"seed1.json holds a finished run .*epochs 1 -> 2.*--redo-changed"
    with pytest.raises(LayerSelError, match=changed):
        run_entry("BPR-tiny", "tiny", 1, out, {**tiny, "epochs": 2})
    redone = run_entry("BPR-tiny", "tiny", 1, out, {**tiny, "epochs": 2}, redo_changed=True)
    assert redone["config"]["epochs"] == 2 and len(runs) == 2
    monkeypatch.setattr(leaderboard, "_module_sha256", lambda name: "digest-of-tomorrow")
    with pytest.raises(LayerSelError, match=r"code changed since: recbole_layersel.model"):
        run_entry("BPR-tiny", "tiny", 1, out, {**tiny, "epochs": 2})


def test_only_the_same_config_and_code_resume_a_killed_runs_state(tiny, tmp_path, monkeypatch):
    out = tmp_path / "results"
    folder = out / "runs" / "tiny" / "BPR-tiny"
    state = folder / "seed1.resume.pth"
    started_with_state = []

    def killed_child(model, dataset, config_dict):  # a session ends mid-training
        Path(config_dict["resume_file"]).write_bytes(b"training state")
        raise KeyboardInterrupt

    def child(model, dataset, config_dict):
        started_with_state.append(Path(config_dict["resume_file"]).is_file())
        Path(config_dict["resume_file"]).unlink(missing_ok=True)  # as a finished run does
        return {"status": "ok", "test": {}}

    def kill(settings):
        monkeypatch.setattr(leaderboard, "_in_child", killed_child)
        with pytest.raises(KeyboardInterrupt):
            run_entry("BPR-tiny", "tiny", 1, out, settings)
        monkeypatch.setattr(leaderboard, "_in_child", child)

    kill(tiny)
    resumed = run_entry("BPR-tiny", "tiny", 1, out, tiny)
    assert resumed["status"] == "ok" and resumed["resumed"]
    assert started_with_state == [True]  # same config and code: resumed
    assert not (folder / "seed1.resume.json").exists()
    (folder / "seed1.json").unlink()
    kill(tiny)
    with pytest.raises(LayerSelError, match=r"seed1.resume.pth holds the training state .*epochs 1 -> 2"):
        run_entry("BPR-tiny", "tiny", 1, out, {**tiny, "epochs": 2})
    monkeypatch.setattr(leaderboard, "_module_sha256", lambda name: "digest-of-tomorrow")
    with pytest.raises(LayerSelError, match=r"code changed since: recbole_layersel\."):
        run_entry("BPR-tiny", "tiny", 1, out, tiny)
    assert state.is_file()  # refused, not deleted
    assert "resumed" not in run_entry("BPR-tiny", "tiny", 1, out, tiny, redo_changed=True)
    assert started_with_state == [True, False]  # deleted: the run started from scratch
    (folder / "seed1.json").unlink()
    state.write_bytes(b"written before runs recorded their resume states")
    with pytest.raises(LayerSelError, match="no record of the run that wrote it.*--redo-changed"):
        run_entry("BPR-tiny", "tiny", 1, out, tiny)


def test_failed_runs_are_retried_when_asked(tiny, tmp_path, monkeypatch):
    out = tmp_path / "results"
    outcomes = iter([{"status": "failed", "error": "killed"}, {"status": "ok", "test": {}}])

    def child(model, dataset, config_dict):  # the failed run leaves its training state, as a killed one does
        state = Path(config_dict["resume_file"])
        outcome = next(outcomes)
        if outcome["status"] == "ok":
            state.unlink()
        else:
            state.write_bytes(b"training state")
        return outcome

    monkeypatch.setattr(leaderboard, "_in_child", child)
    assert run_entry("BPR-tiny", "tiny", 1, out, tiny)["status"] == "failed"
    assert run_entry("BPR-tiny", "tiny", 1, out, tiny)["status"] == "failed"  # kept, not retried
    retried = run_entry("BPR-tiny", "tiny", 1, out, tiny, retry_failed=True)
    assert retried["status"] == "ok" and retried["resumed"]  # from the failed run's state
    assert json.loads((out / "runs" / "tiny" / "BPR-tiny" / "seed1.json").read_text())["status"] == "ok"


def test_the_run_records_the_code_it_loaded():
    code = leaderboard.loaded_code(leaderboard.package_sources())
    assert "recbole_layersel.files" in code and "recbole_layersel.leaderboard" not in code
    assert code["recbole_layersel.files"] == leaderboard._module_sha256("recbole_layersel.files")


def test_runs_of_different_protocols_never_share_a_table(tmp_path, capsys):
    def record(entry, seed, mask):
        return {"entry": entry, "seed": seed, "status": "ok", "test": dict.fromkeys(leaderboard.METRICS, 0.1),
                "train_seconds": 1.0, "inference_users_per_second": 1.0, "parameters": 1,
                "selected_layers": None, "epochs_run": 12, "best_epoch": 1, "stopped_by": "early stopping",
                **({"config": {"eval_mask_history": mask}} if mask is not None else {})}

    same = [record("Pop", 1, True), record("SASRec", 1, True)]
    markdown = leaderboard.write_tables(same, ["Pop", "SASRec"], "tiny", tmp_path, 2, None)
    assert "Evaluation protocol of every row: eval_mask_history=True." in markdown
    assert "| Pop | 1 | 0.1000 | 0.1000 | 0.1000 | 0.1000 | 0.1000 | 0.1000 | 12 (1) |" in markdown
    for odd in (record("SASRec", 2, False), record("SASRec", 2, None)):
        with pytest.raises(LayerSelError, match=r"different evaluation protocols.*SASRec seed 2"):
            leaderboard.write_tables([*same, odd], ["Pop", "SASRec"], "tiny", tmp_path, 3, None)
    path = tmp_path / "runs" / "tiny" / "SASRec" / "seed2.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record("SASRec", 2, None)))
    (tmp_path / "runs" / "tiny" / "Pop").mkdir()
    (tmp_path / "runs" / "tiny" / "Pop" / "seed1.json").write_text(json.dumps(record("Pop", 1, True)))
    args = ["--dataset", "tiny", "--entries", "Pop", "SASRec", "--seeds", "1", "2", "--out", str(tmp_path)]
    assert leaderboard.main([*args, "--tables-only"]) == 2
    assert "eval_mask_history=not recorded: SASRec seed 2" in capsys.readouterr().err


def test_the_seconds_of_a_row_with_a_resumed_seed_are_a_lower_bound(tmp_path):
    def record(seed, **extra):
        return {"entry": "SASRec", "seed": seed, "status": "ok", "train_seconds": 100.0 * seed,
                "test": dict.fromkeys(leaderboard.METRICS, 0.1), "inference_users_per_second": 1.0,
                "parameters": 1, "selected_layers": None, "epochs_run": 12, "best_epoch": 1,
                "stopped_by": "early stopping", "config": {"eval_mask_history": True}, **extra}

    whole = leaderboard.write_tables([record(1), record(2)], ["SASRec"], "tiny", tmp_path, 2, None)
    assert "| 12 (1), 12 (1) | 150 |" in whole
    resumed = leaderboard.write_tables([record(1), record(2, resumed=True)], ["SASRec"], "tiny", tmp_path, 2,
                                       None)
    assert "| 12 (1), 12 (1) | ≥ 150 |" in resumed


def test_a_selection_is_tested_against_random_layers(tmp_path):
    def record(entry, seed, ndcg):
        return {"entry": entry, "seed": seed, "status": "ok", "train_seconds": 1.0,
                "test": dict.fromkeys(leaderboard.METRICS, ndcg), "inference_users_per_second": 1.0,
                "parameters": 1, "selected_layers": [0, 1], "epochs_run": 12, "best_epoch": 1,
                "stopped_by": "early stopping", "config": {"eval_mask_history": True}}

    entries = ["LayerSelLLM-importance", "LayerSelLLM-random"]
    records = [record(entry, seed, ndcg + seed * 0.01 + (0.001 * seed if entry == entries[1] else 0))
               for entry, ndcg in zip(entries, (0.10, 0.05), strict=True) for seed in (1, 2, 3)]
    markdown = leaderboard.write_tables(records, entries, "tiny", tmp_path, 6, None)
    header = next(line for line in markdown.splitlines() if line.startswith("| entry"))
    assert header.endswith("| p vs LayerSelLLM-random |")
    p_value = leaderboard.paired_p_value({1: 0.11, 2: 0.12, 3: 0.13}, {1: 0.061, 2: 0.072, 3: 0.083})
    assert f"| {p_value:.3g} |" in markdown and p_value < 0.05


def test_layers_and_parameters_are_shown_per_seed_where_the_seeds_differ():
    def record(seed, layers):
        return {"entry": "LayerSelLLM-importance", "seed": seed, "status": "ok", "train_seconds": 1.0,
                "test": dict.fromkeys(leaderboard.METRICS, 0.1), "inference_users_per_second": 1.0,
                "parameters": 1000 * len(layers), "selected_layers": layers}

    same = leaderboard.summarise([record(1, [0, 1]), record(2, [2, 5])], ["LayerSelLLM-importance"])
    differ = leaderboard.summarise([record(1, [0, 1, 2]), record(2, [0, 1])], ["LayerSelLLM-importance"])
    assert (same[0]["layers"], same[0]["parameters"]) == ("2", "2,000")
    assert (differ[0]["layers"], differ[0]["parameters"]) == ("3 / 2", "3,000 / 2,000")
    assert "| 3,000 / 2,000 | 3 / 2 |" in leaderboard.to_markdown(differ, "tiny")


def test_an_epoch_cap_is_marked():
    capped = {"epochs_run": 5, "best_epoch": 4, "stopped_by": "epoch cap"}
    assert leaderboard._epochs(capped) == "5 (4) cap" and leaderboard._epochs({}) == "–"


def _run_until_killed() -> None:
    leaderboard.exit_with_parent()
    time.sleep(600)


def _leaderboard_with_a_run(queue) -> None:
    run = multiprocessing.get_context("spawn").Process(target=_run_until_killed)
    run.start()
    queue.put(run.pid)
    time.sleep(600)


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_run_ends_when_its_leaderboard_is_killed():
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    board = context.Process(target=_leaderboard_with_a_run, args=(queue,))
    board.start()
    run_pid = queue.get(timeout=60)
    time.sleep(1)  # the run's watch on its parent has started
    assert _running(run_pid)
    os.kill(board.pid, signal.SIGKILL)  # no cleanup of its own: as when a session ends
    board.join()
    deadline = time.monotonic() + 30
    while _running(run_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _running(run_pid)
    if alive:
        os.kill(run_pid, signal.SIGKILL)
    assert not alive


def test_every_run_watches_its_leaderboard(monkeypatch):
    def watched():
        raise RuntimeError("watching the parent")

    monkeypatch.setattr(leaderboard, "exit_with_parent", watched)
    with pytest.raises(RuntimeError, match="watching the parent"):
        leaderboard._run_one("Pop", "ml-100k", {}, queue=None)


def test_the_code_recorded_is_the_code_the_run_started_with(monkeypatch):
    """A module edited while a run trains (a session goes on working) is not what the run ran."""
    from recbole_layersel import quick_start

    edited = []
    monkeypatch.setattr(leaderboard, "sha256_file", lambda path: "after" if edited else "before")
    monkeypatch.setattr(quick_start, "run_recbole", lambda *a, **k: edited.append(True) or {})
    records = []
    monkeypatch.setattr(leaderboard, "exit_with_parent", lambda: None)
    leaderboard._run_one("Pop", "ml-100k", {"hooks_only": True}, queue=SimpleNamespace(put=records.append))
    assert edited and records[0]["code"]["recbole_layersel.files"] == "before"


def test_an_entry_of_k_layers_is_tested_against_k_random_layers():
    def record(entry, seed, ndcg):
        return {"entry": entry, "seed": seed, "status": "ok", "train_seconds": 1.0,
                "test": dict.fromkeys(leaderboard.METRICS, ndcg), "inference_users_per_second": 1.0,
                "parameters": 1, "selected_layers": [0, 1], "epochs_run": 12, "best_epoch": 1,
                "stopped_by": "early stopping", "config": {"eval_mask_history": True}}

    importance, random_k4 = {1: 0.11, 2: 0.12, 3: 0.13}, {1: 0.062, 2: 0.074, 3: 0.086}
    records = [*(record("LayerSelLLM-importance-k4", s, v) for s, v in importance.items()),
               *(record("LayerSelLLM-random-k4", s, v) for s, v in random_k4.items()),
               record("LayerSelLLM-first-k8", 1, 0.3), record("LayerSelLLM-random-k8", 1, 0.2)]
    entries = ["LayerSelLLM-importance-k4", "LayerSelLLM-random-k4", "LayerSelLLM-first-k8",
               "LayerSelLLM-random-k8"]
    table = {row["entry"]: row for row in leaderboard.summarise(records, entries)}
    assert table["LayerSelLLM-importance-k4"]["p_vs_random_same_k"] == pytest.approx(
        leaderboard.paired_p_value(importance, random_k4))
    assert "p_vs_random_same_k" in table["LayerSelLLM-first-k8"]  # one shared seed: shown as "–"
    assert "p_vs_random_same_k" not in table["LayerSelLLM-random-k4"]
    assert "| p vs random, same k |" in leaderboard.to_markdown(list(table.values()), "tiny")
    assert leaderboard.random_of_same_k("LayerSelLLM-magnitude-k8-s10") == "LayerSelLLM-random-k8-s10"
    assert leaderboard.random_of_same_k("LayerSelLLM-importance") is None
