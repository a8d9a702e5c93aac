#!/usr/bin/env python3
"""The chaos check of scripts/chaos: produce a known stream, break things, compare every number.

scripts/chaos starts a throwaway PostgreSQL and calls this with the tally binary. This script:

1. starts `tally dev-broker` with the topic `usage` of 8 partitions and runs `tally migrate`;
2. builds a known stream of events (2% exact re-sends, conflicting re-uses of an id, malformed
   messages, events over 180 minutes and 400 subjects) and produces it with zstd compression, in
   chunks spread over the fault phase, each partition in order, so that each message's offset is
   known;
3. runs the workers and, for the given duration, at random: kills a worker with SIGKILL and starts
   another, adds or removes (SIGTERM, must exit 0) a worker, restarts PostgreSQL with a fast or an
   immediate stop, takes the broker down and up;
4. waits until every stored offset reaches its partition's log end;
5. compares the ledger, rollups, duplicates and dead letters with totals computed from what was
   produced: per meter, subject and minute, and the accepted, duplicate and dead-letter counts. It
   checks that every offset below every stored offset has exactly one outcome, that the committed
   batches of each partition chain without overlap, and that any offsets the broker pruned before
   they were read are recorded as retention gaps.

Every loop is bounded by count and time. The seed of the random choices is printed first.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from datetime import datetime, timedelta, timezone
from decimal import Decimal

TOPIC = "usage"
PARTITIONS = 8
SUBJECTS = 400
MODELS = ["model-a", "model-b", "model-c"]
SOURCE = "chaos-gateway"
RESEND_SHARE = 0.02
CONFLICT_SHARE = 0.001
MALFORMED_SHARE = 0.003
CHUNKS = 20
MAX_WORKERS = 5
MAX_ACTIONS = 200
SHUTDOWN_TIMEOUT = 10
DRAIN_TIMEOUT = 600

failures = []


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fail(message):
    failures.append(message)
    log(f"MISMATCH: {message}")


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tally", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    arguments = parser.parse_args()
    if arguments.events < 1000 or arguments.duration < 1 or not 1 <= arguments.workers <= MAX_WORKERS:
        parser.error("--events must be at least 1000, --duration at least 1, --workers from 1 to 5")
    return arguments


# MARK: The stream


def generate(rng, event_count, now):
    """Returns per partition the list of messages in produce order: (key, value, kind, detail)."""
    subjects = [f"cust-{index:04d}" for index in range(SUBJECTS)]
    partition_of = {subject: zlib.crc32(subject.encode()) % PARTITIONS for subject in subjects}
    keyed = [[] for _ in range(PARTITIONS)]  # (sort position, message)
    span = 180 * 60 * 1_000_000
    for index in range(event_count):
        subject = rng.choice(subjects)
        moment = now - timedelta(minutes=2, microseconds=rng.randrange(span))
        event = {
            "specversion": "1.0",
            "id": f"ev-{index}",
            "source": SOURCE,
            "type": "llm.request",
            "subject": subject,
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "data": {
                "model": rng.choice(MODELS),
                "tokens": rng.randint(1, 5000),
                "cost": f"0.{rng.randrange(1, 1_000_000):06d}",
            },
        }
        value = json.dumps(event, separators=(",", ":"))
        partition = partition_of[subject]
        position = len(keyed[partition])
        keyed[partition].append((position, (subject, value, "event", None)))
        draw = rng.random()
        if draw < RESEND_SHARE:
            # A producer retry: the same bytes again, soon or much later, in the same partition.
            later = position + rng.choice([0.5, rng.randint(1, 50) + 0.5, rng.randint(100, 8000) + 0.5])
            keyed[partition].append((later, (subject, value, "event", None)))
        elif draw < RESEND_SHARE + CONFLICT_SHARE:
            # A buggy client re-using the id with another payload.
            event["data"]["tokens"] += 1
            conflict = json.dumps(event, separators=(",", ":"))
            keyed[partition].append((position + rng.randint(1, 500) + 0.5, (subject, conflict, "event", None)))
        elif draw < RESEND_SHARE + CONFLICT_SHARE + MALFORMED_SHARE:
            reason, text = malformed(rng, index, subject, moment)
            keyed[partition].append((position + 0.25, (subject, text, "bad", reason)))
    streams = []
    for entries in keyed:
        entries.sort(key=lambda entry: entry[0])
        streams.append([message for _, message in entries])
    return streams


def malformed(rng, index, subject, moment):
    """Return a message that gets a known dead-letter reason."""
    time_text = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    base = f'"specversion":"1.0","id":"bad-{index}","source":"{SOURCE}","type":"llm.request","subject":"{subject}"'
    choice = rng.randrange(5)
    if choice == 0:
        return "malformed_json", '{"specversion":"1.0","id":"bad-' + str(index)
    if choice == 1:
        return "missing_attribute", '{"specversion":"1.0","id":"bad-%d","type":"llm.request","subject":"%s","time":"%s"}' % (
            index, subject, time_text)
    if choice == 2:
        return "invalid_time", "{%s,\"time\":\"yesterday\",\"data\":{\"model\":\"x\",\"tokens\":1,\"cost\":1}}" % base
    if choice == 3:
        return "invalid_value", "{%s,\"time\":\"%s\",\"data\":{\"model\":\"x\",\"tokens\":\"lots\",\"cost\":1}}" % (base, time_text)
    return "not_an_object", "[1,2,3]"


def expected_outcomes(streams, log_starts):
    """Replays the stream the way Tally must decide it, leaving out offsets below each log start.

    A key's messages all share one subject, so they are in one partition, and the replay in
    offset order decides exactly what any interleaving of partitions decides.
    """
    seen = {}
    totals = {"accepted": 0, "duplicates": 0, "dead_letters": {}}
    cells = {}  # (meter, subject, minute) -> [count, sum]
    for partition, messages in enumerate(streams):
        for offset, (_, value, kind, reason) in enumerate(messages):
            if offset < log_starts[partition]:
                continue
            if kind == "bad":
                totals["dead_letters"][reason] = totals["dead_letters"].get(reason, 0) + 1
                continue
            event = json.loads(value)
            key = (event["source"], event["id"])
            if key in seen:
                if seen[key] == value:
                    totals["duplicates"] += 1
                else:
                    totals["dead_letters"]["duplicate_id_conflict"] = totals["dead_letters"].get("duplicate_id_conflict", 0) + 1
                continue
            seen[key] = value
            totals["accepted"] += 1
            minute = event["time"][:16].replace("T", " ")
            data = event["data"]
            for meter, amount in (("tokens", Decimal(data["tokens"])), ("cost", Decimal(data["cost"])), ("requests", Decimal(1))):
                cell = cells.setdefault((meter, event["subject"], minute), [0, Decimal(0)])
                cell[0] += 1
                cell[1] += amount
    return totals, cells


# MARK: Processes


class Cluster:
    """PostgreSQL, the broker, the workers and the producer."""

    def __init__(self, arguments):
        self.arguments = arguments
        self.tally = arguments.tally
        self.work_dir = arguments.work_dir
        self.pg_dir = os.environ["TALLY_PG_DIR"]
        self.pg_bin = os.environ["PG_BIN_DIR"]
        self.pg_options = os.environ["TALLY_PG_OPTIONS"]
        self.broker = None
        self.bootstrap = None
        self.workers = []  # [Popen, log path, number]
        self.worker_count = 0
        self.config = os.path.join(self.work_dir, "tally.yaml")
        self.actions = {}
        self.produced = [0] * PARTITIONS

    def count(self, action):
        self.actions[action] = self.actions.get(action, 0) + 1

    # PostgreSQL

    def pg_ctl(self, *arguments):
        command = [os.path.join(self.pg_bin, "pg_ctl"), "-D", os.path.join(self.pg_dir, "data"), *arguments]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def pg_stop(self, mode):
        self.pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def pg_start(self):
        self.pg_ctl("-l", os.path.join(self.pg_dir, "server.log"), "-o", self.pg_options, "-w", "-t", "60", "start")

    def psql(self, sql):
        result = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True, timeout=300)
        return [line.split("\t") for line in result.stdout.splitlines() if line]

    # Kafka

    def start_broker(self):
        bootstrap_file = os.path.join(self.work_dir, "bootstrap")
        self.broker = subprocess.Popen(
            [self.tally, "dev-broker", "--topic", f"{TOPIC}:{PARTITIONS}", "--bootstrap-file", bootstrap_file],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work_dir, "broker.log"), "w"))
        for _ in range(300):
            if os.path.exists(bootstrap_file) and os.path.getsize(bootstrap_file) > 0:
                break
            if self.broker.poll() is not None:
                sys.exit("error: tally dev-broker exited before it was ready")
            time.sleep(0.1)
        else:
            sys.exit("error: tally dev-broker wrote no bootstrap address within 30 s")
        self.bootstrap = open(bootstrap_file).read().strip()

    def broker_signal(self, number):
        self.broker.send_signal(number)

    def produce(self, partition, lines):
        """Produces lines `key<TAB>value` to one partition, in order, and waits for delivery.

        The idempotent producer delivers a prefix of the lines when it fails, so a failed
        attempt is resumed after the messages the partition's log end shows delivered: every
        message lands exactly once, at a known offset. At most 5 attempts.
        """
        start = self.produced[partition]
        done = 0
        for attempt in range(5):
            path = os.path.join(self.work_dir, f"chunk-{partition}.tsv")
            with open(path, "w") as file:
                file.write("".join(f"{key}\t{value}\n" for key, value in lines[done:]))
            with open(path) as source:
                result = subprocess.run(
                    ["kcat", "-P", "-b", self.bootstrap, "-t", TOPIC, "-p", str(partition), "-z", "zstd", "-K",
                     "\t", "-X", "linger.ms=50", "-X", "enable.idempotence=true"],
                    stdin=source, capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                self.produced[partition] = start + len(lines)
                return
            self.check_broker()
            log(f"kcat failed to produce to partition {partition} (attempt {attempt + 1}): "
                f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
            time.sleep(2)
            done = self.log_end(partition) - start
            if not 0 <= done <= len(lines):
                sys.exit(f"error: partition {partition} holds {done} messages of a chunk of {len(lines)}")
        sys.exit(f"error: kcat failed to produce to partition {partition} five times")

    def log_end(self, partition):
        """Return the log end of a partition, requested with kcat until the broker responds (at most 30 s)."""
        for _ in range(30):
            result = subprocess.run(
                ["kcat", "-Q", "-b", self.bootstrap, "-t", f"{TOPIC}:{partition}:-1"],
                capture_output=True, text=True, timeout=60)
            for line in result.stdout.splitlines():
                # "usage [3] offset 1234"
                parts = line.split()
                if result.returncode == 0 and len(parts) >= 4 and parts[2] == "offset":
                    return int(parts[3])
            time.sleep(1)
        sys.exit(f"error: cannot read the log end of partition {partition}")

    def check_broker(self):
        if self.broker.poll() is not None:
            sys.exit(f"error: tally dev-broker exited with status {self.broker.returncode}; see broker.log")

    # Workers

    def write_config(self):
        with open(self.config, "w") as file:
            file.write(f"""kafka:
  brokers: {self.bootstrap}
  topics: [{TOPIC}]
  group_id: tally-chaos
  properties:
    session.timeout.ms: "6000"
    heartbeat.interval.ms: "500"
    client.id: tally-chaos
