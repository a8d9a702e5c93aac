import Foundation
import Kafka
import Tally
import Testing

@testable import TallyCLI

/// `Backfill` against librdkafka's mock cluster and a real PostgreSQL, next to the worker.
@Suite("Backfill")
struct BackfillTests {
    /// Returns the ledger as comparable text: every column except the ids and the ingest time.
    static func ledgerSnapshot(_ schema: TestSchema) throws -> [[String?]] {
        try schema.query(
            """
            SELECT source, event_id, subject, event_time::text, data::text, meters::text, encode(payload_sha256, 'hex'),
                   kafka_partition::text, kafka_offset::text
            FROM {s}.ledger ORDER BY kafka_partition, kafka_offset
            """)
    }

    /// Returns the rollups without the ledger id of the latest value, which a restored row changes.
    static func rollupSnapshot(_ schema: TestSchema) throws -> [[String?]] {
        try schema.query(
            """
            SELECT meter, subject, groups::text, minute::text, event_count::text, sum::text, min::text, max::text,
                   latest::text, latest_time::text
            FROM {s}.rollups ORDER BY 1, 2, 3, 4
            """)
    }

    /// Deletes the ledger rows and the rollups of the minute 12:05 of T0's day, as lost data.
    static func removeMinute(_ schema: TestSchema) throws {
        try schema.query("DELETE FROM {s}.ledger WHERE date_trunc('minute', event_time) = '2025-01-15T12:05Z'")
        try schema.query("DELETE FROM {s}.rollups WHERE minute = '2025-01-15T12:05Z'")
    }

    /// Twenty events at 12:00 with one exact re-send and one malformed message, then ten at
    /// 12:05, on partition 0.
    static func produceHistory(_ kafka: TestKafka, partition: Int32 = 0, prefix: String = "e") throws {
        var values = (0..<20).map { apiCall("\(prefix)\($0)", "cust-\($0 % 3)", String($0 + 1)) }
        values.insert(apiCall("\(prefix)3", "cust-0", "4"), at: 7)
        values.insert("{not json", at: 12)
        values += (0..<10).map {
            apiCall("\(prefix)late-\($0)", "cust-\($0 % 2)", "1.5", time: "2025-01-15T12:05:\(10 + $0)Z")
        }
        try kafka.produce(values, partition: partition)
    }

    /// Runs `action` on a backfill of its own thread and waits for it. A backfill blocks for
    /// seconds, and on the cooperative pool it would hold a thread that other tests need.
    func runBackfill(
        _ kafka: TestKafka, _ schema: TestSchema, meters: [Meter]? = nil, batchMaxMessages: Int? = nil,
        stopSignal: StopSignal = StopSignal(), onProgress: (@Sendable (BackfillProgress) -> Void)? = nil,
        _ action: @escaping @Sendable (Backfill) throws -> BackfillResult
    ) async throws -> BackfillResult {
        let configuration = try testConfiguration(kafka: kafka, schema: schema, meters: meters)
        let clock = try clockNearT0()
        let logger = schema.logger
        return try await onOwnThread {
            let backfill = Backfill(configuration: configuration, clock: clock, logger: logger, stopSignal: stopSignal)
            if let batchMaxMessages { backfill.batchMaxMessages = batchMaxMessages }
            if let onProgress { backfill.onProgress = onProgress }
            return try action(backfill)
        }
    }

    func runBackfill(
        _ kafka: TestKafka, _ schema: TestSchema, _ request: BackfillRequest = BackfillRequest(topic: "usage")
    )
        async throws -> BackfillResult
    {
        try await runBackfill(kafka, schema) { try $0.start(request) }
    }

    @Test func ingestedRangeAddsNothing() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try Self.produceHistory(kafka)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let ledger = try Self.ledgerSnapshot(schema)
            let rollups = try Self.rollupSnapshot(schema)

            let result = try await runBackfill(kafka, schema)

