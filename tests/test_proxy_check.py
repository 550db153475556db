"""The proxy check: proxies of the layer sets of finished leaderboard runs against their NDCG@10."""

import json

import pytest

from recbole_layersel import proxy_check
from recbole_layersel.errors import LayerSelError
from tests.conftest import write_atomic_dataset
from tests.test_quick_start import HOOKS_SMALL
from tests.tiny_models import CONFIGS, save_tiny_llm


def write_run(runs, entry, seed, layers, ndcg, status="ok", valid=None):
    path = runs / "tiny" / entry / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "selected_layers": layers, "test": {"ndcg@10": ndcg}}
    if valid is not None:
        record["valid"] = {"ndcg@10": valid}
    path.write_text(json.dumps(record))


def test_the_proxies_rank_correlation_with_the_runs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, "LayerSelLLM-first-k2", 1, [0, 1], 0.3)
    write_run(runs, "LayerSelLLM-last-k2", 1, [4, 5], 0.1)
    write_run(runs, "LayerSelLLM-importance", 1, [0, 1], 0.5)  # the same layers: one row, mean NDCG
    write_run(runs, "LayerSelLLM-text", 1, [], 0.2)
    write_run(runs, "LayerSelLLM-random", 1, [2, 3], 0.9, status="failed")
    write_run(runs, "LayerSelLLM-uniform", 2, [0, 5], 0.9)  # another seed
    # content orders the sets as their NDCG does ([0, 1] > [] > [4, 5]), adapted the other way round.
    monkeypatch.setattr(proxy_check, "proxies", lambda dataset, seed: {
        "content": lambda layers: -abs(sum(layers) - 1), "adapted": lambda layers: abs(sum(layers) - 1)})
    report = proxy_check.check("tiny", 1, runs)
    rows = {tuple(row["layers"]): row for row in report["rows"]}
    assert set(rows) == {(0, 1), (4, 5), ()} and rows[(0, 1)]["ndcg@10"] == pytest.approx(0.4)
    assert rows[(0, 1)]["entries"] == {"LayerSelLLM-first-k2": 0.3, "LayerSelLLM-importance": 0.5}
    assert report["spearman"] == {"content": pytest.approx(1.0), "adapted": pytest.approx(-1.0)}
    assert report["split"] == "test"  # not every run recorded its validation NDCG
    table = proxy_check.markdown(report)
    assert "| [0, 1] | LayerSelLLM-first-k2, LayerSelLLM-importance | 0.4000 | 0.0000 |" in table
    assert "content 1.00, adapted -1.00." in table
    content_only = proxy_check.check("tiny", 1, runs, ("content",))
    assert content_only["spearman"] == {"content": pytest.approx(1.0)}
    assert "adapted" not in content_only["rows"][0]
    assert "| content proxy | s |\n" in proxy_check.markdown(content_only)


def test_fewer_than_three_layer_sets_cannot_be_correlated(tmp_path):
    write_run(tmp_path, "LayerSelLLM-first-k2", 1, [0, 1], 0.3)
    write_run(tmp_path, "LayerSelLLM-text", 1, [], 0.2)
    with pytest.raises(LayerSelError, match="for 2 layer sets; a rank correlation needs at least 3"):
        proxy_check.finished_runs(tmp_path, "tiny", 1)


def test_validation_ndcg_is_used_when_every_run_recorded_it(tmp_path):
    for entry, layers, ndcg in (("LayerSelLLM-a", [0], 0.3), ("LayerSelLLM-b", [1], 0.2),
                                ("LayerSelLLM-c", [], 0.1)):
        write_run(tmp_path, entry, 1, layers, ndcg, valid=ndcg + 1)
    split, by_layers = proxy_check.finished_runs(tmp_path, "tiny", 1)
    assert split == "valid" and by_layers[(0,)] == {"LayerSelLLM-a": 1.3}


