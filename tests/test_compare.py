"""Cross-model importance: hooks-only runs per LLM, then heatmaps and selections side by side."""

import json

import pytest

from recbole_layersel import compare as compare_module
from recbole_layersel.compare import compare, main, run_hooks
from recbole_layersel.errors import LayerSelError
from tests.conftest import write_atomic_dataset
from tests.tiny_models import CONFIGS, save_tiny_llm


def test_two_models_are_compared_from_their_hooks(tmp_path, monkeypatch):
    write_atomic_dataset(tmp_path / "data", "tiny")
    settings = {
        "data_path": str(tmp_path / "data"), "llm_cache_dir": str(tmp_path / "cache"), "show_progress": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "title_field": "title", "embedding_size": 8, "title_max_tokens": 6, "num_layers": 3,
        "importance_sample_users": 8, "importance_max_items": 6, "importance_warmup_steps": 2,
        "selection_train_users": 8, "selection_sample_users": 8, "selection_adapt_steps": 3,
        "selection_batch_size": 4}
    folders = {}
    for family in ("llama", "qwen3"):
        save_tiny_llm(tmp_path / family, CONFIGS[family]())
        folders[family] = run_hooks(str(tmp_path / family), "tiny", tmp_path / "out", settings)
    table = compare(folders, "tiny", tmp_path / "out")
    assert (tmp_path / "out" / "tiny-importance.png").stat().st_size > 1000
    assert table == (tmp_path / "out" / "tiny-importance.md").read_text().rstrip("\n")
    rows = [line for line in table.splitlines() if line.startswith(("| llama", "| qwen3"))]
    assert len(rows) == 2 and all("| 6 |" in row for row in rows)

    monkeypatch.setattr(compare_module.multiprocessing, "get_context",
                        lambda *a: pytest.fail("finished hooks were rerun"))
    assert run_hooks(str(tmp_path / "llama"), "tiny", tmp_path / "out", settings) == folders["llama"]
    with pytest.raises(pytest.fail.Exception, match="rerun"):  # another seed's hooks are not those
        run_hooks(str(tmp_path / "llama"), "tiny", tmp_path / "out", {**settings, "seed": 7})

    old = tmp_path / "out" / "tiny" / "llama" / "importance.json"
    report = json.loads(old.read_text())
    old.write_text(json.dumps({key: value for key, value in report.items() if key != "groups"}))
    with pytest.raises(LayerSelError, match=r"lacks \['groups'\]: an earlier version .* Move .* away"):
        compare(folders, "tiny", tmp_path / "out")


def test_two_models_of_one_name_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--dataset", "tiny", "--llms", str(tmp_path / "a" / "llm"), str(tmp_path / "b" / "llm"),
              "--out", str(tmp_path / "out")])
    assert "two models share a name" in capsys.readouterr().err and not (tmp_path / "out").exists()
