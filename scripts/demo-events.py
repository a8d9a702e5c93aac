#!/usr/bin/env python3
"""Turn the Azure LLM inference trace into Kafka messages for scripts/demo.

Each CSV row becomes one CloudEvents 1.0 `llm.request` event in structured JSON mode:
  - id is the service and the file's line number, such as azure-code-2, so a rerun sends the same ids;
  - subject is one of 40 customers, chosen by a hash of the id, and is also the message key;
  - time is the row's timestamp moved by whole days, so that the latest row of the trace falls
    in the 24 hours before now. Only the date changes, and all seven fractional digits stay.
The stream also contains what a retrying producer and a buggy client send in practice:
byte-identical re-sends of 1% of the events, and malformed messages of known dead-letter reasons.

Output files in OUT_DIR:
  messages.tsv    the events, re-sends and malformed messages, in time order
  tombstones.tsv  messages whose empty value must be sent as NULL (`kcat -Z`)
  produced.json   the time shift and what was written: events, re-sends, dead letters by reason

The .tsv files have one message a line as `key<TAB>value`, for `kcat -P -K '\\t'`. The compact
JSON is ASCII only (`ensure_ascii`), so neither the tab nor the newline can occur in a value,
and the one message with invalid UTF-8 avoids both bytes.
"""

import argparse
import csv
import datetime
import hashlib
import json
import re
import sys
import time
from pathlib import Path

# The CSV file of each service. The service name is the source and data.model of its events.
SERVICES = [("azure-code", "code.csv"), ("azure-conv", "conv.csv")]
CUSTOMER_COUNT = 40
EVENT_TYPE = "llm.request"
# Every RESEND_INTERVAL-th event is sent a second time, the way a producer retries after a lost
# acknowledgement. The re-sends cycle through these delays, in messages, so that some land in
# the batch of their original and some in a later one (Tally's default batch is at most 5000
# messages).
RESEND_INTERVAL = 100
RESEND_DELAYS = [1, 37, 1000, 8000]
# The source of the malformed messages that do not copy a real event.
BUGGY_SOURCE = "demo-buggy-client"

TIMESTAMP_PATTERN = re.compile(r"(\d{4}-\d{2}-\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{7})")
TICKS_PER_SECOND = 10_000_000  # ticks of 100 ns, the resolution of the trace's seven fractional digits
TICKS_PER_DAY = 86_400 * TICKS_PER_SECOND
EPOCH = datetime.date(1970, 1, 1)


class Row:
    """One CSV row: its place in the file, its timestamp text and its token counts."""

    def __init__(self, service, path, line, timestamp, input_tokens, output_tokens):
        self.service = service
        self.line = line
        match = TIMESTAMP_PATTERN.fullmatch(timestamp)
        if not match:
            sys.exit(f"error: {path}:{line}: TIMESTAMP {timestamp!r} is not YYYY-MM-DD HH:MM:SS.fffffff")
        self.date = datetime.date.fromisoformat(match.group(1))
        self.time_of_day = timestamp[len("YYYY-MM-DD "):]
        hours, minutes, seconds, fraction = (int(group) for group in match.groups()[1:])
        self.ticks = ((self.date - EPOCH).days * 86_400 + hours * 3600 + minutes * 60 + seconds) * TICKS_PER_SECOND + fraction
        self.input_tokens = parse_count(input_tokens, path, line, "ContextTokens")
        self.output_tokens = parse_count(output_tokens, path, line, "GeneratedTokens")


def parse_count(text, path, line, column):
    if not text.isascii() or not text.isdigit():
        sys.exit(f"error: {path}:{line}: {column} {text!r} is not a non-negative integer")
    return int(text)


def read_rows(data_dir):
    rows = []
    for service, name in SERVICES:
        path = data_dir / name
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
                sys.exit(f"error: {path}: expected the header TIMESTAMP,ContextTokens,GeneratedTokens, found {header}")
            for fields in reader:
                if len(fields) != 3:
                    sys.exit(f"error: {path}:{reader.line_num}: expected 3 fields, found {len(fields)}")
                rows.append(Row(service, path, reader.line_num, *fields))
    # The events go out in time order, as the two services would have sent them.
    rows.sort(key=lambda row: (row.ticks, row.service, row.line))
    return rows


