import Foundation
import Kafka
import Postgres
import Synchronization
import Tally
import Testing

/// Inputs that broke other metering pipelines, each with the exact outcome Tally gives. Every
/// case runs the worker against the mock cluster and PostgreSQL, then checks the invariants.
@Suite("Field cases")
struct FieldCaseTests {
    static let t0 = "2025-01-15T12:00:10Z"

    // MARK: Duplicates and the window

    @Test func duplicatesInOneBatchNeverFailIt() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try await storeE0(kafka: kafka, schema: schema)
            try kafka.produce(Self.duplicateBatch, partition: 0)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            try expectDuplicateBatchOutcome(schema)
        }
    }

    @Test func failureBeforeCommitHidesTheBatchAndRetries() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try await storeE0(kafka: kafka, schema: schema)
            // A deferred trigger fails the first COMMIT that would store e2, after every row of
            // the batch was written. A sequence counts the attempts, because a rollback undoes
            // table writes but not nextval.
            try schema.connection.executeScript(
                """
                CREATE SEQUENCE \(schema.name).commit_attempts;
                CREATE FUNCTION \(schema.name).fail_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF nextval('\(schema.name).commit_attempts') = 1 THEN
                        RAISE EXCEPTION 'injected failure before commit' USING ERRCODE = '40001';
                    END IF;
                    RETURN NULL;
                END $$;
                CREATE CONSTRAINT TRIGGER fail_first_commit AFTER INSERT ON \(schema.name).ledger
                    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.event_id = 'e2')
                    EXECUTE FUNCTION \(schema.name).fail_first_commit();
                """)

            let monitor = try BatchVisibilityMonitor(schema: schema)
            try kafka.produce(Self.duplicateBatch, partition: 0)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let seen = try await monitor.stop()

            #expect(try schema.scalar("SELECT last_value FROM {s}.commit_attempts") == "2")
            #expect(seen.contains("none"))
            #expect(seen.contains("all"))
            #expect(!seen.contains("partial"), "a snapshot showed part of the batch: \(seen)")
            try expectDuplicateBatchOutcome(schema)
        }
    }

    @Test func replayIsDuplicateInsideTheWindow() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let clock = try clockNearT0()
            let event = Self.event("e1", "cust-1", "5")
            try kafka.produce([event])
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)

            clock.set(try time("2025-01-16T12:00:10Z"))
            try kafka.produce([event])
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)

            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 1)
            #expect(try schema.query("SELECT kafka_offset::text FROM {s}.duplicates") == [["1"]])
            #expect(try schema.count("SELECT count(*) FROM {s}.dead_letters") == 0)
            #expect(try rollup(schema, "api_calls", "cust-1") == "5")
            try schema.expectInvariants()
        }
    }

    @Test func replayPastTheWindowIsTooLate() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let clock = try clockNearT0()
            let event = Self.event("e1", "cust-1", "5")
            try kafka.produce([event])
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)

            clock.set(try time("2025-02-24T12:00:10Z"))
            try kafka.produce([event])
            try await ingestAll(kafka: kafka, schema: schema, clock: clock) { configuration in
                configuration.ingest.dedupeWindowMicroseconds = 35 * EventTime.microsecondsPerDay
            }

            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 1)
            #expect(try deadLetters(schema) == [["0", "1", "too_late"]])
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 0)
            #expect(try rollup(schema, "api_calls", "cust-1") == "5")
            try schema.expectInvariants()
        }
    }

    // MARK: Time

    @Test func rfc3339TimeIsNeverANumber() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                Self.event("t1", "cust-1", "1", time: "2024-12-10T17:36:46Z"),
                Self.event("t2", "cust-1", "1", time: "2024-12-10T17:36:52.356Z"),
                Self.event("t3", "cust-1", "1", time: "2024"),
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: ManualClock(try time("2024-12-10T18:00:00Z")))

            #expect(
                try eventTimes(schema) == [
                    ["t1", "2024-12-10T17:36:46.000000Z"], ["t2", "2024-12-10T17:36:52.356000Z"],
                ])
            #expect(try rollup(schema, "api_calls", "cust-1", minute: "2024-12-10T17:36:00Z") == "2")
            #expect(try deadLetters(schema) == [["0", "2", "invalid_time"]])
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger WHERE event_time < '1971-01-01Z'") == 0)
            try schema.expectInvariants()
        }
    }

    @Test func epochNumbersAndFarFutureAreDeadLetters() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            func withTime(_ id: String, _ time: String) -> String {
                #"{"specversion":"1.0","id":"\#(id)","source":"test","type":"api.call","subject":"cust-1","time":\#(time),"data":{"quantity":1}}"#
            }
            try kafka.produce([
                withTime("x1", "1733850000"),
                withTime("x2", "1733850000000"),
                withTime("x3", #""1733850000""#),
                withTime("x4", #""2099-01-01T00:00:00Z""#),
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            #expect(
                try deadLetters(schema) == [
                    ["0", "0", "invalid_time"], ["0", "1", "invalid_time"], ["0", "2", "invalid_time"],
                    ["0", "3", "time_in_future"],
                ])
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 0)
            #expect(try storedOffset(schema) == "4")
            try schema.expectInvariants()
        }
    }

    @Test func zoneOffsetsGiveOneResultInEveryWorkerZone() async throws {
        var results: [[[String?]]] = []
        for zone in ["UTC", "America/Los_Angeles"] {
            try await withTestSchema { schema in
                let kafka = try TestKafka()
                try kafka.produce([
                    Self.event("z1", "cust-1", "1", time: "2025-03-09T12:00:00-08:00"),
                    Self.event("z2", "cust-1", "1", time: "2025-03-09T12:00:00+05:45"),
                    Self.event("z3", "cust-1", "1", time: "2025-03-09T12:00:00"),
                ])
                try await runWorkerProcess(
                    kafka: kafka, schema: schema,
                    environment: ["TZ": zone, "TALLY_CLOCK_START": "2025-03-10T00:00:00Z"])

                #expect(
                    try eventTimes(schema) == [
                        ["z1", "2025-03-09T20:00:00.000000Z"], ["z2", "2025-03-09T06:15:00.000000Z"],
                    ], "TZ=\(zone)")
                let rows = try rollups(schema, "api_calls")
                #expect(
                    rows == [["cust-1", "2025-03-09T06:15:00Z", "1"], ["cust-1", "2025-03-09T20:00:00Z", "1"]],
                    "TZ=\(zone)")
                let rejected = try deadLetters(schema)
                #expect(rejected == [["0", "2", "invalid_time"]], "TZ=\(zone)")
                try schema.expectInvariants()
                results.append(rows + rejected + (try eventTimes(schema)))
            }
        }
        #expect(results.count == 2)
        #expect(results.first == results.last)
    }

    @Test func leapSecondStaysInItsMinute() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                Self.event("l1", "cust-1", "1", time: "2016-12-31T23:59:60Z"),
                Self.event("l2", "cust-1", "1", time: "2016-12-31T15:59:60-08:00"),
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: ManualClock(try time("2017-01-02T00:00:00Z")))

            #expect(
                try eventTimes(schema) == [
                    ["l1", "2016-12-31T23:59:59.999999Z"], ["l2", "2016-12-31T23:59:59.999999Z"],
                ])
            #expect(try rollup(schema, "api_calls", "cust-1", minute: "2016-12-31T23:59:00Z") == "2")
            #expect(try schema.count("SELECT count(*) FROM {s}.rollups WHERE meter = 'api_calls'") == 1)
            try schema.expectInvariants()
        }
    }

    @Test func lateEventsCountWhereTheyBelongAtAnyClock() async throws {
        var results: [[[String?]]] = []
        for now in ["2025-01-15T12:30:00Z", "2025-02-15T00:00:00Z"] {
            try await withTestSchema { schema in
                let kafka = try TestKafka()
                try kafka.produce([
                    Self.event("a", "cust-1", "1", time: "2025-01-15T12:05:10Z"),
                    Self.event("b", "cust-1", "1", time: "2025-01-15T12:00:10Z"),
                    Self.event("c", "cust-1", "1", time: "2025-01-13T12:00:10Z"),
                ])
                try await ingestAll(kafka: kafka, schema: schema, clock: ManualClock(try time(now)))

                let rows = try rollups(schema, "api_calls")
                #expect(
                    rows == [
                        ["cust-1", "2025-01-13T12:00:00Z", "1"], ["cust-1", "2025-01-15T12:00:00Z", "1"],
                        ["cust-1", "2025-01-15T12:05:00Z", "1"],
                    ], "clock \(now)")
                #expect(try schema.count("SELECT count(*) FROM {s}.dead_letters") == 0)
                try schema.expectInvariants()
                results.append(rows)
            }
        }
        #expect(results.count == 2)
        #expect(results.first == results.last)
    }

    // MARK: Numbers

    @Test func quantitiesStayExactDecimals() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                Self.event("q1", "cust-1", "0.1"),
                Self.event("q2", "cust-1", "0.2"),
                Self.event("q3", "cust-2", "0.691"),
                Self.event("q4", "cust-3", "9007199254740993"),
                Self.event("q5", "cust-4", "0.027121761950711698"),
                Self.event("q6", "cust-5", #""12.5""#),
                Self.event("q7", "cust-6", "12.5"),
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            #expect(try rollup(schema, "api_calls", "cust-1") == "0.3")
            #expect(
                try schema.query(
                    "SELECT event_id, meters -> 'api_calls' ->> 'quantity' FROM {s}.ledger WHERE subject <> 'cust-1' ORDER BY event_id"
                ) == [
                    ["q3", "0.691"], ["q4", "9007199254740993"], ["q5", "0.027121761950711698"], ["q6", "12.5"],
                    ["q7", "12.5"],
                ])
            let fromString = try rollup(schema, "api_calls", "cust-5")
            let fromNumber = try rollup(schema, "api_calls", "cust-6")
            #expect(fromString == fromNumber)
            #expect(try rollup(schema, "api_calls", "cust-3") == "9007199254740993")
            #expect(try rollup(schema, "api_calls", "cust-4") == "0.027121761950711698")
            try schema.expectInvariants()
        }
    }

    @Test func wrongTypesAndMissingValuesAreDeadLetters() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                Self.event("w1", "cust-1", #""abc""#),
                #"{"specversion":"1.0","id":"w2","source":"test","type":"api.call","subject":["cust-1"],"time":"\#(Self.t0)","data":{"quantity":1}}"#,
                #"{"specversion":"1.0","id":"w3","source":"test","type":"api.call","subject":"cust-1","time":"\#(Self.t0)","data":{}}"#,
                Self.event("w4", "cust-1", "4"),
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            #expect(
                try deadLetters(schema) == [
                    ["0", "0", "invalid_value"], ["0", "1", "invalid_attribute"], ["0", "2", "invalid_value"],
                ])
            #expect(try schema.query("SELECT event_id FROM {s}.ledger") == [["w4"]])
            #expect(try rollup(schema, "api_calls", "cust-1") == "4")
            #expect(try rollup(schema, "calls", "cust-1") == "1")
            #expect(try storedOffset(schema) == "4")
            try schema.expectInvariants()
        }
    }

    // MARK: Bytes

    @Test func duplicateJSONKeysAreRefused() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                #"{"specversion":"1.0","id":"d1","source":"test","type":"api.call","subject":"cust-1","time":"\#(Self.t0)","data":{"quantity":1,"quantity":-1}}"#,
                #"{"specversion":"1.0","id":"d2","id":"d3","source":"test","type":"api.call","subject":"cust-1","time":"\#(Self.t0)","data":{"quantity":1}}"#,
                Self.event("d4", "cust-1", "1"),
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            #expect(try deadLetters(schema) == [["0", "0", "duplicate_json_key"], ["0", "1", "duplicate_json_key"]])
            #expect(try schema.query("SELECT event_id FROM {s}.ledger") == [["d4"]])
            #expect(try rollup(schema, "api_calls", "cust-1") == "1")
            try schema.expectInvariants()
        }
    }

    @Test func tombstonesAndEmptyValuesAreDeadLetters() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([Array(Self.event("t1", "cust-1", "1").utf8)])
            try kafka.produce([nil], key: Array("cust-1".utf8))
            try kafka.produce([[]])
            try kafka.produce([Array(Self.event("t3", "cust-1", "1").utf8)])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            #expect(try deadLetters(schema) == [["0", "1", "null_value"], ["0", "2", "empty_value"]])
            #expect(
                try schema.scalar(
                    "SELECT convert_from(message_key, 'UTF8') FROM {s}.dead_letters WHERE kafka_offset = 1")
                    == "cust-1")
            #expect(try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_offset") == [["t1"], ["t3"]])
            #expect(try storedOffset(schema) == "4")
            try schema.expectInvariants()
        }
    }

    @Test func nulCharactersAreDeadLetters() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                #"{"specversion":"1.0","id":"n1","source":"test","type":"api.call","subject":"acme\u0000x","time":"\#(Self.t0)","data":{"quantity":1}}"#,
                #"{"specversion":"1.0","id":"n2","source":"test","type":"api.call","subject":"acme","time":"\#(Self.t0)","data":{"quantity":1,"note":"a\u0000b"}}"#,
                Self.event("n3", "acme", "1"),
            ])
            let logs = LogSink.capturing()
            try await ingestAll(
                kafka: kafka, schema: schema, clock: try clockNearT0(), logger: Logger(level: .warning, sink: logs))

            #expect(try deadLetters(schema) == [["0", "0", "nul_character"], ["0", "1", "nul_character"]])
            #expect(try schema.query("SELECT event_id FROM {s}.ledger") == [["n3"]])
            #expect(try rollup(schema, "api_calls", "acme") == "1")
            #expect(try schema.count("SELECT count(*) FROM {s}.rollups WHERE subject LIKE 'acme_%'") == 0)
            #expect(!logs.capturedLines.contains { $0.contains("SQLSTATE") }, "\(logs.capturedLines)")
            try schema.expectInvariants()
        }
    }

    @Test func poisonMessageNeverStallsItsPartition() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try failDeadLetterWrites(schema, times: 1)
            try producePoisonCase(kafka)

            let monitor = try StoredOffsetMonitor(schema: schema)
            let validated = try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let snapshots = try await monitor.stop()

            #expect(validated == 103, "each message is parsed once")
            #expect(try schema.scalar("SELECT last_value FROM {s}.dead_letter_attempts") == "2")
            #expect(!snapshots.contains(StoredOffsetMonitor.passedWithoutDeadLetter))
            try expectPoisonCaseOutcome(schema)
        }
    }

    @Test func failingDeadLetterHoldsOnlyItsPartition() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            // A batch with p0@1 fails three times, then p0@1 alone fails three times and p0 is
            // set aside. However the messages fall into batches, p1 is written within the first
            // twelve failures, so fourteen leave p0 held after p1 is done.
            try failDeadLetterWrites(schema, times: 14)
            try producePoisonCase(kafka)

            let monitor = try StoredOffsetMonitor(schema: schema)
            let validated = try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let snapshots = try await monitor.stop()

            #expect(try schema.scalar("SELECT last_value FROM {s}.dead_letter_attempts") == "15")
            #expect(!snapshots.contains(StoredOffsetMonitor.passedWithoutDeadLetter))
            #expect(
                snapshots.contains(StoredOffsetMonitor.otherPartitionDone), "p1 was held with p0: \(Set(snapshots))")
            #expect(validated > 103, "p0 is read again after it was set aside")
            try expectPoisonCaseOutcome(schema)
        }
    }

    /// Makes the first `times` attempts to store the dead letter of p0@1 fail, as a statement
    /// timeout would.
    private func failDeadLetterWrites(_ schema: TestSchema, times: Int) throws {
        try schema.connection.executeScript(
            """
            CREATE SEQUENCE \(schema.name).dead_letter_attempts;
            CREATE FUNCTION \(schema.name).fail_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('\(schema.name).dead_letter_attempts') <= \(times) THEN
                    RAISE EXCEPTION 'canceling statement due to statement timeout' USING ERRCODE = '57014';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER fail_dead_letter BEFORE INSERT ON \(schema.name).dead_letters
                FOR EACH ROW WHEN (NEW.kafka_partition = 0 AND NEW.kafka_offset = 1)
                EXECUTE FUNCTION \(schema.name).fail_dead_letter();
            """)
    }

    /// The 7 bytes ` {"id":` that no JSON parser accepts.
    static let poison: [UInt8] = Array(#" {"id":"#.utf8)

    /// Produces b1, the poison message and b3 to p0, and c0..c99 to p1.
    private func producePoisonCase(_ kafka: TestKafka) throws {
        #expect(Self.poison.count == 7)
        try kafka.produce([
            Array(Self.event("b1", "cust-1", "1").utf8), Self.poison, Array(Self.event("b3", "cust-1", "1").utf8),
        ])
        try kafka.produce((0..<100).map { Self.event("c\($0)", "cust-2", "1") }, partition: 1)
    }

    private func expectPoisonCaseOutcome(_ schema: TestSchema) throws {
        #expect(
            try schema.query(
                "SELECT reason, encode(message_value, 'hex') FROM {s}.dead_letters WHERE kafka_partition = 0 AND kafka_offset = 1"
            ) == [["malformed_json", Self.poison.hexString]])
        #expect(try schema.count("SELECT count(*) FROM {s}.dead_letters") == 1)
        #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 102)
        #expect(try rollup(schema, "api_calls", "cust-1") == "2")
        #expect(try rollup(schema, "api_calls", "cust-2") == "100")
        #expect(
            try schema.query("SELECT partition::text, next_offset::text FROM {s}.partition_offsets ORDER BY 1") == [
                ["0", "3"], ["1", "100"],
            ])
        try schema.expectInvariants()
    }

    // MARK: Inputs and checks shared by the cases

    /// `E(id, subject, quantity, time)`.
    static func event(_ id: String, _ subject: String, _ quantity: String, time: String = t0) -> String {
        apiCall(id, subject, quantity, time: time)
    }

    /// p0@0..4 of the duplicate case: e1, e2, e1 again byte for byte, e3, and e0, which is stored already.
    static let duplicateBatch = [
        event("e1", "cust-1", "2"), event("e2", "cust-1", "3"), event("e1", "cust-1", "2"), event("e3", "cust-1", "4"),
        event("e0", "cust-1", "1"),
    ]

    /// Stores `E(e0,cust-1,1,T0)` through partition 1, so that partition 0 starts empty.
    private func storeE0(kafka: TestKafka, schema: TestSchema) async throws {
        try kafka.produce([Self.event("e0", "cust-1", "1")], partition: 1)
        try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
        #expect(try rollup(schema, "api_calls", "cust-1") == "1")
        #expect(try rollup(schema, "calls", "cust-1") == "1")
    }

    private func expectDuplicateBatchOutcome(_ schema: TestSchema) throws {
        #expect(
            try schema.query("SELECT event_id FROM {s}.ledger WHERE kafka_partition = 0 ORDER BY kafka_offset") == [
                ["e1"], ["e2"], ["e3"],
            ])
        #expect(try rollup(schema, "api_calls", "cust-1") == "10")
        #expect(try rollup(schema, "calls", "cust-1") == "4")
        #expect(
            try schema.query("SELECT kafka_partition::text, kafka_offset::text FROM {s}.duplicates ORDER BY 2") == [
                ["0", "2"], ["0", "4"],
            ])
        #expect(try schema.count("SELECT count(*) FROM {s}.dead_letters") == 0)
        #expect(try storedOffset(schema, partition: 0) == "5")
        try schema.expectInvariants()
    }
}

