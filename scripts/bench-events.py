#!/usr/bin/env python3
"""Write the synthetic usage stream of scripts/bench as Kafka messages.

The events are shaped like the requests of the Azure LLM inference trace of scripts/data/.
Each is a CloudEvent 1.0 `llm.request` of about 300 bytes in structured JSON mode, from one of
10,000 subjects, with the model, input tokens and output tokens of the request. Every 50th message is
a byte-identical re-send of an event sent between 1 and 5,000 messages before, as a producer
sends after a lost acknowledgement. The key of every message is its subject.

Event times are spread evenly over the seconds that N events take at 50,000 events per second,
ending one minute before the script starts, so that the rollups receive what a live stream of
that rate produces. A fixed random seed makes the same N give the same events, apart from the
times.

Messages go to stdout as `key<TAB>value` lines, for `kcat -P -K '\\t'`; the values are ASCII and
contain no tab or newline. The expected totals go to the file given as TOTALS, as JSON.
"""

import argparse
import json
import random
import sys
import time

SUBJECT_COUNT = 10_000
RESEND_INTERVAL = 50
RESEND_MAX_DISTANCE = 5_000
EVENTS_PER_SECOND = 50_000
# Models with their share of requests, and the token ranges of their requests.
MODELS = [
    ("gpt-4o-2024-08-06", 50, (200, 8000), (20, 1200)),
    ("gpt-4o-mini-2024-07-18", 30, (50, 4000), (10, 800)),
    ("o1-preview-2024-09-12", 15, (500, 16000), (200, 4000)),
    ("text-embedding-3-large", 5, (10, 2000), (0, 0)),
]
REGIONS = ["eastus2", "westeurope", "swedencentral", "japaneast"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("count", type=int, help="the number of messages, re-sends included")
    parser.add_argument("totals", help="the file to write the expected totals to")
    arguments = parser.parse_args()
    if arguments.count < 1:
        sys.exit("error: the number of messages must be at least 1")

    generator = random.Random(20231116)
    model_names = [model[0] for model in MODELS]
    model_weights = [model[1] for model in MODELS]
    token_ranges = {model[0]: (model[2], model[3]) for model in MODELS}

    end_microseconds = int((time.time() - 60) * 1_000_000)
    span_microseconds = max(1, arguments.count * 1_000_000 // EVENTS_PER_SECOND)
    start_microseconds = end_microseconds - span_microseconds

    sent = []  # the lines of the events sent so far, for re-sends
    totals = {"messages": 0, "events": 0, "resends": 0, "input_tokens": 0, "output_tokens": 0, "requests": 0}
    by_model = {name: {"input_tokens": 0, "output_tokens": 0, "requests": 0} for name in model_names}
    output = sys.stdout
    lines = []
    for index in range(arguments.count):
        if index % RESEND_INTERVAL == RESEND_INTERVAL - 1 and sent:
            distance = generator.randint(1, min(RESEND_MAX_DISTANCE, len(sent)))
            lines.append(sent[-distance])
            totals["resends"] += 1
        else:
            model = generator.choices(model_names, model_weights)[0]
            input_range, output_range = token_ranges[model]
            input_tokens = generator.randint(*input_range)
            output_tokens = generator.randint(*output_range)
            subject = f"customer-{generator.randrange(SUBJECT_COUNT):05d}"
            micros = start_microseconds + span_microseconds * index // arguments.count
            event_time = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(micros // 1_000_000))
            event_time += f".{micros % 1_000_000:06d}Z"
            latency = generator.randint(80, 30_000)
            region = REGIONS[index % len(REGIONS)]
            value = (
                f'{{"specversion":"1.0","id":"chatcmpl-{index:012d}","source":"//llm-gateway/{region}",'
                f'"type":"llm.request","subject":"{subject}","time":"{event_time}",'
                f'"datacontenttype":"application/json","data":{{"model":"{model}",'
                f'"input_tokens":{input_tokens},"output_tokens":{output_tokens},"latency_ms":{latency},'
                f'"status":"succeeded"}}}}'
            )
            line = f"{subject}\t{value}\n"
            sent.append(line)
            if len(sent) > 2 * RESEND_MAX_DISTANCE:
                del sent[:RESEND_MAX_DISTANCE]
            lines.append(line)
            totals["events"] += 1
            totals["input_tokens"] += input_tokens
            totals["output_tokens"] += output_tokens
            totals["requests"] += 1
            by_model[model]["input_tokens"] += input_tokens
            by_model[model]["output_tokens"] += output_tokens
            by_model[model]["requests"] += 1
        totals["messages"] += 1
        if len(lines) >= 10_000:
            output.write("".join(lines))
            lines.clear()
    output.write("".join(lines))
    output.flush()

    totals["by_model"] = by_model
    with open(arguments.totals, "w", encoding="utf-8") as file:
        json.dump(totals, file, indent=2, sort_keys=True)
        file.write("\n")


if __name__ == "__main__":
    main()
