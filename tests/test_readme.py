"""The README shows the tables the commands wrote, not copies that drifted: every table in the results
files below must appear in the README line for line."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
TABLES = ["results/ml-100k.md", "results/amazon-electronics.md", "results/bench/bench.md",
          "results/importance/ml-100k-importance.md", "results/selection-paced/ml-100k.md",
          "results/selection-quarter/ml-100k.md", "results/selection-fisher/ml-100k.md",
          "results/budget-20ep/ml-100k.md", "results/budget-20ep-distilled/ml-100k.md",
          "results/proxy/budget-20ep/ml-100k-seed2020.md", "results/proxy/amazon-electronics-seed2020.md"]


def markdown_tables(text: str) -> list[str]:
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line.rstrip())
        elif rows:
            tables.append("\n".join(rows))
            rows = []
    return tables


def test_markdown_tables_are_split_on_non_table_lines():
    assert markdown_tables("a\n| x |\n|---|\n| 1 |\nb\n| y |") == ["| x |\n|---|\n| 1 |", "| y |"]


@pytest.mark.parametrize("results_file", TABLES)
def test_readme_shows_the_results_tables_as_written(results_file):
    tables = markdown_tables((ROOT / results_file).read_text(encoding="utf-8"))
    assert tables, f"{results_file} holds no table"
    readme_tables = markdown_tables(README)
    for table in tables:
        assert table in readme_tables, f"the README's copy of {results_file}'s table is stale: paste it again"