// MARK: Worker process

/// Runs `tally run` as a child process with extra environment variables until it has stored
/// everything produced so far, then stops it with SIGTERM and expects exit status 0.
func runWorkerProcess(kafka: TestKafka, schema: TestSchema, environment: [String: String]) async throws {
    let configuration = try writeProcessConfiguration(
        kafka: kafka, schema: schema, groupID: "tally-test")
    defer { try? FileManager.default.removeItem(at: configuration) }
    let worker = try TallyProcess(["run", "--config", configuration.path], environment: environment)
    defer { worker.cleanUp() }

    for (partition, marks) in try kafka.watermarks() where marks.high > marks.low {
        try await waitForStoredOffset(schema, partition: partition, atLeast: marks.high)
    }
    worker.signal(SIGTERM)
    let exit = try await worker.waitForExit(timeoutSeconds: 30)
    #expect(exit?.status == 0, "tally run did not exit with 0 within 30 s of SIGTERM: \(String(describing: exit))")
    #expect(exit?.signaled == false)
}

// MARK: Queries

func time(_ text: String) throws -> EventTime {
    try EventTime.parseRFC3339(text)
}

/// Returns the value a meter reads from its rollup for one subject and minute: the sum, or the
/// count for `calls`.
func rollup(_ schema: TestSchema, _ meter: String, _ subject: String, minute: String = "2025-01-15T12:00:00Z")
    throws -> String?
{
    let rows = try schema.query(
        "SELECT CASE WHEN $1 = 'calls' THEN event_count::text ELSE sum::text END FROM {s}.rollups WHERE meter = $1 AND subject = $2 AND minute = $3::timestamptz",
        [meter, subject, minute])
    return rows.first?[0] ?? nil
}

