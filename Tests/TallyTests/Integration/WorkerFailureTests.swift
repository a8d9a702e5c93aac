import Foundation
import Kafka
import Postgres
import Tally
import Testing

/// The worker when PostgreSQL rejects events, another consumer moves the offsets, or the log
/// no longer matches the stored offsets.
@Suite("Worker failures")
struct WorkerFailureTests {
    static let limits = ValidationLimits(
        maxPayloadBytes: 1 << 20, dedupeWindowMicroseconds: 35 * EventTime.microsecondsPerDay,
        maxFutureSkewMicroseconds: 5 * EventTime.microsecondsPerMinute)

    /// Returns the standard meters plus one with twelve group-by dimensions. With 256-byte values
    /// its rollup key is larger than a B-tree entry may be, so PostgreSQL rejects the event
    /// (SQLSTATE 54000).
    static func wideMeters() throws -> [Meter] {
        try standardMeters() + [
            Meter(
                slug: "wide", eventType: "api.call", aggregation: .count, valuePath: nil,
                groupBy: try (0..<12).map { GroupBy(name: "g\($0)", path: try JSONPath("$.data.g\($0)")) })
        ]
    }

    /// Returns an event whose twelve group-by values are 256 random letters each. They are random
    /// because PostgreSQL compresses index entries, and repeated letters would fit after compression.
    static func poisonEvent(id: String, subject: String) -> String {
        let letters = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        let groups = (0..<12).map { index in
            #""g\#(index)":"\#(String((0..<256).map { _ in letters.randomElement()! }))""#
        }.joined(separator: ",")
        return
            #"{"specversion":"1.0","id":"\#(id)","source":"test","type":"api.call","subject":"\#(subject)","time":"2025-01-15T12:00:10Z","data":{"quantity":1,\#(groups)}}"#
    }