ingest:
  shutdown_timeout: {SHUTDOWN_TIMEOUT}s
  no_progress_timeout: 30s
log:
  level: info
meters:
  - slug: tokens
    event_type: llm.request
    aggregation: sum
    value: $.data.tokens
    group_by:
      model: $.data.model
  - slug: cost
    event_type: llm.request
    aggregation: sum
    value: $.data.cost
  - slug: requests
    event_type: llm.request
    aggregation: count
""")

    def start_worker(self):
        self.worker_count += 1
        path = os.path.join(self.work_dir, f"worker-{self.worker_count}.log")
        process = subprocess.Popen(
            [self.tally, "run", "--config", self.config], stdout=subprocess.DEVNULL, stderr=open(path, "w"))
        self.workers.append([process, path, self.worker_count])
        return self.worker_count

    def check_workers(self):
        """A worker that exits by itself is a failure; it is replaced."""
        for entry in list(self.workers):
            process, path, number = entry
            status = process.poll()
            if status is not None:
                self.workers.remove(entry)
                fail(f"worker {number} exited by itself with status {status}; see {path}")
                self.start_worker()

    def stop_worker(self, entry, graceful):
        process, path, number = entry
        self.workers.remove(entry)
        if graceful:
            process.send_signal(signal.SIGTERM)
            try:
                status = process.wait(timeout=SHUTDOWN_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                fail(f"worker {number} did not stop within {SHUTDOWN_TIMEOUT + 5} s of SIGTERM")
                return
            if status != 0:
                fail(f"worker {number} exited with status {status} after SIGTERM; see {path}")
        else:
            process.kill()
            process.wait()

    def stop_everything(self):
        for entry in list(self.workers):
            entry[0].kill()
            entry[0].wait()
        self.workers = []
        if self.broker and self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                self.broker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.broker.kill()

    def stats(self):
        result = subprocess.run(
            [self.tally, "stats", "--config", self.config, "--json"], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)


# MARK: Faults


def chaos(cluster, rng, arguments, chunks):
    """Runs random faults for the duration, producing one chunk per step. Returns the chunks left."""
    actions = [
        ("kill -9 a worker and start another", 3.0),
        ("add a worker", 1.5),
        ("remove a worker with SIGTERM", 1.5),
        ("restart PostgreSQL, fast stop", 1.5),
        ("restart PostgreSQL, immediate stop", 1.5),
        ("take the broker down and up", 1.5),
    ]
    names = [name for name, _ in actions]
    weights = [weight for _, weight in actions]
    started = time.monotonic()
    step = 0
    while time.monotonic() - started < arguments.duration and step < MAX_ACTIONS:
        step += 1
        if chunks:
            chunks.pop(0)()
        cluster.check_workers()
        cluster.check_broker()
        action = rng.choices(names, weights)[0]
        if action == "add a worker" and len(cluster.workers) >= MAX_WORKERS:
            action = "remove a worker with SIGTERM"
        if action == "remove a worker with SIGTERM" and len(cluster.workers) <= 1:
            action = "add a worker"
        elapsed = time.monotonic() - started
        if action == "kill -9 a worker and start another":
            entry = rng.choice(cluster.workers)
            cluster.stop_worker(entry, graceful=False)
            time.sleep(rng.uniform(0, 2))
            number = cluster.start_worker()
            log(f"{elapsed:5.1f}s  killed worker {entry[2]} with SIGKILL, started worker {number}")
        elif action == "add a worker":
            number = cluster.start_worker()
            log(f"{elapsed:5.1f}s  added worker {number} ({len(cluster.workers)} running)")
        elif action == "remove a worker with SIGTERM":
            entry = rng.choice(cluster.workers)
            cluster.stop_worker(entry, graceful=True)
            log(f"{elapsed:5.1f}s  removed worker {entry[2]} with SIGTERM ({len(cluster.workers)} running)")
        elif action.startswith("restart PostgreSQL"):
            mode = "fast" if "fast" in action else "immediate"
            down = rng.uniform(0.5, 5)
            cluster.pg_stop(mode)
            time.sleep(down)
            cluster.pg_start()
            log(f"{elapsed:5.1f}s  restarted PostgreSQL ({mode} stop, down {down:.1f} s)")
        else:
            down = rng.uniform(1, 8)
            cluster.broker_signal(signal.SIGUSR1)
            time.sleep(down)
            cluster.broker_signal(signal.SIGUSR2)
            log(f"{elapsed:5.1f}s  broker down for {down:.1f} s, then up")
            time.sleep(1)
        cluster.count(action)
        time.sleep(rng.uniform(0.5, 2.5))
    return chunks


def wait_for_drain(cluster, produced):
    """Waits until every partition's stored offset reaches its log end. Returns the stats."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        cluster.check_workers()
        stats = cluster.stats()
        if stats:
            rows = {row["partition"]: row for row in stats["partitions"]}
            last = {partition: (row.get("stored_offset"), row.get("log_end")) for partition, row in rows.items()}
            if all(
                rows.get(partition, {}).get("log_end") == produced[partition]
                and (rows[partition].get("stored_offset") or 0) >= produced[partition]
                for partition in range(PARTITIONS)
                if produced[partition] > 0
            ):
                return stats
        time.sleep(2)
    sys.exit(f"error: the workers did not reach the log ends within {DRAIN_TIMEOUT} s: {last}")