/// Returns the rollups of one meter as (subject, minute in UTC, value), in that order.
func rollups(_ schema: TestSchema, _ meter: String) throws -> [[String?]] {
    try schema.query(
        """
        SELECT subject, to_char(minute AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
               CASE WHEN meter = 'calls' THEN event_count::text ELSE sum::text END
        FROM {s}.rollups WHERE meter = $1 ORDER BY 1, 2
        """, [meter])
}

/// Returns the dead letters as (partition, offset, reason), in Kafka order.
func deadLetters(_ schema: TestSchema) throws -> [[String?]] {
    try schema.query(
        "SELECT kafka_partition::text, kafka_offset::text, reason FROM {s}.dead_letters ORDER BY kafka_partition, kafka_offset"
    )
}

/// Returns the ledger's event ids with their times in UTC, to the microsecond.
func eventTimes(_ schema: TestSchema) throws -> [[String?]] {
    try schema.query(
        """
        SELECT event_id, to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        FROM {s}.ledger ORDER BY event_id
        """)
}

func storedOffset(_ schema: TestSchema, partition: Int = 0) throws -> String? {
    try schema.query("SELECT next_offset::text FROM {s}.partition_offsets WHERE partition = $1", [String(partition)])
        .first?[0] ?? nil
}

// MARK: Monitors