    @Test func rejectedEventBecomesStorageRejected() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([apiCall("a"), Self.poisonEvent(id: "poison", subject: "c"), apiCall("b")])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0(), meters: try Self.wideMeters())

            #expect(try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_offset") == [["a"], ["b"]])
            let dead = try schema.query("SELECT kafka_offset::text, reason, event_id FROM {s}.dead_letters")
            #expect(dead == [["1", "storage_rejected", "poison"]])
            #expect(try schema.scalar("SELECT detail LIKE '%54000%' FROM {s}.dead_letters") == "t")
            try schema.expectInvariants()
        }
    }

    @Test func stopDuringOneByOneLeavesNoGap() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            var configuration = try testConfiguration(kafka: kafka, schema: schema, meters: try Self.wideMeters())
            configuration.ingest.batchMaxWaitMilliseconds = 1000
            let sink = LogSink.capturing()
            let worker = RunningWorker(
                configuration: configuration, clock: try clockNearT0(), logger: Logger(level: .info, sink: sink))
            try kafka.produce([apiCall("first")])
            try await worker.waitUntilCaughtUp(with: kafka)

            // A failure that is not about the event's content, once the poison has become a dead letter.
            try schema.query(
                """
                CREATE FUNCTION {s}.flaky() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  IF NEW.event_id = 'flaky' AND EXISTS (SELECT 1 FROM {s}.dead_letters) THEN
                    RAISE EXCEPTION 'canceling statement due to statement timeout' USING ERRCODE = 'query_canceled';
                  END IF;
                  RETURN NEW;
                END $$
                """)
            try schema.query(
                "CREATE TRIGGER flaky BEFORE INSERT ON {s}.ledger FOR EACH ROW EXECUTE FUNCTION {s}.flaky()")
            try kafka.produce([Self.poisonEvent(id: "poison", subject: "c"), apiCall("flaky"), apiCall("after")])

            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline, !sink.capturedLines.contains(where: { $0.contains("writing the batch failed") }) {
                try await Task.sleep(nanoseconds: 1_000_000)
            }
            try worker.stop()

            // "after" must not be written while "flaky", before it, is not.
            #expect(try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_offset") == [["first"]])
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == "2")
            #expect(try schema.count("SELECT count(*) FROM {s}.offset_gaps") == 0)

            try schema.query("DROP TRIGGER flaky ON {s}.ledger")
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0(), meters: try Self.wideMeters())
            #expect(
                try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_offset") == [
                    ["first"], ["flaky"], ["after"],
                ])
            try schema.expectInvariants()
        }
    }

    @Test func oneByOneSkipsAPartitionAnotherConsumerMoved() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            let clock = try clockNearT0()
            let meters = try Self.wideMeters()
            var configuration = try testConfiguration(kafka: kafka, schema: schema, meters: meters)
            // Long enough that the four messages of partition 1 and the poison message land in
            // one batch even on a loaded machine.
            configuration.ingest.batchMaxWaitMilliseconds = 5000
            let worker = RunningWorker(configuration: configuration, clock: clock)
            defer { try? worker.stop() }
            try kafka.produce([apiCall("p0-0")], partition: 0)
            try kafka.produce([apiCall("p1-0")], partition: 1)
            try await worker.waitUntilCaughtUp(with: kafka)

            // The worker's next batch sleeps in this trigger while holding the offset locks.
            try schema.query(
                """
                CREATE FUNCTION {s}.slow() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.subject = 'slow' THEN PERFORM pg_sleep(0.7); END IF; RETURN NEW; END $$
                """)
            try schema.query(
                "CREATE TRIGGER slow BEFORE INSERT ON {s}.rollups FOR EACH ROW EXECUTE FUNCTION {s}.slow()")
            let partitionOne = ["a", "b", "c", "d"].map { apiCall("p1-\($0)") }
            try kafka.produce(partitionOne, partition: 1)
            try kafka.produce([Self.poisonEvent(id: "poison", subject: "slow")], partition: 0)

            // Meanwhile another consumer, such as a new owner, writes offsets 1 to 3 of partition 1.
            let watcher = try PostgresConnection(conninfo: "", applicationName: "tally tests")
            let deadline = Date().addingTimeInterval(20)
            while Date() < deadline {
                // Other tests run at the same time, so only a sleep in this schema counts.
                let sleeping = try watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND strpos(query, $1) > 0",
                    [.text(schema.name)])
                if sleeping.int(row: 0, column: 0) == 1 { break }
                try await Task.sleep(nanoseconds: 5_000_000)
            }
            let other = try LedgerStore(settings: schema.settings, logger: schema.logger)
            let validator = EventValidator(meters: MeterSet(meters), limits: Self.limits)
            let writtenByOther = partitionOne.prefix(3).enumerated().map { index, text in
                let message = KafkaMessage(
                    topic: "usage", partition: 1, offset: Int64(index + 1), key: nil, value: Array(text.utf8))
                return ValidatedMessage(message: message, outcome: validator.validate(message.value, now: clock.now()))
            }
            _ = try other.writeBatch(
                writtenByOther, expectedOffsets: [PartitionID(topic: "usage", partition: 1): 1], now: clock.now(),
                limits: Self.limits)

            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()
            #expect(
                try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_partition, kafka_offset")
                    == [["p0-0"], ["p1-0"], ["p1-a"], ["p1-b"], ["p1-c"], ["p1-d"]])
            #expect(
                try schema.query("SELECT kafka_offset::text, reason FROM {s}.dead_letters") == [
                    ["1", "storage_rejected"]
                ])
            #expect(try schema.count("SELECT count(*) FROM {s}.offset_gaps") == 0)
            try schema.expectInvariants()
        }
    }

    @Test func storedOffsetBeyondTheLogEndStopsThePartition() async throws {
        try await withTestSchema { schema in
            let clock = try clockNearT0()
            let first = try TestKafka()
            try first.produce((0..<5).map { apiCall("old-\($0)") })
            try await ingestAll(kafka: first, schema: schema, clock: clock)

            // The topic as if deleted and created again: a new log that ends below the stored offset.
            let second = try TestKafka()
            try second.produce((0..<3).map { apiCall("new-\($0)") })
            let sink = LogSink.capturing()
            let worker = RunningWorker(
                configuration: try testConfiguration(kafka: second, schema: schema), clock: clock,
                logger: Logger(level: .info, sink: sink))
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline, !sink.capturedLines.contains(where: { $0.contains("beyond the log end") }) {
                try await Task.sleep(nanoseconds: 20_000_000)
            }
            try second.produce((3..<7).map { apiCall("new-\($0)") })
            try await Task.sleep(nanoseconds: 1_000_000_000)
            try worker.stop()

            let error = sink.capturedLines.first { $0.contains("beyond the log end") }
            #expect(error?.contains("stored_offset=5 kafka.log_end=3") == true)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 5)
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == "5")
        }
    }

    @Test func kafkaTimestampBeyondYear9999IsStoredAsNull() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.producer.produce(
                topic: kafka.topic, partition: 0, key: nil, value: Array(apiCall("far").utf8),
                timestampMilliseconds: Int64.max / 1000 + 1)
            try kafka.producer.produce(
                topic: kafka.topic, partition: 0, key: nil, value: Array(apiCall("near").utf8),
                timestampMilliseconds: 1_736_942_410_000)
            try kafka.producer.flush(timeoutMilliseconds: 10_000)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let rows = try schema.query("SELECT event_id, kafka_timestamp::text FROM {s}.ledger ORDER BY kafka_offset")
            #expect(rows == [["far", nil], ["near", "2025-01-15 12:00:10+00"]])
        }
    }

    @Test func databaseThatIsNotUTF8IsRejected() async throws {
        let admin = try PostgresConnection(conninfo: "", applicationName: "tally tests")
        let name = "tally_latin1_" + UUID().uuidString.prefix(8).lowercased()
        try admin.execute("CREATE DATABASE \(name) ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
        defer { _ = try? admin.execute("DROP DATABASE \(name)") }

        let connection = try PostgresConnection(conninfo: "dbname=\(name)", applicationName: "tally tests")
        defer { connection.close() }
        do {
            _ = try Migrator.migrate(connection, schema: "tally", logger: Logger(level: .error))
            Issue.record("migrate accepted a LATIN1 database")
        } catch {
            #expect(error.message.contains("needs a UTF8 database"))
        }
    }
}