def shift_days(rows, now_ticks):
    """Return the whole days that move the latest row into the 24 hours ending at now_ticks."""
    latest = max(row.ticks for row in rows)
    return (now_ticks - latest) // TICKS_PER_DAY


def customer_for(event_id):
    """Return the subject of an event: one of the customers, chosen by a hash of the id."""
    number = int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:8], "big") % CUSTOMER_COUNT + 1
    return f"customer-{number:02d}"


def event_time(date, time_of_day, shift):
    """Return RFC 3339 UTC text with the date moved by `shift` days and the time of day kept as is."""
    return f"{(date + datetime.timedelta(days=shift)).isoformat()}T{time_of_day}Z"


def encode(event):
    return json.dumps(event, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def make_event(row, shift):
    event_id = f"{row.service}-{row.line}"
    return {
        "specversion": "1.0",
        "type": EVENT_TYPE,
        "source": row.service,
        "id": event_id,
        "subject": customer_for(event_id),
        "time": event_time(row.date, row.time_of_day, shift),
        "data": {"model": row.service, "input_tokens": row.input_tokens, "output_tokens": row.output_tokens},
    }


def malformed_messages(rows, shift):
    """Return (reason, description, key, value) for each malformed message.

    Each one is a mistake that real producers make, and a value of None is a tombstone. The last
    entry copies the id of an event from the trace with a changed payload, so it must follow that
    event in the stream.
    """
    template_row = rows[len(rows) // 2]
    latest_row = rows[-1]
    earliest_row = rows[0]

    def buggy(number, **changes):
        event_id = f"bad-{number}"
        event = {
            "specversion": "1.0",
            "type": EVENT_TYPE,
            "source": BUGGY_SOURCE,
            "id": event_id,
            "subject": customer_for(event_id),
            "time": event_time(template_row.date, template_row.time_of_day, shift),
            "data": {"model": "azure-code", "input_tokens": 100, "output_tokens": 10},
        }
        for name, value in changes.items():
            if value is None:
                del event[name]
            else:
                event[name] = value
        return customer_for(event_id), event

    messages = []

    key, event = buggy(1)
    text = encode(event)
    messages.append(("malformed_json", "JSON cut off in the middle", key, text[: len(text) // 2]))

    key, event = buggy(2, data={"model": "MODEL", "input_tokens": 100, "output_tokens": 10})
    # A client that writes Latin-1 sends "café" with the byte 0xE9, which is not UTF-8 here.
    messages.append(("invalid_utf8", "Latin-1 byte in a string", key, encode(event).replace(b"MODEL", b"caf\xe9")))

    key, event = buggy(3)
    text = encode(event).replace(b'"input_tokens":100', b'"input_tokens":100,"input_tokens":250')
    messages.append(("duplicate_json_key", "input_tokens given twice", key, text))

    key, event = buggy(4, subject=None)
    messages.append(("missing_attribute", "no subject attribute", key, encode(event)))

    key, event = buggy(5, subject=40)
    messages.append(("invalid_attribute", "subject is a number", key, encode(event)))

    key, event = buggy(6, time=1700158623)
    messages.append(("invalid_time", "time in epoch seconds", key, encode(event)))

    key, event = buggy(7, time=event_time(latest_row.date, latest_row.time_of_day, shift + 2))
    messages.append(("time_in_future", "time two days ahead", key, encode(event)))

    key, event = buggy(8, time=event_time(earliest_row.date, earliest_row.time_of_day, shift - 60))
    messages.append(("too_late", "time 60 days back", key, encode(event)))

    key, event = buggy(9, data={"model": "azure-code", "input_tokens": "n/a", "output_tokens": 10})
    messages.append(("invalid_value", 'input_tokens is "n/a"', key, encode(event)))

    key, event = buggy(10, specversion="0.3")
    messages.append(("unsupported_specversion", "specversion 0.3", key, encode(event)))

    key, event = buggy(11)
    event["subject"] = event["subject"] + "\u0000"
    messages.append(("nul_character", "U+0000 in subject", key, encode(event)))

    key, _ = buggy(12)
    messages.append(("empty_value", "zero-length value", key, b""))

    key, _ = buggy(13)
    messages.append(("null_value", "tombstone", key, None))

    conflict = make_event(template_row, shift)
    conflict["data"]["output_tokens"] += 1
    messages.append(
        ("duplicate_id_conflict", "known id, changed payload", conflict["subject"], encode(conflict)))
    return messages


def write_messages(rows, shift, out_dir):
    messages = malformed_messages(rows, shift)
    streamed = [message for message in messages if message[3] is not None]
    tombstones = [message for message in messages if message[3] is None]
    # The malformed messages are spread evenly over the stream. The conflicting copy comes last,
    # after the middle row it copies, because its key keeps both in one partition and in order.
    positions = {len(rows) * (index + 1) // (len(streamed) + 1): message for index, message in enumerate(streamed)}
    if len(positions) != len(streamed):
        sys.exit("error: the trace is too short to spread the malformed messages")

    resends = 0
    pending = []  # (due after this many messages, key, value)
    written = 0
    with open(out_dir / "messages.tsv", "wb") as out:

        def emit(key, value):
            nonlocal written
            out.write(key.encode("ascii") + b"\t" + value + b"\n")
            written += 1
            while pending and pending[0][0] <= written:
                _, resend_key, resend_value = pending.pop(0)
                out.write(resend_key.encode("ascii") + b"\t" + resend_value + b"\n")
                written += 1

        for number, row in enumerate(rows, start=1):
            event = make_event(row, shift)
            value = encode(event)
            emit(event["subject"], value)
            if number % RESEND_INTERVAL == 0:
                pending.append((written + RESEND_DELAYS[resends % len(RESEND_DELAYS)], event["subject"], value))
                pending.sort(key=lambda entry: entry[0])
                resends += 1
            if number in positions:
                _, _, key, bad_value = positions[number]
                emit(key, bad_value)
        for _, key, value in pending:
            out.write(key.encode("ascii") + b"\t" + value + b"\n")
            written += 1

    with open(out_dir / "tombstones.tsv", "wb") as out:
        for _, _, key, _ in tombstones:
            # kcat -Z sends the empty value after the tab as NULL.
            out.write(key.encode("ascii") + b"\t\n")
            written += 1

    dead_letters = {}
    for reason, description, _, _ in messages:
        dead_letters.setdefault(reason, []).append(description)
    return {
        "shift_days": shift,
        "events": len(rows),
        "resends": resends,
        "messages": written,
        "dead_letters": {reason: {"count": len(items), "kinds": items} for reason, items in dead_letters.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="the directory with code.csv and conv.csv")
    parser.add_argument("out_dir", type=Path, help="the directory for messages.tsv, tombstones.tsv and produced.json")
    arguments = parser.parse_args()

    rows = read_rows(arguments.data_dir)
    if not rows:
        sys.exit(f"error: {arguments.data_dir} has no rows")
    shift = shift_days(rows, time.time_ns() // 100)
    produced = write_messages(rows, shift, arguments.out_dir)
    with open(arguments.out_dir / "produced.json", "w", encoding="utf-8") as out:
        json.dump(produced, out, indent=2)
        out.write("\n")

    first, last = rows[0], rows[-1]
    print(
        f"Shifted the trace by {shift} days: {first.date} {first.time_of_day} to {last.date} {last.time_of_day} UTC "
        f"is now {event_time(first.date, first.time_of_day, shift)} to {event_time(last.date, last.time_of_day, shift)}")
    malformed = sum(entry["count"] for entry in produced["dead_letters"].values())
    print(
        f"Wrote {produced['messages']} messages: {produced['events']} events, {produced['resends']} re-sends, "
        f"{malformed} malformed")


if __name__ == "__main__":
    main()
