import Kafka
import Postgres
import Tally
import Testing

/// The batch transaction against a real PostgreSQL, with messages built in memory.
@Suite("LedgerStore", .serialized)
struct LedgerStoreTests {
    static let limits = ValidationLimits(
        maxPayloadBytes: 1 << 20, dedupeWindowMicroseconds: 35 * EventTime.microsecondsPerDay,
        maxFutureSkewMicroseconds: 5 * EventTime.microsecondsPerMinute)

    let now = try! EventTime.parseRFC3339("2025-01-15T12:30:00Z")

    func validated(_ values: [String], partition: Int32 = 0, firstOffset: Int64 = 0, validator: EventValidator)
        -> [ValidatedMessage]
    {
        values.enumerated().map { index, text in
            let message = KafkaMessage(
                topic: "usage", partition: partition, offset: firstOffset + Int64(index), key: nil,
                value: Array(text.utf8))
            return ValidatedMessage(message: message, outcome: validator.validate(message.value, now: now))
        }
    }

    func makeValidator() throws -> EventValidator {
        EventValidator(meters: MeterSet(try standardMeters()), limits: Self.limits)
    }

    func makeStore(_ schema: TestSchema) throws -> LedgerStore {
        try LedgerStore(settings: schema.settings, logger: schema.logger)
    }

    @Test func compareAndSetRefusesStaleBatch() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            let batch = validated([apiCall("e1"), apiCall("e2")], validator: validator)
            let partition = PartitionID(topic: "usage", partition: 0)

            let summary = try store.writeBatch(batch, expectedOffsets: [partition: nil], now: now, limits: Self.limits)
            #expect(summary.nextOffsets[partition] == 2)

