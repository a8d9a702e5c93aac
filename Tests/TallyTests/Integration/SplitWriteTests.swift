import Foundation
import Kafka
import Postgres
import Tally
import Testing

/// Batches written as two transactions at once (`ingest.write_connections: 2`), and the COPY
/// rows they are written with.
@Suite("Split writes")
struct SplitWriteTests {
    @Test func splitBatchKeepsDuplicatesAndConflictsExact() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 4)
            // 150 messages per partition, all in one batch, so that it is split by partition.
            for partition in Int32(0)..<4 {
                let events = (0..<150).map { apiCall("p\(partition)-\($0)", "cust-\($0 % 7)", "\($0 + 1)") }
                try kafka.produce(events, partition: partition)
            }
            // The same event in partitions 0 and 3: whichever transaction claims it first keeps it.
            try kafka.produce([apiCall("shared", "cust-1", "1000")], partition: 0)
            try kafka.produce([apiCall("shared", "cust-1", "1000")], partition: 3)
            // One id with two payloads, in partitions 1 and 2: one is accepted, the other conflicts.
            try kafka.produce([apiCall("conflict", "cust-2", "10")], partition: 1)
            try kafka.produce([apiCall("conflict", "cust-2", "20")], partition: 2)

            let sink = LogSink.capturing()
            var configuration = try testConfiguration(kafka: kafka, schema: schema)
            configuration.ingest.batchMaxMessages = 604
            configuration.ingest.batchMaxWaitMilliseconds = 5000
            let worker = RunningWorker(
                configuration: configuration, clock: try clockNearT0(), logger: Logger(level: .debug, sink: sink))
            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()

            #expect(sink.capturedLines.contains { $0.contains("connected the split writer to PostgreSQL") })
            let partitionsPerCommit = sink.capturedLines.filter { $0.contains("msg=\"batch committed\"") }
                .compactMap { line in line.split(separator: " ").first { $0.hasPrefix("batch.partitions=") } }
            #expect(partitionsPerCommit == ["batch.partitions=2", "batch.partitions=2"])

            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 602)
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates WHERE event_id = 'shared'") == 1)
            #expect(try schema.scalar("SELECT reason FROM {s}.dead_letters") == "duplicate_id_conflict")
            #expect(try schema.scalar("SELECT data ->> 'quantity' FROM {s}.ledger WHERE event_id = 'conflict'") != nil)
            // 4 × (1 + … + 150), the shared event once, and the accepted one of the conflict.
            let conflictQuantity = try schema.scalar(
                "SELECT data ->> 'quantity' FROM {s}.ledger WHERE event_id = 'conflict'")!
            let expectedSum = 4 * (150 * 151 / 2) + 1000 + Int(conflictQuantity)!
            #expect(
                try schema.scalar("SELECT sum(sum)::text FROM {s}.rollups WHERE meter = 'api_calls'")
                    == "\(expectedSum)")
            #expect(try schema.scalar("SELECT sum(event_count)::text FROM {s}.rollups WHERE meter = 'calls'") == "602")
            try schema.expectInvariants()
        }
    }

    @Test func failedHalfIsRetriedAlone() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 4)
            for partition in Int32(0)..<4 {
                var events = (0..<40).map { apiCall("p\(partition)-\($0)", "cust-\($0 % 5)") }
                if partition == 2 {
                    // PostgreSQL rejects this event's rollup key, which fails its whole transaction.
                    events.insert(WorkerFailureTests.poisonEvent(id: "poison", subject: "cust-9"), at: 20)
                }
                try kafka.produce(events, partition: partition)
            }

            let sink = LogSink.capturing()
            var configuration = try testConfiguration(
                kafka: kafka, schema: schema, meters: try WorkerFailureTests.wideMeters())
            configuration.ingest.batchMaxMessages = 161
            configuration.ingest.batchMaxWaitMilliseconds = 5000
            let worker = RunningWorker(
                configuration: configuration, clock: try clockNearT0(), logger: Logger(level: .info, sink: sink))
            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()

            #expect(sink.capturedLines.contains { $0.contains("a split transaction failed") })
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 160)
            let dead = try schema.query("SELECT kafka_partition::text, reason, event_id FROM {s}.dead_letters")
            #expect(dead == [["2", "storage_rejected", "poison"]])
            #expect(try schema.scalar("SELECT sum(event_count)::text FROM {s}.rollups WHERE meter = 'calls'") == "160")
            try schema.expectInvariants()
        }
    }

    @Test func copyRowsKeepTabsNewlinesAndBackslashes() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let subject = "cust\\t-1\\n\\\\"
            let note = "tab\\tnewline\\ncarriage\\rbackslash\\\\ quote\\\" end"
            let event =
                #"{"specversion":"1.0","id":"id\\x","source":"test","type":"api.call","subject":"\#(subject)","time":"2025-01-15T12:00:10Z","data":{"quantity":2,"note":"\#(note)"}}"#
            try kafka.produce([event])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            #expect(try schema.scalar("SELECT subject FROM {s}.ledger") == "cust\t-1\n\\")
            #expect(try schema.scalar("SELECT event_id FROM {s}.ledger") == "id\\x")
            #expect(
                try schema.scalar("SELECT data ->> 'note' FROM {s}.ledger")
                    == "tab\tnewline\ncarriage\rbackslash\\ quote\" end")
            #expect(try schema.scalar("SELECT subject FROM {s}.rollups WHERE meter = 'api_calls'") == "cust\t-1\n\\")
            try schema.expectInvariants()
        }
    }

    @Test func copyTextRowsEscapeAndMarkNull() {
        var rows = CopyTextRows()
        rows.append("a\tb\nc\rd\\e")
        rows.append(nil as String?)
        rows.append(Int64(-42))
        rows.append(bytea: [0x00, 0xAB, 0xFF])
        rows.endRow()
        rows.append("")
        rows.endRow()
        #expect(String(decoding: rows.bytes, as: UTF8.self) == "a\\tb\\nc\\rd\\\\e\t\\N\t-42\t\\\\x00abff\n\n")
        #expect(rows.rowCount == 2)
    }
}