# MARK: Comparison


def compare(cluster, streams, stats):
    produced = [len(messages) for messages in streams]
    rows = {row["partition"]: row for row in stats["partitions"]}
    log_starts = [rows[partition]["log_start"] or 0 for partition in range(PARTITIONS)]
    totals, cells = expected_outcomes(streams, log_starts)

    print()
    print("Partitions (messages produced, log start, first and stored offset):")
    offsets = {int(partition): (int(first), int(next_offset)) for partition, first, next_offset in cluster.psql(
        "SELECT partition, first_offset, next_offset FROM tally.partition_offsets WHERE topic = 'usage'")}
    for partition in range(PARTITIONS):
        first, stored = offsets.get(partition, (None, None))
        print(f"  usage[{partition}]  produced {produced[partition]:7d}  log start {log_starts[partition]:6d}  "
              f"first {first}  stored {stored}")
        if stored != produced[partition]:
            fail(f"usage[{partition}]: stored offset {stored}, expected the log end {produced[partition]}")

    gaps = cluster.psql("SELECT partition, from_offset, to_offset, reason FROM tally.offset_gaps ORDER BY 1, 2")
    for partition, low, high, reason in gaps:
        partition, low, high = int(partition), int(low), int(high)
        if reason != "retention" or high >= log_starts[partition]:
            fail(f"usage[{partition}]: gap {low}..{high} ({reason}) where messages exist")
    for partition in range(PARTITIONS):
        if log_starts[partition] > 0:
            first = offsets.get(partition, (0, 0))[0]
            covered = sum(int(high) - int(low) + 1 for p, low, high, reason in gaps
                          if int(p) == partition and reason == "retention")
            if covered + first < log_starts[partition]:
                fail(f"usage[{partition}]: the broker pruned offsets below {log_starts[partition]} without a recorded gap")
            print(f"  usage[{partition}]: the broker pruned {log_starts[partition]} offsets; {covered} recorded as retention gaps")

    accepted = int(cluster.psql("SELECT count(*) FROM tally.ledger")[0][0])
    duplicates = int(cluster.psql("SELECT count(*) FROM tally.duplicates")[0][0])
    dead = {reason: int(count) for reason, count in cluster.psql(
        "SELECT reason, count(*) FROM tally.dead_letters GROUP BY 1")}
    print()
    print(f"{'':36s} {'expected':>10s} {'tally':>10s}")
    print(f"{'accepted':36s} {totals['accepted']:10d} {accepted:10d}")
    print(f"{'duplicates':36s} {totals['duplicates']:10d} {duplicates:10d}")
    for reason in sorted(set(totals["dead_letters"]) | set(dead)):
        print(f"{'dead letter ' + reason:36s} {totals['dead_letters'].get(reason, 0):10d} {dead.get(reason, 0):10d}")
    if accepted != totals["accepted"]:
        fail(f"accepted: expected {totals['accepted']}, Tally has {accepted}")
    if duplicates != totals["duplicates"]:
        fail(f"duplicates: expected {totals['duplicates']}, Tally has {duplicates}")
    if dead != totals["dead_letters"]:
        fail(f"dead letters: expected {totals['dead_letters']}, Tally has {dead}")

    stored_cells = {}
    for meter, subject, minute, count, total in cluster.psql(
            """SELECT meter, subject, to_char(minute AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'),
                      sum(event_count), sum(sum) FROM tally.rollups GROUP BY 1, 2, 3"""):
        stored_cells[(meter, subject, minute)] = [int(count), Decimal(total)]
    differing = [key for key in set(cells) | set(stored_cells) if cells.get(key) != stored_cells.get(key)]
    print()
    print(f"rollup cells (meter, subject, minute): expected {len(cells)}, Tally {len(stored_cells)}, differing {len(differing)}")
    for meter in ("tokens", "cost", "requests"):
        expected_sum = sum(cell[1] for key, cell in cells.items() if key[0] == meter)
        stored_sum = sum(cell[1] for key, cell in stored_cells.items() if key[0] == meter)
        print(f"  {meter:10s} total expected {expected_sum}, Tally {stored_sum}")
    subjects = len({key[1] for key in cells})
    minutes = len({key[2] for key in cells})
    print(f"  over {subjects} subjects and {minutes} minutes")
    for key in sorted(differing)[:10]:
        fail(f"rollup {key}: expected {cells.get(key)}, Tally has {stored_cells.get(key)}")
    if len(differing) > 10:
        fail(f"... and {len(differing) - 10} more rollup cells differ")

    mismatches = int(cluster.psql("SELECT count(*) FROM tally.rollup_mismatches")[0][0])
    print(f"rollups that differ from the ledger (tally.rollup_mismatches): {mismatches}")
    if mismatches:
        fail(f"{mismatches} rollups differ from the ledger rows they sum")

    outcome_errors = int(cluster.psql("""
        WITH outcomes AS (
            SELECT kafka_partition AS partition, kafka_offset AS o FROM tally.ledger
            UNION ALL SELECT kafka_partition, kafka_offset FROM tally.duplicates
            UNION ALL SELECT kafka_partition, kafka_offset FROM tally.dead_letters
            UNION ALL SELECT g.partition, o FROM tally.offset_gaps g, generate_series(g.from_offset, g.to_offset) o
        ), expected AS (
            SELECT p.partition, o FROM tally.partition_offsets p, generate_series(p.first_offset, p.next_offset - 1) o
        ), counted AS (
            SELECT coalesce(e.partition, x.partition) AS partition, coalesce(e.o, x.o) AS o,
                   count(e.o) AS wanted, count(x.o) AS found
            FROM expected e FULL JOIN outcomes x ON x.partition = e.partition AND x.o = e.o
            GROUP BY 1, 2
        )
        SELECT count(*) FROM counted WHERE wanted <> 1 OR found <> 1""")[0][0])
    print(f"offsets without exactly one outcome, or with an outcome beyond the stored offset: {outcome_errors}")
    if outcome_errors:
        fail(f"{outcome_errors} offsets have no outcome, several, or lie beyond the stored offset")

    chain = cluster.psql("""
        WITH chain AS (
            SELECT partition, from_offset, next_offset,
                   lag(next_offset) OVER (PARTITION BY partition ORDER BY from_offset) AS previous_next
            FROM tally.batches WHERE backfill_run IS NULL
        )
        SELECT count(*), count(*) FILTER (WHERE previous_next IS NOT NULL AND previous_next <> from_offset)
        FROM chain""")[0]
    batches, breaks = int(chain[0]), int(chain[1])
    print(f"committed batches: {batches}; overlaps or holes between them: {breaks}")
    if breaks:
        fail(f"{breaks} committed batches overlap or leave a hole: an offset owned by two batches or by none")