def test_the_proxies_are_built_as_the_search_builds_them(tmp_path, argv):
    write_atomic_dataset(tmp_path / "data", "tiny")
    llm = save_tiny_llm(tmp_path / "llm", CONFIGS["llama"]())
    built = proxy_check.proxies("tiny", 1, {
        "data_path": str(tmp_path / "data"), "llm_path": str(llm), "llm_cache_dir": str(tmp_path / "cache"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "title_field": "title", "embedding_size": 8, "title_max_tokens": 6, "num_layers": 3, "bridge_rank": 4,
        **HOOKS_SMALL})
    assert built["adapted"].bridges == {"mlp_bridges": False, "bridge_rank": 4}  # the config's, as the search
    assert len(built["adapted"].train.users) == HOOKS_SMALL["selection_train_users"]
    assert 0 <= built["content"]([0, 5]) <= 1 and 0 <= built["adapted"]([0, 5]) <= 1


def write_report(out, seed, scores: dict[tuple[int, ...], float]):
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"layers": list(layers), "content": {"score": score, "seconds": 0.1}}
            for layers, score in scores.items()]
    report = {"dataset": "tiny", "seed": seed, "split": "valid", "rows": rows, "spearman": {"content": 0.0}}
    (out / f"tiny-seed{seed}.json").write_text(json.dumps(report))


def test_agreement_compares_training_with_itself_and_the_proxy_with_its_mean(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "proxy"
    trained = {1: {(0, 1): 0.3, (4, 5): 0.2, (): 0.1}, 2: {(0, 1): 0.1, (4, 5): 0.5, (): 0.2}}
    for seed, sets in trained.items():
        for n, (layers, ndcg) in enumerate(sets.items()):
            write_run(runs, f"LayerSelLLM-set{n}", seed, list(layers), ndcg, valid=ndcg)
    write_run(runs, "LayerSelLLM-random", 1, [2, 3], 0.9, valid=0.9)  # only seed 1 trained it: left out
    for seed in trained:  # trained on both seeds after the reports were written: left out
        write_run(runs, "LayerSelLLM-later", seed, [1, 2], 0.4, valid=0.4)
    write_report(out, 1, {(0, 1): 3.0, (4, 5): 2.0, (): 1.0, (2, 3): 0.0})
    write_report(out, 2, {(0, 1): 1.0, (4, 5): 3.0, (): 2.0})
    report = proxy_check.agreement(runs, out, "tiny", [1, 2])
    assert report["layers"] == [[0, 1], [4, 5], []]
    assert report["mean"] == pytest.approx([0.2, 0.35, 0.15])
    assert report["seed_vs_seed"] == {"1-2": pytest.approx(-0.5)}
    assert report["proxy_vs_own_seed"]["content"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert report["proxy_vs_mean"]["content"] == {1: pytest.approx(0.5), 2: pytest.approx(0.5)}
    table = proxy_check.agreement_markdown(report)
    assert "| [4, 5] | 0.2000 | 0.5000 | 0.3500 | 2.0000 | 3.0000 |" in table
    assert "seed against seed: 1-2 -0.50 (mean -0.50)." in table
    assert "against the mean over seeds: 1 0.50, 2 0.50; against its own seed's: 1 1.00, 2 1.00." in table


def test_agreement_needs_every_seed_s_report(tmp_path):
    for seed in (1, 2):
        for n, layers in enumerate(([0], [1], [])):
            write_run(tmp_path / "runs", f"LayerSelLLM-set{n}", seed, layers, 0.1 * n, valid=0.1 * n)
    write_report(tmp_path / "proxy", 1, {(0,): 1.0, (1,): 2.0, (): 3.0})
    with pytest.raises(LayerSelError, match=r"seed2.json does not exist; write it first with .* --seed 2"):
        proxy_check.agreement(tmp_path / "runs", tmp_path / "proxy", "tiny", [1, 2])


def test_agreement_compares_one_split_on_every_seed(tmp_path):
    for seed in (1, 2):
        for n, layers in enumerate(([0], [1], [])):
            valid = None if (seed, n) == (2, 0) else 0.1 * n  # one run of seed 2 has no validation score
            write_run(tmp_path / "runs", f"LayerSelLLM-set{n}", seed, layers, 0.1 * n, valid=valid)
    with pytest.raises(LayerSelError, match=r"give NDCG@10 on \('valid', 'test'\)"):
        proxy_check.agreement(tmp_path / "runs", tmp_path / "proxy", "tiny", [1, 2])
