"""The speed benchmark runs the real compact and full models side by side (behaviour, not timings)."""

from recbole_layersel.bench import benchmark, markdown_table
from tests.tiny_models import CONFIGS, save_tiny_llm


def test_benchmark_reports_ratios_for_each_k(tmp_path):
    save_tiny_llm(tmp_path / "llm", CONFIGS["llama"]())
    rows = benchmark(str(tmp_path / "llm"), [1, 3], batch_size=2, seq_len=4, repeats=2)
    assert [row["k"] for row in rows] == [1, 3]
    assert rows[0]["layers"] == [0] and rows[1]["layers"] == [0, 2, 5]
    assert rows[1]["ideal"] == 2.0 and all(row["speedup"] > 0 for row in rows)
    table = markdown_table(rows, 6)
    assert "| k of 6 |" in table and table.count("\n") == 3