def main():
    arguments = parse_arguments()
    rng = random.Random(arguments.seed)
    print(f"chaos seed {arguments.seed} (replay with: scripts/chaos --seed {arguments.seed} --events {arguments.events} "
          f"--duration {arguments.duration:g} --workers {arguments.workers})", flush=True)

    cluster = Cluster(arguments)
    try:
        return run(cluster, rng, arguments)
    finally:
        cluster.stop_everything()


def run(cluster, rng, arguments):
    now = datetime.now(timezone.utc)
    streams = generate(rng, arguments.events, now)
    produced = [len(messages) for messages in streams]
    log(f"generated {arguments.events} events as {sum(produced)} messages over {PARTITIONS} partitions")

    cluster.start_broker()
    cluster.write_config()
    subprocess.run([cluster.tally, "migrate", "--config", cluster.config], check=True, stderr=subprocess.DEVNULL)
    log(f"broker on {cluster.bootstrap}; PostgreSQL data in {cluster.pg_dir}")

    chunk_size = [-(-count // CHUNKS) for count in produced]

    def chunk(index):
        def produce():
            for partition in range(PARTITIONS):
                part = streams[partition][index * chunk_size[partition]:(index + 1) * chunk_size[partition]]
                if part:
                    cluster.produce(partition, [(key, value) for key, value, _, _ in part])
        return produce

    chunks = [chunk(index) for index in range(CHUNKS)]
    chunks.pop(0)()
    for _ in range(arguments.workers):
        cluster.start_worker()
    log(f"started {arguments.workers} workers; faults for {arguments.duration:g} s")
    started = time.monotonic()
    chunks = chaos(cluster, rng, arguments, chunks)
    log(f"faults over after {time.monotonic() - started:.1f} s: " +
        ", ".join(f"{name} ×{count}" for name, count in sorted(cluster.actions.items())))

    for produce in chunks:
        produce()
    while len(cluster.workers) < arguments.workers:
        cluster.start_worker()
    stats = wait_for_drain(cluster, produced)
    log(f"lag is zero after {time.monotonic() - started:.1f} s")

    for entry in list(cluster.workers):
        cluster.stop_worker(entry, graceful=True)
    log("stopped the workers with SIGTERM")

    compare(cluster, streams, stats)
    print()
    actions = sum(cluster.actions.values())
    if failures:
        print(f"chaos FAILED with seed {arguments.seed}: {len(failures)} mismatches after {actions} faults")
        for message in failures:
            print(f"  {message}")
        return 1
    print(f"chaos passed with seed {arguments.seed}: every number exact after {actions} faults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
