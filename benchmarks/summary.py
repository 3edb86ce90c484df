"""Rebuild the summary table at the top of RESULTS.md from the summary lines its sections carry.

Each benchmark writes, inside the section it appends, one hidden line per task and side it measured
(``common.summary_line``: an HTML comment holding the side's rate, its ratio to the peer of the same run, the metric
in words and the number of seeds). The table holds the latest line of each task and side (the file's sections are
in the order they were run), with the date and command of the section it came from, so it is current by
construction; the dated sections below it are the history. ``append_report`` rebuilds it after every benchmark;
this script does it by hand:

    python benchmarks/summary.py [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BEGIN = "<!-- summary table begins: benchmarks/summary.py writes it from the sections' summary lines -->"
END = "<!-- summary table ends -->"
SUMMARY = re.compile(r"^<!-- summary (\{.*\}) -->$", re.MULTILINE)
HEADING = re.compile(r"^## (.*?) \((\d{4}-\d{2}-\d{2})\)$", re.MULTILINE)
COMMAND = re.compile(r"^Command: `([^`]*)`", re.MULTILINE)
TRANSCRIBED = ("† transcribed by hand from its section's table, which was written before the benchmarks wrote "
               "summary lines (or, for a Note, from the figures its run printed).")


def records(text: str) -> list[dict]:
    """Every summary line of ``text``'s dated sections, in file order, with its section's date and command."""
    found = []
    headings = list(HEADING.finditer(text))
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        section = text[heading.end():following.start() if following else len(text)]
        command = COMMAND.search(section)
        for line in SUMMARY.finditer(section):
            record = json.loads(line.group(1))
            record["date"] = heading.group(2)
            # a section that joins several runs (a Note) names its commands in its lines
            record.setdefault("command", command.group(1) if command else "")
            found.append(record)
    return found


def table(found: list[dict]) -> list[str]:
    """The markdown table of the latest record of each (task, side), in the order they first appear."""
    by_task: dict[str, dict[str, dict]] = {}
    for record in found:  # a re-run keeps its first run's place
        by_task.setdefault(record["task"], {})[record["side"]] = record
    rows = ["| task | side | rate | ratio (same run) | metric | seeds | date | command |",
            "|---|---|---|---|---|---|---|---|"]
    for task, sides in by_task.items():
        for side, r in sides.items():
            rate = "" if r["rate"] is None else f"{r['rate']:g} {r['unit']}"
            ratio = "" if r["ratio"] is None else f"**{r['ratio']:.2f}x** {r['peer']}"
            date = r["date"] + (" †" if r.get("transcribed") else "")
            rows.append(f"| {task} | {side} | {rate} | {ratio} | {r['metric']} | {r['seeds']} | {date} | "
                        f"`{r['command']}` |")
    return rows


def rebuild(text: str) -> str:
    """``text`` with the table between its BEGIN and END markers rewritten (unchanged where it has none)."""
    if BEGIN not in text or END not in text:
        return text
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    found = records(tail)
    legend = [TRANSCRIBED] if any(r.get("transcribed") for r in found) else []
    return "\n".join([head + BEGIN, *table(found), "", *legend, END]) + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    args = parser.parse_args()
    path = Path(args.results)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        parser.error(f"{path} has no summary table markers: put the lines {BEGIN!r} and {END!r} where it goes.")
    tmp = Path(f"{path}.tmp")  # written whole, then renamed, as append_report does
    tmp.write_text(rebuild(text))
    tmp.replace(path)
    print(f"rebuilt the summary table of {path} from {len(SUMMARY.findall(text))} summary lines")


if __name__ == "__main__":
    main()
