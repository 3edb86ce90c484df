"""benchmarks/RESULTS.md's summary table is rebuilt from the summary lines its sections carry, never kept by hand."""

from __future__ import annotations

import pytest
from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def summary(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import summary

    return summary


def section(title: str, date: str, command: str, *lines: str) -> str:
    return "\n".join([f"\n## {title} ({date})\n", f"Command: `{command}`  ", "Machine: test  ", "", *lines, ""])


def test_the_table_holds_each_task_and_sides_latest_line_with_its_sections_date_and_command(summary):
    import common

    line = common.summary_line
    text = "\n".join([
        "# Results", "", summary.BEGIN, "| stale | hand-made | table |", summary.END, "", "Note: kept.",
        section("First", "2026-01-01", "python benchmarks/a.py",
                line("SST-2", "hf", "hf", 50.0, "samples/s", 1.0, "dev 0.80", 1),
                line("SST-2", "ours", "hf", 100.04, "samples/s", 2.0, "dev 0.79", 1),
                line("NER", "ours", "hf", 10, "samples/s", 1.5, "f1 0.8", 1)),
        section("Second", "2026-02-02", "python benchmarks/a.py --seeds 5",
                line("SST-2", "ours", "hf", 120.0, "samples/s", 2.4, "dev 0.81", 5)),
    ])
    rebuilt = summary.rebuild(text)
    table = rebuilt.split(summary.BEGIN)[1].split(summary.END)[0]
    rows = [row for row in table.splitlines() if row.startswith("| ") and "---" not in row][1:]
    assert rows == [
        "| SST-2 | hf | 50 samples/s | **1.00x** hf | dev 0.80 | 1 | 2026-01-01 | `python benchmarks/a.py` |",
        "| SST-2 | ours | 120 samples/s | **2.40x** hf | dev 0.81 | 5 | 2026-02-02 | "
        "`python benchmarks/a.py --seeds 5` |",
        "| NER | ours | 10 samples/s | **1.50x** hf | f1 0.8 | 1 | 2026-01-01 | `python benchmarks/a.py` |",
    ]
    assert "stale" not in rebuilt
    assert rebuilt.split(summary.END)[1] == text.split(summary.END)[1]  # the sections are history: untouched
    assert rebuilt.split(summary.BEGIN)[0] == text.split(summary.BEGIN)[0]
    assert summary.rebuild(rebuilt) == rebuilt


def test_a_benchmarks_report_updates_the_table_of_the_file_it_appends_to(summary, tmp_path):
    import common

    results = tmp_path / "RESULTS.md"
    results.write_text("\n".join(["# Results", summary.BEGIN, summary.END, ""]))
    common.append_report(str(results), section(
        "Run", "2026-03-03", "python benchmarks/x.py",
        common.summary_line("CoNLL", "ours", "hf", 91.0, "samples/s", 1.85,
                            common.metric_words("dev f1", [0.83, 0.84], [0.82, 0.84]), 2)))
    text = results.read_text()
    assert "| CoNLL | ours | 91 samples/s | **1.85x** hf | dev f1 mean 0.8350, difference +0.0050 " \
           "[-0.0585, +0.0685] | 2 | 2026-03-03 | `python benchmarks/x.py` |" in text
    assert not (tmp_path / "RESULTS.md.tmp").exists()


def test_the_shipped_results_table_is_what_its_sections_say(summary):
    text = (BENCHMARKS / "RESULTS.md").read_text()
    assert summary.BEGIN in text and summary.END in text
    assert summary.rebuild(text) == text, "benchmarks/RESULTS.md's summary table was edited by hand or is stale: " \
                                          "run python benchmarks/summary.py"
    assert len(summary.records(text)) >= 40