/// Polls a schema from its own connection while a worker runs, and hands each reading to a
/// check that returns a label for it.
///
/// It polls on a thread of its own: on Swift's cooperative pool, which has one thread per core,
/// tests that block in PostgreSQL calls could hold every thread and leave gaps in the readings.
/// After a stop request it takes one last reading, so the final state is always among them.
final class SnapshotMonitor: Sendable {
    private final class State: Sendable {
        let labels = Mutex<[String]>([])
        let stopRequested = Mutex(false)
        let failure = Mutex<String?>(nil)
        let finished = DispatchSemaphore(value: 0)
    }

    private let state = State()

    init(schema: TestSchema, sql: String, label: @escaping @Sendable ([[String?]]) -> String) throws {
        let connection = try PostgresConnection(conninfo: schema.settings.conninfo, applicationName: "tally tests")
        let query = sql.replacingOccurrences(of: "{s}", with: schema.name)
        let state = self.state
        nonisolated(unsafe) let unsafeConnection = connection
        Thread {
            defer {
                unsafeConnection.close()
                state.finished.signal()
            }
            do {
                while true {
                    let stopping = state.stopRequested.withLock { $0 }
                    let rows = try unsafeConnection.execute(query).rows
                    let reading = label(rows)
                    state.labels.withLock { $0.append(reading) }
                    if stopping { return }
                    usleep(2_000)
                }
            } catch {
                state.failure.withLock { $0 = String(describing: error) }
            }
        }.start()
    }