            // A consumer that still believes nothing is stored, as after losing the partition.
            let stale = validated([apiCall("e3")], firstOffset: 0, validator: validator)
            #expect(throws: BatchWriteError.self) {
                try store.writeBatch(stale, expectedOffsets: [partition: nil], now: now, limits: Self.limits)
            }
            let behind = validated([apiCall("e4")], firstOffset: 1, validator: validator)
            #expect(throws: BatchWriteError.self) {
                try store.writeBatch(behind, expectedOffsets: [partition: 1], now: now, limits: Self.limits)
            }

            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 2)
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == "2")
            #expect(try schema.scalar("SELECT sum(sum) FROM {s}.rollups WHERE meter = 'api_calls'") == "2")
            try schema.expectInvariants()
        }
    }

    @Test func staleBatchReportsTheStoredOffset() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            let partition = PartitionID(topic: "usage", partition: 0)
            _ = try store.writeBatch(
                validated([apiCall("e1")], validator: validator), expectedOffsets: [partition: nil], now: now,
                limits: Self.limits)
            do {
                _ = try store.writeBatch(
                    validated([apiCall("e2")], validator: validator), expectedOffsets: [partition: nil], now: now,
                    limits: Self.limits)
                Issue.record("the stale batch was committed")
            } catch {
                guard case .staleOffsets(let stored)? = error as? BatchWriteError else {
                    Issue.record("expected staleOffsets, got \(error)")
                    return
                }
                #expect(stored[partition] == .some(1))
            }
        }
    }

    @Test func duplicatesInsideOneBatchAndStoredKeysNeverFailTheBatch() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            let partition = PartitionID(topic: "usage", partition: 0)
            _ = try store.writeBatch(
                validated([apiCall("e0", "cust-1", "1")], partition: 1, validator: validator),
                expectedOffsets: [PartitionID(topic: "usage", partition: 1): nil], now: now, limits: Self.limits)

            let batch = validated(
                [
                    apiCall("e1", "cust-1", "2"), apiCall("e2", "cust-1", "3"), apiCall("e1", "cust-1", "2"),
                    apiCall("e3", "cust-1", "4"), apiCall("e0", "cust-1", "1"),
                ],
                validator: validator)
            let summary = try store.writeBatch(batch, expectedOffsets: [partition: nil], now: now, limits: Self.limits)

            #expect(summary.accepted == 3)
            #expect(summary.duplicates == 2)
            #expect(summary.deadLetterCount == 0)
            #expect(summary.nextOffsets[partition] == 5)
            let duplicates = try schema.query(
                "SELECT kafka_offset::text FROM {s}.duplicates WHERE kafka_partition = 0 ORDER BY 1")
            #expect(duplicates == [["2"], ["4"]])
            #expect(try schema.scalar("SELECT sum FROM {s}.rollups WHERE meter = 'api_calls'") == "10")
            #expect(try schema.scalar("SELECT event_count FROM {s}.rollups WHERE meter = 'calls'") == "4")
            // The duplicate of e0 points at the ledger row written by the first batch.
            #expect(
                try schema.scalar(
                    "SELECT l.event_id FROM {s}.duplicates d JOIN {s}.ledger l ON l.id = d.original_ledger_id WHERE d.kafka_offset = 4"
                )
                    == "e0")
            try schema.expectInvariants()
        }
    }

    @Test func conflictNamesTheOriginalAndKeepsItCounted() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            let partition = PartitionID(topic: "usage", partition: 0)
            let batch = validated([apiCall("e1", "cust-1", "5"), apiCall("e1", "cust-1", "7")], validator: validator)
            let summary = try store.writeBatch(batch, expectedOffsets: [partition: nil], now: now, limits: Self.limits)
            #expect(summary.deadLetters[.duplicateIDConflict] == 1)

            let rows = try schema.query(
                """
                SELECT d.reason, d.event_id, l.kafka_offset::text, convert_from(d.message_value, 'UTF8')
                FROM {s}.dead_letters d JOIN {s}.ledger l ON l.id = d.original_ledger_id
                """)
            #expect(rows == [["duplicate_id_conflict", "e1", "0", apiCall("e1", "cust-1", "7")]])
            #expect(try schema.scalar("SELECT sum FROM {s}.rollups WHERE meter = 'api_calls'") == "5")
            try schema.expectInvariants()
        }
    }

    @Test func keyClaimedInAnotherPeriodIsStillFound() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            let partition = PartitionID(topic: "usage", partition: 0)
            _ = try store.writeBatch(
                validated([apiCall("e1", "cust-1", "5")], validator: validator), expectedOffsets: [partition: nil],
                now: now,
                limits: Self.limits)

            // Twenty days later the key lives in an older dedupe partition, still inside the window.
            let later = now.adding(microseconds: 20 * EventTime.microsecondsPerDay)
            let message = KafkaMessage(
                topic: "usage", partition: 0, offset: 1, key: nil, value: Array(apiCall("e1", "cust-1", "5").utf8))
            let repeated = ValidatedMessage(message: message, outcome: validator.validate(message.value, now: later))
            let summary = try store.writeBatch(
                [repeated], expectedOffsets: [partition: 1], now: later, limits: Self.limits)
            #expect(summary.duplicates == 1)
            #expect(try schema.count("SELECT count(DISTINCT period) FROM {s}.dedupe_keys") == 1)
            try schema.expectInvariants()
        }
    }

    @Test func skippedOffsetsAreRecordedAsGaps() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            let partition = PartitionID(topic: "usage", partition: 0)
            var batch = validated([apiCall("e1"), apiCall("e2")], validator: validator)
            batch[1].message.offset = 5
            _ = try store.writeBatch(batch, expectedOffsets: [partition: nil], now: now, limits: Self.limits)
            let next = validated([apiCall("e3")], firstOffset: 9, validator: validator)
            _ = try store.writeBatch(next, expectedOffsets: [partition: 6], now: now, limits: Self.limits)

            let gaps = try schema.query(
                "SELECT from_offset::text, to_offset::text FROM {s}.offset_gaps ORDER BY from_offset")
            #expect(gaps == [["1", "4"], ["6", "8"]])
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == "10")
            try schema.expectInvariants()
        }
    }

    @Test func offsetsBelowTheLogStartAreRetentionGaps() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            let partition = PartitionID(topic: "usage", partition: 0)
            _ = try store.writeBatch(
                validated([apiCall("e1"), apiCall("e2")], validator: validator), expectedOffsets: [partition: nil],
                now: now, limits: Self.limits)
            // Retention moved the log start to 7; offsets 7 to 9 carried no message (markers).
            let next = validated([apiCall("e3"), apiCall("e4")], firstOffset: 10, validator: validator)
            let summary = try store.writeBatch(
                next, expectedOffsets: [partition: 2], now: now, limits: Self.limits, logStarts: [partition: 7])

            #expect(summary.gaps.map(\.reason) == ["retention", "offsets_skipped"])
            let gaps = try schema.query(
                "SELECT from_offset::text, to_offset::text, reason FROM {s}.offset_gaps ORDER BY from_offset")
            #expect(gaps == [["2", "6", "retention"], ["7", "9", "offsets_skipped"]])
            // A log start beyond the first message still records only what lies before it.
            let later = validated([apiCall("e5")], firstOffset: 15, validator: validator)
            _ = try store.writeBatch(
                later, expectedOffsets: [partition: 12], now: now, limits: Self.limits, logStarts: [partition: 20])
            #expect(try schema.query("SELECT reason FROM {s}.offset_gaps WHERE from_offset = 12") == [["retention"]])
            #expect(try schema.scalar("SELECT to_offset FROM {s}.offset_gaps WHERE from_offset = 12") == "14")
            try schema.expectInvariants()
        }
    }

    @Test func aggregationsKeepMinMaxAndLatestByEventTime() async throws {
        try await withTestSchema { schema in
            let meters = [
                Meter(
                    slug: "peak", eventType: "api.call", aggregation: .max, valuePath: try JSONPath("$.data.quantity")),
                Meter(
                    slug: "low", eventType: "api.call", aggregation: .min, valuePath: try JSONPath("$.data.quantity")),
                Meter(
                    slug: "gauge", eventType: "api.call", aggregation: .latest,
                    valuePath: try JSONPath("$.data.quantity")),
            ]
            let store = try makeStore(schema)
            try store.recordMeters(meters)
            let validator = EventValidator(meters: MeterSet(meters), limits: Self.limits)
            let partition = PartitionID(topic: "usage", partition: 0)
            let first = validated(
                [
                    apiCall("a", "c", "5", time: "2025-01-15T12:00:30Z"),
                    apiCall("b", "c", "-2", time: "2025-01-15T12:00:10Z"),
                ],
                validator: validator)
            _ = try store.writeBatch(first, expectedOffsets: [partition: nil], now: now, limits: Self.limits)
            // Arrives later but happened earlier: it must not become the latest value.
            let second = validated(
                [apiCall("d", "c", "9", time: "2025-01-15T12:00:20Z")], firstOffset: 2, validator: validator)
            _ = try store.writeBatch(second, expectedOffsets: [partition: 2], now: now, limits: Self.limits)

            let value = "SELECT value::text FROM {s}.usage_per_minute WHERE meter = $1"
            #expect(try schema.scalar(value, ["peak"]) == "9")
            #expect(try schema.scalar(value, ["low"]) == "-2")
            #expect(try schema.scalar(value, ["gauge"]) == "5")
            try schema.expectInvariants()
        }
    }

    @Test func keysAreComparedByteForByte() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            // "é" as one scalar and as "e" plus a combining accent: equal as Swift strings, not as bytes.
            let batch = validated([apiCall("caf\u{E9}"), apiCall("cafe\u{301}")], validator: validator)
            let summary = try store.writeBatch(
                batch, expectedOffsets: [PartitionID(topic: "usage", partition: 0): nil], now: now, limits: Self.limits)
            #expect(summary.accepted == 2)
            #expect(summary.duplicates == 0)
            #expect(try schema.count("SELECT count(DISTINCT event_id) FROM {s}.ledger") == 2)
            try schema.expectInvariants()
        }
    }

    @Test func oldDedupePartitionsAreDropped() async throws {
        try await withTestSchema { schema in
            let store = try makeStore(schema)
            let validator = try makeValidator()
            _ = try store.writeBatch(
                validated([apiCall("e1")], validator: validator),
                expectedOffsets: [PartitionID(topic: "usage", partition: 0): nil], now: now, limits: Self.limits)
            let partitions = "SELECT count(*) FROM pg_inherits WHERE inhparent = '{s}.dedupe_keys'::regclass"
            let before = try schema.count(partitions)
            #expect(try schema.count("SELECT count(*) FROM {s}.dedupe_keys") == 1)

            try store.maintainDedupePartitions(
                now: now.adding(microseconds: 60 * EventTime.microsecondsPerDay), limits: Self.limits)
            #expect(try schema.count("SELECT count(*) FROM {s}.dedupe_keys") == 0)
            #expect(try schema.count(partitions) <= before + 4)
            let oldest = try schema.scalar(
                "SELECT min(substring(c.relname from 'p([0-9]+)$')::int) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = '{s}.dedupe_keys'::regclass"
            )
            // Lookups 60 days later start at the period of (then - window - skew - one hour of margin).
            // The period before it may stay, but nothing older.
            let lookupStart = (now.microseconds / 1_000_000 + 60 * 86_400 - 35 * 86_400 - 300 - 3600) / 604_800
            #expect((lookupStart - 1...lookupStart).contains(Int64(oldest ?? "") ?? -1))
        }
    }

    @Test func migrateTwiceAndConcurrentlyIsSafe() async throws {
        try await withTestSchema { schema in
            let second = try Migrator.migrate(schema.connection, schema: schema.name, logger: schema.logger)
            #expect(second.fromVersion == Migrator.latestVersion)
            #expect(second.toVersion == Migrator.latestVersion)

            let name = schema.name + "_c"
            defer { _ = try? schema.connection.execute("DROP SCHEMA IF EXISTS \(name) CASCADE") }
            let outcomes = try await withThrowingTaskGroup(of: Migrator.Outcome.self) { group in
                for _ in 0..<3 {
                    group.addTask {
                        let connection = try PostgresConnection(conninfo: "", applicationName: "tally tests")
                        return try Migrator.migrate(connection, schema: name, logger: Logger(level: .warning))
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(outcomes.filter { $0.fromVersion == 0 }.count == 1)
            #expect(
                try schema.scalar("SELECT count(*) FROM \(name).schema_migrations") == String(Migrator.migrationCount))
        }
    }
}
