import Foundation
import Tally
import Testing

@testable import TallyCLI

/// `reconcile` on a healthy schema and on schemas a test damaged.
@Suite("Reconcile")
struct ReconcileTests {
    static let from = try! EventTime.parseRFC3339("2025-01-15T00:00:00Z")
    static let to = try! EventTime.parseRFC3339("2025-01-16T00:00:00Z")

    /// Ingests events with a duplicate, a conflict and a malformed message on two partitions.
    static func ingestHealthy(_ kafka: TestKafka, _ schema: TestSchema) async throws {
        try kafka.produce(
            [
                apiCall("e1", "cust-1", "2"), apiCall("e1", "cust-1", "2"), apiCall("e2", "cust-1", "3"), "{x",
                apiCall("e1", "cust-1", "9"),
            ],
            partition: 0)
        try kafka.produce([apiCall("e3", "cust-2", "4"), apiCall("e4", "cust-2", "5")], partition: 1)
        try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
    }

    func reconcile(_ schema: TestSchema) throws -> ReconcileReport {
        try LedgerStore(settings: schema.settings, logger: schema.logger).reconcile(from: Self.from, to: Self.to)
    }

    @Test func healthySchemaHolds() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try await Self.ingestHealthy(kafka, schema)
            let report = try reconcile(schema)

            #expect(report.passes)
            #expect(report.partitions.map(\.processed) == [5, 2])
            #expect(report.partitions.map(\.expected) == [5, 2])
            #expect(report.partitions.map(\.accepted) == [2, 2])
            #expect(report.partitions.map(\.duplicates) == [1, 0])
            #expect(report.partitions.map(\.deadLetters) == [2, 0])
            #expect(report.conflicts == 1)
            #expect(report.rollupRowsChecked == 4)
            #expect(report.rollupDifferenceCount == 0)
        }
    }

    @Test func removedLedgerRowNamesThePartition() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try await Self.ingestHealthy(kafka, schema)
            try schema.query("DELETE FROM {s}.ledger WHERE event_id = 'e4'")
            let report = try reconcile(schema)

            #expect(!report.passes)
            #expect(report.partitions[0].passes)
            #expect(!report.partitions[1].passes)
            #expect(report.partitions[1].missing == [1...1])
            #expect(report.partitions[1].processed == 1)
            // The rollups of e4's minute no longer match the ledger either.
            #expect(report.rollupDifferences.map(\.minute) == ["2025-01-15T12:00Z", "2025-01-15T12:00Z"])
        }
    }

    @Test func changedRollupNamesTheMinute() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try await Self.ingestHealthy(kafka, schema)
            try schema.query("UPDATE {s}.rollups SET sum = sum + 1 WHERE meter = 'api_calls' AND subject = 'cust-2'")
            let report = try reconcile(schema)

            #expect(!report.passes)
            #expect(report.partitions.allSatisfy { $0.passes })
            #expect(report.rollupDifferenceCount == 1)
            let difference = report.rollupDifferences.first
            #expect(difference?.minute == "2025-01-15T12:00Z")
            #expect(difference?.meter == "api_calls")
            #expect(difference?.subject == "cust-2")
            #expect(difference?.stored?.contains("sum=10") == true)
            #expect(difference?.fromLedger?.contains("sum=9") == true)
        }
    }

    @Test func deletedBatchRecordNamesThePartition() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try kafka.produce((0..<6).map { apiCall("b\($0)") }, partition: 1)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            // Three more batches, so that the deleted record sits inside the chain.
            for round in 0..<3 {
                try kafka.produce([apiCall("c\(round)")], partition: 1)
                try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            }
            try schema.query(
                "DELETE FROM {s}.batches WHERE partition = 1 AND from_offset = (SELECT min(from_offset) + 1 FROM {s}.batches WHERE partition = 1 AND from_offset > 0)"
            )
            let deleted = try schema.count("SELECT 9 - count(*) FROM {s}.batches WHERE partition = 1")
            let report = try reconcile(schema)

            #expect(!report.passes)
            #expect(report.partitions.map(\.partition.partition) == [1])
            #expect(report.partitions[0].missing.isEmpty)
            #expect(
                report.partitions[0].batchProblems.count == 1,
                "\(report.partitions[0].batchProblems) after deleting \(deleted)")
            #expect(report.partitions[0].batchProblems.first?.contains("no batch record covers offsets") == true)
        }
    }

    @Test func commandExitsWithTheResult() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try await Self.ingestHealthy(kafka, schema)
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            let path = directory.appendingPathComponent("tally.yaml").path
            try """
            kafka:
              brokers: \(kafka.cluster.bootstrapServers)
              topics: [usage]
              group_id: tally-test
            postgres:
              schema: \(schema.name)
            meters:
              - slug: api_calls
                event_type: api.call
                aggregation: sum
                value: $.data.quantity
            """.write(toFile: path, atomically: true, encoding: .utf8)

            let range = ["--from", "2025-01-15T00:00:00Z", "--to", "2025-01-16T00:00:00Z"]
            // Commands that ask Kafka block for a while, so they run on a thread of their own.
            func status(_ arguments: [String]) async throws -> Int32 {
                try await onOwnThread { TallyCommand.main(["tally"] + arguments) }
            }
            #expect(try await status(["reconcile", "--config", path] + range) == 0)
            #expect(try await status(["reconcile", "--config", path, "--json", "--offline"] + range) == 0)
            try schema.query("DELETE FROM {s}.rollups WHERE subject = 'cust-2'")
            #expect(try await status(["reconcile", "--config", path, "--offline"] + range) == 1)
            #expect(try await status(["reconcile", "--config", path, "--from", "x"]) == 2)

            // The query commands on the same schema.
            #expect(
                TallyCommand.main(
                    ["tally", "usage", "--config", path, "--meter", "api_calls", "--window", "day", "--format", "json"]
                        + range) == 0)
            #expect(
                TallyCommand.main(
                    ["tally", "events", "--config", path, "--subject", "cust-1", "--format", "csv"] + range)
                    == 0)
            #expect(try await status(["dead-letters", "list", "--config", path, "--json"]) == 0)
            #expect(try await status(["dead-letters", "show", "1", "--config", path]) == 0)
            #expect(try await status(["dead-letters", "show", "999", "--config", path]) == 1)
            #expect(try await status(["backfill", "--config", path, "--topic", "usage", "--dry-run"]) == 0)
            #expect(try await status(["backfill", "--config", path, "--topic", "usage", "--partition", "1"]) == 0)
            #expect(
                try await status([
                    "backfill", "--config", path, "--topic", "usage", "--from-time", "2025-01-15T00:00:00Z",
                ])
                    == 1)
            #expect(try await status(["backfill", "--config", path, "--resume", "999"]) == 1)
            #expect(try await status(["backfill", "--config", path, "--list", "--json"]) == 0)
            #expect(try schema.count("SELECT count(*) FROM {s}.backfill_runs WHERE status = 'finished'") == 1)
        }
    }
}
