#!/usr/bin/env python3
"""Check the state of Tally during and after scripts/demo.

  demo-report.py progress STATS_JSON
      Print how far the worker has read, and exit 0 once every partition is drained: the
      stored offset equals the log end, and the lag is 0. Exit 1 while it is not.

  demo-report.py compare DATA_DIR PRODUCED_JSON STATS_JSON BY_MODEL_CSV ROLLUP_MISMATCHES
      Print Tally's results next to the expected ones, and exit 1 if any pair differs. The
      expected meter totals are computed here from the CSV files alone, independently of
      scripts/demo-events.py. The expected re-sends and dead letters come from PRODUCED_JSON.

STATS_JSON is the output of `tally stats --json`. BY_MODEL_CSV has the lines `meter,model,total`
from the view tally.usage_per_minute. ROLLUP_MISMATCHES is the row count of the view
tally.rollup_mismatches. Meter totals are exact decimals, written as strings in STATS_JSON, so
they are read as decimal.Decimal and never pass through float.
"""

import argparse
import csv
import decimal
import json
import sys
from pathlib import Path

# The CSV file of each model, as scripts/demo-events.py names the services in data.model.
CSV_FILES = {"azure-code": "code.csv", "azure-conv": "conv.csv"}
METERS = ["input_tokens", "output_tokens", "requests"]


def read_stats(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file, parse_float=decimal.Decimal, parse_int=decimal.Decimal)


def is_drained(partition):
    log_end = partition["log_end"]
    if log_end is None or partition["lag"] is None:
        return False
    stored = partition["stored_offset"]
    if stored is None:
        # Tally stores nothing for a partition that never had a message.
        return log_end == partition["log_start"]
    return stored == log_end and partition["lag"] == 0


def progress(arguments):
    partitions = read_stats(arguments.stats)["partitions"]
    stored = sum(p["stored_offset"] or 0 for p in partitions)
    log_end = sum(p["log_end"] or 0 for p in partitions)
    drained = bool(partitions) and all(is_drained(p) for p in partitions)
    print(f"  stored offsets {stored} of log end {log_end}" + (", drained" if drained else ""), flush=True)
    return 0 if drained else 1


def csv_totals(path):
    """Return the expected totals of one file: the sum of each token column and the number of rows."""
    totals = dict.fromkeys(METERS, 0)
    with open(path, newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            totals["input_tokens"] += int(row["ContextTokens"])
            totals["output_tokens"] += int(row["GeneratedTokens"])
            totals["requests"] += 1
    return totals


def read_model_totals(path):
    """Return {(meter, model): total} from `meter,model,total` lines."""
    totals = {}
    with open(path, newline="", encoding="utf-8") as file:
        for meter, model, total in csv.reader(file):
            totals[(meter, model)] = decimal.Decimal(total)
    return totals


class Table:
    """A report of (check, Tally's value, expected value) rows, with the number of rows that differ."""

    def __init__(self):
        self.rows = []
        self.failures = 0

    def section(self, title):
        self.rows.append((title, None, None, None))

    def check(self, label, actual, expected):
        matches = actual is not None and decimal.Decimal(actual) == decimal.Decimal(expected)
        if not matches:
            self.failures += 1
        self.rows.append((label, "-" if actual is None else str(actual), str(expected), "ok" if matches else "DIFFERS"))

    def print(self):
        width = max(len(row[0]) for row in self.rows)
        print(f"  {'':<{width}}  {'Tally':>12}  {'expected':>12}")
        for label, actual, expected, verdict in self.rows:
            if actual is None:
                print(label)
            else:
                print(f"  {label:<{width}}  {actual:>12}  {expected:>12}  {verdict}")


def compare(arguments):
    stats = read_stats(arguments.stats)
    with open(arguments.produced, encoding="utf-8") as file:
        produced = json.load(file)
    expected_by_model = {model: csv_totals(arguments.data_dir / name) for model, name in CSV_FILES.items()}
    expected_totals = {slug: sum(totals[slug] for totals in expected_by_model.values()) for slug in METERS}
    model_totals = read_model_totals(arguments.by_model)
    meters = {meter["slug"]: meter for meter in stats["meters"]}
    totals = stats["totals"]

    print(f"Time shift: {produced['shift_days']} days")
    table = Table()

    table.section("Meters (expected: computed from the CSV files)")
    for slug in METERS:
        meter = meters.get(slug)
        total = meter["total"] if meter else None
        table.check(slug, decimal.Decimal(total) if total is not None else None, expected_totals[slug])
        for model, expected in expected_by_model.items():
            table.check(f"{slug}, model {model}", model_totals.get((slug, model)), expected[slug])
    unexpected_groups = sorted(key for key in model_totals if key[1] not in CSV_FILES)
    for slug, model in unexpected_groups:
        table.check(f"{slug}, model {model or '(none)'}", model_totals[(slug, model)], 0)

    table.section("Messages")
    partitions = stats["partitions"]
    in_kafka = sum(p["log_end"] - p["log_start"] for p in partitions if p["log_end"] is not None)
    table.check("messages in Kafka", in_kafka, produced["messages"])
    table.check("accepted events", totals["accepted"], expected_totals["requests"])
    table.check("unmetered events", totals["unmetered"], 0)
    table.check("duplicates (re-sends)", totals["duplicates"], produced["resends"])
    table.check("offsets skipped (gaps)", sum(p["gap_offsets"] for p in partitions), 0)

    table.section("Dead letters by reason (expected: the malformed messages sent)")
    dead_letters = totals["dead_letters"]
    expected_dead = produced["dead_letters"]
    for reason in sorted(set(expected_dead) | set(dead_letters)):
        entry = expected_dead.get(reason, {"count": 0, "kinds": ["not sent"]})
        label = f"{reason} ({', '.join(entry['kinds'])})"
        table.check(label, dead_letters.get(reason, 0), entry["count"])

    table.section("Ledger")
    table.check("rows of tally.rollup_mismatches", int(arguments.rollup_mismatches), 0)

    table.print()
    if table.failures:
        print(f"FAILED: {table.failures} of the checks above differ from the expected values")
        return 1
    print("All checks match.")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    progress_parser = commands.add_parser("progress", help="exit 0 once every partition is drained")
    progress_parser.add_argument("stats", type=Path)
    progress_parser.set_defaults(run=progress)

    compare_parser = commands.add_parser("compare", help="print Tally's results next to the expected ones")
    compare_parser.add_argument("data_dir", type=Path)
    compare_parser.add_argument("produced", type=Path)
    compare_parser.add_argument("stats", type=Path)
    compare_parser.add_argument("by_model", type=Path)
    compare_parser.add_argument("rollup_mismatches")
    compare_parser.set_defaults(run=compare)

    arguments = parser.parse_args()
    sys.exit(arguments.run(arguments))


if __name__ == "__main__":
    main()
