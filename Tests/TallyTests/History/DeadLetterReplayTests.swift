import Tally
import Testing

/// Dead-letter listing and replay after a configuration fix.
@Suite("DeadLetterReplay")
struct DeadLetterReplayTests {
    /// Returns a meter that reads `$.data.tokens`, which the producer does not send: every api.call
    /// becomes a dead letter invalid_value.
    static func brokenMeters() throws -> [Meter] {
        [Meter(slug: "api_calls", eventType: "api.call", aggregation: .sum, valuePath: try JSONPath("$.data.tokens"))]
    }

    func validator(_ meters: [Meter]) -> EventValidator {
        EventValidator(
            meters: MeterSet(meters),
            limits: ValidationLimits(
                maxPayloadBytes: 1 << 20, dedupeWindowMicroseconds: 35 * EventTime.microsecondsPerDay,
                maxFutureSkewMicroseconds: 5 * EventTime.microsecondsPerMinute))
    }

    @Test func replayAfterAFixAcceptsEachEventOnce() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let clock = try clockNearT0()
            try kafka.produce([
                apiCall("e1", "cust-1", "2"),
                apiCall("e2", "cust-1", "3"),
                apiCall("e1", "cust-1", "2"),  // an exact re-send of e1
                apiCall("e3", "cust-2", "\"many\""),  // still invalid after the fix
                "{broken",
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: clock, meters: try Self.brokenMeters())
            #expect(try schema.count("SELECT count(*) FROM {s}.dead_letters") == 5)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 0)

            // The fixed meter set reads $.data.quantity again.
            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            try store.recordMeters(try standardMeters())
            let fixed = validator(try standardMeters())
            var filter = DeadLetterFilter()
            filter.reasons = ["invalid_value"]
            let first = try store.replayDeadLetters(filter, validator: fixed, now: clock.now())

            #expect(first.accepted == 2)
            #expect(first.duplicates == 1)
            #expect(first.stillFailing == ["invalid_value": 1])
            #expect(try schema.query("SELECT event_id FROM {s}.ledger ORDER BY event_id") == [["e1"], ["e2"]])
            #expect(try schema.scalar("SELECT sum(sum) FROM {s}.rollups WHERE meter = 'api_calls'") == "5")
            #expect(
                try schema.query(
                    """
                    SELECT d.kafka_offset::text, l.event_id
                    FROM {s}.dead_letters d JOIN {s}.ledger l ON l.id = d.resolved_ledger_id
                    ORDER BY d.kafka_offset
                    """) == [["0", "e1"], ["1", "e2"], ["2", "e1"]])
            #expect(
                try schema.query("SELECT kafka_offset::text FROM {s}.duplicates") == [["2"]])
            let remaining = try store.deadLetters(DeadLetterFilter(), limit: 100)
            #expect(remaining.map(\.offset) == [3, 4])
            #expect(remaining.map(\.reason) == ["invalid_value", "malformed_json"])
            #expect(remaining[0].replayCount == 1)
            #expect(remaining[0].detail.contains("quantity"))

            let second = try store.replayDeadLetters(DeadLetterFilter(), validator: fixed, now: clock.now())
            #expect(second.resolved == 0)
            #expect(second.stillFailing == ["invalid_value": 1, "malformed_json": 1])
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 2)
            #expect(try schema.scalar("SELECT sum(sum) FROM {s}.rollups WHERE meter = 'api_calls'") == "5")
            try schema.expectInvariants()
        }
    }

    /// The first event with an id stays counted when its ledger row was deleted: replay keeps
    /// the conflicting resend a dead letter, and a backfill restores the original.
    @Test func conflictWithDeletedOriginalStaysADeadLetter() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let clock = try clockNearT0()
            try kafka.produce([
                apiCall("a-1", "cust-1", "1"),
                apiCall("b-2", "cust-9", "1.5"),  // the original, offset 1
                apiCall("b-2", "cust-9", "2.5"),  // a resend with another payload: a conflict
                apiCall("b-2", "cust-9", "1.5"),  // an exact resend: a duplicate
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)
            let originalID = try #require(try schema.scalar("SELECT id FROM {s}.ledger WHERE kafka_offset = 1"))
            try schema.query("DELETE FROM {s}.ledger WHERE kafka_offset = 1")
            try schema.query("DELETE FROM {s}.rollups WHERE subject = 'cust-9'")

            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            let from = try EventTime.parseRFC3339("2025-01-15T00:00:00Z")
            let to = try EventTime.parseRFC3339("2025-01-16T00:00:00Z")
            let damaged = try store.reconcile(from: from, to: to)
            #expect(damaged.duplicatesWithoutOriginal == 1)
            #expect(damaged.deadLettersWithoutOriginal == 1)
            #expect(!damaged.passes)

            var filter = DeadLetterFilter()
            filter.reasons = ["duplicate_id_conflict"]
            let replayed = try store.replayDeadLetters(
                filter, validator: validator(try standardMeters()), now: clock.now())
            #expect(replayed.accepted == 0)
            #expect(replayed.duplicates == 0)
            #expect(replayed.stillFailing == ["duplicate_id_conflict": 1])
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger WHERE event_id = 'b-2'") == 0)
            let unresolved = try store.deadLetters(filter, limit: 10)
            #expect(unresolved.map(\.offset) == [2])
            #expect(unresolved.first?.detail.contains("ledger row \(originalID), which no longer exists") == true)
            #expect(unresolved.first?.detail.contains("tally backfill") == true)

            let configuration = try testConfiguration(kafka: kafka, schema: schema)
            let logger = schema.logger
            let backfill = try await onOwnThread {
                try Backfill(configuration: configuration, clock: clock, logger: logger, stopSignal: StopSignal())
                    .start(BackfillRequest(topic: "usage"))
            }
            #expect(backfill.run.counts.accepted == 1)
            #expect(
                try schema.query(
                    "SELECT kafka_offset::text, meters -> 'api_calls' ->> 'quantity' FROM {s}.ledger WHERE event_id = 'b-2'"
                )
                    == [["1", "1.5"]])
            #expect(
                try schema.scalar(
                    "SELECT sum(sum)::text FROM {s}.rollups WHERE meter = 'api_calls' AND subject = 'cust-9'") == "1.5")
            let repaired = try store.reconcile(from: from, to: to)
            #expect(repaired.duplicatesWithoutOriginal == 0)
            #expect(repaired.deadLettersWithoutOriginal == 0)
            #expect(repaired.passes)

            // Replayed again, the resend conflicts with the restored original.
            let again = try store.replayDeadLetters(
                filter, validator: validator(try standardMeters()), now: clock.now())
            #expect(again.stillFailing == ["duplicate_id_conflict": 1])
            #expect(try store.deadLetters(filter, limit: 10).first?.detail.contains("no longer exists") == false)
            #expect(
                try schema.scalar(
                    "SELECT sum(sum)::text FROM {s}.rollups WHERE meter = 'api_calls' AND subject = 'cust-9'") == "1.5")
            try schema.expectInvariants()
        }
    }

    @Test func exactCopyOfDeletedOriginalKeepsItsReason() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let clock = try clockNearT0()
            try kafka.produce([apiCall("c-1", "cust-1", "2")])
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)
            // The same event again, read with a meter that cannot read it: a dead letter.
            try kafka.produce([apiCall("c-1", "cust-1", "2")])
            try await ingestAll(kafka: kafka, schema: schema, clock: clock, meters: try Self.brokenMeters())
            #expect(
                try schema.query("SELECT kafka_offset::text, reason FROM {s}.dead_letters") == [["1", "invalid_value"]])
            try schema.query("DELETE FROM {s}.ledger WHERE kafka_offset = 0")

            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            let replayed = try store.replayDeadLetters(
                DeadLetterFilter(), validator: validator(try standardMeters()), now: clock.now())

            #expect(replayed.resolved == 0)
            #expect(replayed.stillFailing == ["invalid_value": 1])
            let unresolved = try store.deadLetters(DeadLetterFilter(), limit: 10)
            #expect(unresolved.map(\.reason) == ["invalid_value"])
            #expect(unresolved.first?.detail.contains("with the same payload") == true)
            #expect(unresolved.first?.detail.contains("no longer exists") == true)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 0)
        }
    }

    @Test func showReturnsTheRawBytes() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([[0x7B, 0xFF, 0xFE]], key: Array("k".utf8))
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            let listed = try store.deadLetters(DeadLetterFilter(), limit: 10)
            #expect(listed.map(\.reason) == ["invalid_utf8"])
            let shown = try store.deadLetter(id: listed[0].id)
            #expect(shown?.value == [0x7B, 0xFF, 0xFE])
            #expect(shown?.key == Array("k".utf8))
            #expect(try store.deadLetter(id: 999_999) == nil)

            var filter = DeadLetterFilter()
            filter.reasons = ["too_late"]
            #expect(try store.deadLetters(filter, limit: 10).isEmpty)
            filter = DeadLetterFilter()
            filter.partitions = [1]
            #expect(try store.deadLetters(filter, limit: 10).isEmpty)
        }
    }
}