    /// Stops polling and returns every label seen, in order.
    func stop() async throws -> [String] {
        state.stopRequested.withLock { $0 = true }
        let state = self.state
        try await onOwnThread { state.finished.wait() }
        if let failure = state.failure.withLock({ $0 }) {
            throw SetupError("the snapshot monitor failed: \(failure)")
        }
        return state.labels.withLock { $0 }
    }
}

/// Watches partition 0 of the duplicate case and labels each snapshot `none`, `all` or `partial`.
struct BatchVisibilityMonitor {
    let monitor: SnapshotMonitor

    init(schema: TestSchema) throws {
        monitor = try SnapshotMonitor(
            schema: schema,
            sql: """
                SELECT (SELECT count(*) FROM {s}.ledger WHERE kafka_partition = 0)::text,
                       (SELECT count(*) FROM {s}.duplicates WHERE kafka_partition = 0)::text,
                       (SELECT coalesce(max(next_offset), 0) FROM {s}.partition_offsets WHERE partition = 0)::text
                """,
            label: { rows in
                switch (rows[0][0], rows[0][1], rows[0][2]) {
                case ("0", "0", "0"): "none"
                case ("3", "2", "5"): "all"
                default: "partial"
                }
            })
    }

    func stop() async throws -> [String] { try await monitor.stop() }
}