            #expect(result.run.status == .finished)
            #expect(result.run.counts.accepted == 0)
            #expect(result.run.counts.alreadyRecorded == 32)
            #expect(result.run.counts.deadLetters == 0)
            #expect(try Self.ledgerSnapshot(schema) == ledger)
            #expect(try Self.rollupSnapshot(schema) == rollups)
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 1)
            #expect(try schema.count("SELECT count(*) FROM {s}.batches WHERE backfill_run IS NOT NULL") == 1)
            try schema.expectInvariants()
        }
    }

    @Test func removedRowsAreRestored() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try Self.produceHistory(kafka)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let ledger = try Self.ledgerSnapshot(schema)
            let rollups = try Self.rollupSnapshot(schema)
            try Self.removeMinute(schema)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 20)

            let result = try await runBackfill(kafka, schema)

            #expect(result.run.counts.accepted == 10)
            #expect(result.run.counts.alreadyRecorded == 22)
            #expect(try Self.ledgerSnapshot(schema) == ledger)
            #expect(try Self.rollupSnapshot(schema) == rollups)
            try schema.expectInvariants()

            // A second run finds every offset recorded.
            let again = try await runBackfill(kafka, schema)
            #expect(again.run.counts.accepted == 0)
            #expect(again.run.counts.alreadyRecorded == 32)
        }
    }

    @Test func offsetRangeAndEventTimeLimitTheRun() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try Self.produceHistory(kafka)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            try Self.removeMinute(schema)

            // Offsets 22 to 31 hold the ten events of 12:05; this run reads 20 to 26 and keeps
            // only events from 12:05:12 on, so it restores offsets 24, 25 and 26.
            var request = BackfillRequest(topic: "usage")
            request.from = .offset(20)
            request.to = .offset(26)
            request.eventTimeFrom = try EventTime.parseRFC3339("2025-01-15T12:05:12Z")
            let result = try await runBackfill(kafka, schema, request)

            #expect(result.run.partitions.map(\.fromOffset) == [20])
            #expect(result.run.partitions.map(\.toOffset) == [27])
            #expect(result.run.counts.accepted == 3)
            #expect(result.run.counts.alreadyRecorded == 2)
            #expect(result.run.counts.outsideTimeRange == 2)
            #expect(
                try schema.query(
                    "SELECT kafka_offset::text FROM {s}.ledger WHERE kafka_offset >= 22 ORDER BY kafka_offset") == [
                        ["24"], ["25"], ["26"],
                    ])
        }
    }

    @Test func dryRunReportsAndWritesNothing() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try Self.produceHistory(kafka)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            try Self.removeMinute(schema)
            let ledger = try Self.ledgerSnapshot(schema)

            var request = BackfillRequest(topic: "usage")
            request.dryRun = true
            let result = try await runBackfill(kafka, schema, request)

            #expect(result.run.counts.accepted == 10)
            #expect(
                result.dryRunAdditions == [
                    ["api_calls", "cust-0", "{}", "2025-01-15T12:05Z", "5", "sum", "7.5"],
                    ["api_calls", "cust-1", "{}", "2025-01-15T12:05Z", "5", "sum", "7.5"],
                    ["calls", "cust-0", "{}", "2025-01-15T12:05Z", "5", "count", "5"],
                    ["calls", "cust-1", "{}", "2025-01-15T12:05Z", "5", "count", "5"],
                ])
            #expect(try Self.ledgerSnapshot(schema) == ledger)
            #expect(try schema.count("SELECT count(*) FROM {s}.backfill_runs") == 0)
            #expect(try schema.count("SELECT count(*) FROM {s}.batches WHERE backfill_run IS NOT NULL") == 0)

            // The dry run took no value of the id sequence, so the first real run is number 1.
            #expect(result.run.id < 0)
            let real = try await runBackfill(kafka, schema)
            #expect(real.run.id == 1)
        }
    }

    @Test func dryRunTableNamesAggregationAndGroups() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try Self.produceHistory(kafka)
            let meters =
                try standardMeters() + [
                    Meter(
                        slug: "peak", eventType: "api.call", aggregation: .max,
                        valuePath: try JSONPath("$.data.quantity"))
                ]
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0(), meters: meters)
            try Self.removeMinute(schema)

            var dryRun = BackfillRequest(topic: "usage")
            dryRun.dryRun = true
            let request = dryRun
            let result = try await runBackfill(kafka, schema, meters: meters) { try $0.start(request) }
            #expect(result.dryRunAdditions.contains(["peak", "cust-0", "{}", "2025-01-15T12:05Z", "5", "max", "1.5"]))
            let text = BackfillCommand.renderResult(result, isDryRun: true)
            #expect(text.contains("GROUPS"))
            #expect(text.contains("AGGREGATION"))
            #expect(!text.contains("SUM"))

            dryRun.eventTimeFrom = try EventTime.parseRFC3339("2025-01-16T00:00:00Z")
            let laterRequest = dryRun
            let empty = try await runBackfill(kafka, schema, meters: meters) { try $0.start(laterRequest) }
            #expect(empty.dryRunAdditions.isEmpty)
            #expect(BackfillCommand.renderResult(empty, isDryRun: true).contains("It would add no readings."))

            let stopSignal = StopSignal()
            stopSignal.request()
            let stopped = try await runBackfill(kafka, schema, meters: meters, stopSignal: stopSignal) {
                try $0.start(laterRequest)
            }
            #expect(stopped.stopped)
            #expect(BackfillCommand.renderResult(stopped, isDryRun: true).hasPrefix("Dry run interrupted"))
        }
    }

    @Test func interruptedRunResumesToTheSameState() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try Self.produceHistory(kafka)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let ledger = try Self.ledgerSnapshot(schema)
            let rollups = try Self.rollupSnapshot(schema)
            try Self.removeMinute(schema)

            let stopSignal = StopSignal()
            let interrupted = try await runBackfill(
                kafka, schema, batchMaxMessages: 4, stopSignal: stopSignal,
                onProgress: { progress in
                    if progress.doneOffsets >= 24 { stopSignal.request() }
                }
            ) { try $0.start(BackfillRequest(topic: "usage")) }
            #expect(interrupted.stopped)
            #expect(interrupted.run.status == .interrupted)
            #expect(interrupted.run.doneOffsets < 32)

            let runID = interrupted.run.id
            let resumed = try await runBackfill(kafka, schema, batchMaxMessages: 4) { try $0.resume(runID: runID) }

            #expect(resumed.run.status == .finished)
            #expect(resumed.run.doneOffsets == 32)
            #expect(resumed.run.counts.accepted == 10)
            #expect(resumed.run.counts.alreadyRecorded == 22)
            #expect(try Self.ledgerSnapshot(schema) == ledger)
            #expect(try Self.rollupSnapshot(schema) == rollups)
            let chain = try schema.query(
                "SELECT b.from_offset::text, b.next_offset::text FROM {s}.batches b WHERE b.backfill_run IS NOT NULL ORDER BY b.from_offset"
            )
            #expect(chain.first?[0] == "0")
            #expect(chain.last?[1] == "32")
            #expect(zip(chain, chain.dropFirst()).allSatisfy { $0[1] == $1[0] })
            try schema.expectInvariants()

            let finished = try await runBackfill(kafka, schema) { try $0.resume(runID: runID) }
            #expect(finished.wasAlreadyFinished)
            #expect(!resumed.wasAlreadyFinished)
            #expect(try Self.ledgerSnapshot(schema) == ledger)
        }
    }

    @Test func runningBesideLiveWorkersKeepsTotalsExact() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            let clock = try clockNearT0()
            try Self.produceHistory(kafka, partition: 0, prefix: "a")
            try Self.produceHistory(kafka, partition: 1, prefix: "b")
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)
            try Self.removeMinute(schema)

            // New events for the live workers, and exact re-sends of removed events: the live
            // worker and the backfill both see those, and only one of them may accept each.
            try kafka.produce(
                (0..<50).map { apiCall("new-\($0)", "cust-9", "2") }
                    + (0..<5).map {
                        apiCall("alate-\($0)", "cust-\($0 % 2)", "1.5", time: "2025-01-15T12:05:\(10 + $0)Z")
                    },
                partition: 0)
            try kafka.produce((50..<100).map { apiCall("new-\($0)", "cust-9", "2") }, partition: 1)

            let worker = RunningWorker(configuration: try testConfiguration(kafka: kafka, schema: schema), clock: clock)
            let result = try await runBackfill(kafka, schema, batchMaxMessages: 5) {
                try $0.start(BackfillRequest(topic: "usage"))
            }
            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()

            #expect(result.run.status == .finished)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 2 * 30 + 100)
            #expect(try schema.count("SELECT count(DISTINCT (source, event_id)) FROM {s}.ledger") == 160)
            // 1+…+20 per partition, 10 × 1.5 per partition, and 100 × 2.
            #expect(try schema.scalar("SELECT sum(sum) FROM {s}.rollups WHERE meter = 'api_calls'") == "650.0")
            #expect(try schema.scalar("SELECT sum(event_count) FROM {s}.rollups WHERE meter = 'calls'") == "160")
            try schema.expectInvariants()
        }
    }

    @Test func rejectedContentBecomesADeadLetter() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let meters = try WorkerFailureTests.wideMeters()
            try kafka.produce([apiCall("a"), WorkerFailureTests.poisonEvent(id: "poison", subject: "c"), apiCall("b")])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0(), meters: meters)
            // Everything lost: the ledger rows, their rollups and the dead letter.
            try schema.query("DELETE FROM {s}.ledger")
            try schema.query("DELETE FROM {s}.rollups")
            try schema.query("DELETE FROM {s}.dead_letters")

            let result = try await runBackfill(kafka, schema, meters: meters) {
                try $0.start(BackfillRequest(topic: "usage"))
            }

            #expect(result.run.counts.accepted == 2)
            #expect(result.run.counts.deadLetters == 1)
            #expect(try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_offset") == [["a"], ["b"]])
            #expect(
                try schema.query("SELECT kafka_offset::text, reason, event_id FROM {s}.dead_letters") == [
                    ["1", "storage_rejected", "poison"]
                ])
            try schema.expectInvariants()
        }
    }

    @Test func timeLookupWithoutAnOffsetIsAnError() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([apiCall("e1")])
            var request = BackfillRequest(topic: "usage")
            request.from = .time(try EventTime.parseRFC3339("2025-01-15T12:00:00Z"))
            do {
                _ = try await runBackfill(kafka, schema, request)
                Issue.record("the backfill started without an offset for the time")
            } catch let error as BackfillError {
                #expect(error.description.contains("returned no offset (-1)"))
                #expect(error.description.contains("usage[0]"))
            }
            #expect(try schema.count("SELECT count(*) FROM {s}.backfill_runs") == 0)
        }
    }

    @Test func unknownPartitionIsRejected() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            var request = BackfillRequest(topic: "usage")
            request.partitions = [3]
            await #expect(throws: BackfillError.self) { try await runBackfill(kafka, schema, request) }
        }
    }
}