/// Watches the poison case. Labels a snapshot whose p0 stored offset passed 1 while the dead
/// letter of p0@1 is missing, and one where p1 is done while p0 is still at or below 1.
struct StoredOffsetMonitor {
    static let passedWithoutDeadLetter = "p0 passed offset 1 without its dead letter"
    static let otherPartitionDone = "p1 done while p0 is held"

    let monitor: SnapshotMonitor

    init(schema: TestSchema) throws {
        monitor = try SnapshotMonitor(
            schema: schema,
            sql: """
                SELECT (SELECT coalesce(max(next_offset), 0) FROM {s}.partition_offsets WHERE partition = 0),
                       (SELECT count(*) FROM {s}.dead_letters WHERE kafka_partition = 0 AND kafka_offset = 1),
                       (SELECT coalesce(max(next_offset), 0) FROM {s}.partition_offsets WHERE partition = 1)
                """,
            label: { rows in
                let p0 = Int(rows[0][0] ?? "0") ?? 0
                let p1 = Int(rows[0][2] ?? "0") ?? 0
                if p0 > 1 && rows[0][1] != "1" { return Self.passedWithoutDeadLetter }
                if p0 <= 1 && p1 == 100 { return Self.otherPartitionDone }
                return ""
            })
    }

    func stop() async throws -> [String] { try await monitor.stop() }
}
