import Foundation
import Tally
import Testing

/// `tally usage`, `tally events` and `tally dead-letters list` run as child processes, with
/// their output, error output and exit status.
@Suite("Query commands")
struct QueryCommandTests {
    struct Output {
        var status: Int32
        var standardOutput: String
        var standardError: String
    }

    /// Writes a configuration for `schema` with the meters `api_calls` (sum) and `calls`
    /// (count), and returns its path.
    static func writeConfiguration(_ kafka: TestKafka, _ schema: TestSchema, in directory: URL) throws -> String {
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
          - slug: calls
            event_type: api.call
            aggregation: count
        """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// Runs the `tally` that scripts/test built with `arguments`, and returns what it printed.
    static func runTally(_ arguments: [String], in directory: URL) throws -> Output {
        let outputURL = directory.appendingPathComponent("stdout-\(UUID().uuidString)")
        let errorURL = directory.appendingPathComponent("stderr-\(UUID().uuidString)")
        for url in [outputURL, errorURL] where !FileManager.default.createFile(atPath: url.path, contents: nil) {
            throw SetupError("cannot create \(url.path)")
        }
        let process = Process()
        process.executableURL = try tallyExecutable()
        process.arguments = arguments
        process.standardOutput = try FileHandle(forWritingTo: outputURL)
        process.standardError = try FileHandle(forWritingTo: errorURL)
        try process.run()
        process.waitUntilExit()
        return Output(
            status: process.terminationStatus, standardOutput: try String(contentsOf: outputURL, encoding: .utf8),
            standardError: try String(contentsOf: errorURL, encoding: .utf8))
    }

    /// Ingests three events of cust-1 at 12:00:10, one of them with a quantity beyond the
    /// precision of a Double, and two malformed messages, then runs `body` with a
    /// configuration file and a function that runs tally.
    func withIngestedSchema(
        _ body: @escaping @Sendable (String, @escaping @Sendable ([String]) throws -> Output) throws -> Void
    ) async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                apiCall("e1", "cust-1", "2"),
                apiCall("e2", "cust-1", "9007199254740993.027121761950711698"),
                apiCall("e3", "cust-1", "3"),
                "{broken",
                "{broken too",
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            let path = try Self.writeConfiguration(kafka, schema, in: directory)
            try await onOwnThread {
                try body(path) { try Self.runTally($0, in: directory) }
            }
        }
    }

    static let day = ["--from", "2025-01-15T00:00:00Z", "--to", "2025-01-16T00:00:00Z"]

    @Test func wrongMeterZoneAndGroupExitWithTwo() async throws {
        try await withIngestedSchema { config, tally in
            let usage = ["usage", "--config", config] + Self.day

            let meter = try tally(usage + ["--meter", "nosuch"])
            #expect(meter.status == 2)
            #expect(meter.standardError.contains("meter nosuch is not recorded"))
            #expect(meter.standardError.contains("api_calls, calls"))

            let zone = try tally(usage + ["--meter", "api_calls", "--time-zone", "Mars/Olympus"])
            #expect(zone.status == 2)
            #expect(zone.standardError.contains("--time-zone Mars/Olympus"))

            let group = try tally(usage + ["--meter", "api_calls", "--group-by", "nosuch"])
            #expect(group.status == 2)
            #expect(group.standardError.contains("no group-by key nosuch"))

            let events = try tally(
                ["events", "--config", config, "--subject", "cust-1", "--meter", "nosuch"] + Self.day)
            #expect(events.status == 2)
            #expect(events.standardError.contains("meter nosuch is not recorded"))

            let valid = try tally(usage + ["--meter", "api_calls", "--time-zone", "Asia/Kathmandu"])
            #expect(valid.status == 0, "\(valid.standardError)")
        }
    }

    @Test func usageRejectsBoundsInsideAMinute() async throws {
        try await withIngestedSchema { config, tally in
            let usage = ["usage", "--config", config, "--meter", "api_calls"]

            let from = try tally(usage + ["--from", "2025-01-15T12:00:30Z", "--to", "2025-01-16T00:00:00Z"])
            #expect(from.status == 2)
            #expect(from.standardError.contains("--from 2025-01-15T12:00:30Z is not on a whole minute"))

            let to = try tally(usage + ["--from", "2025-01-15T00:00:00Z", "--to", "2025-01-15T12:00:00.5Z"])
            #expect(to.status == 2)
            #expect(to.standardError.contains("--to"))

            let whole = try tally(
                usage + ["--from", "2025-01-15T12:00:00Z", "--to", "2025-01-15T12:01:00Z", "--format", "csv"])
            #expect(whole.status == 0, "\(whole.standardError)")
            #expect(whole.standardOutput.contains("9007199254740998.027121761950711698"))
        }
    }

    @Test func cutOffListsSaySo() async throws {
        try await withIngestedSchema { config, tally in
            let events = ["events", "--config", config, "--subject", "cust-1", "--format", "csv"] + Self.day

            let cut = try tally(events + ["--limit", "2"])
            #expect(cut.status == 0)
            #expect(cut.standardOutput.split(separator: "\n").count == 3)
            #expect(cut.standardError.contains("showing the first 2 rows, and more match"))

            let whole = try tally(events + ["--limit", "3"])
            #expect(whole.status == 0)
            #expect(whole.standardOutput.split(separator: "\n").count == 4)
            #expect(whole.standardError.isEmpty)

            let letters = try tally(["dead-letters", "list", "--config", config, "--limit", "1", "--json"])
            #expect(letters.status == 0)
            #expect(letters.standardError.contains("showing the first 1 dead letters, and more match"))
            let all = try tally(["dead-letters", "list", "--config", config, "--limit", "2"])
            #expect(all.standardError.isEmpty)
        }
    }

    @Test func jsonQuantitiesAreStrings() async throws {
        try await withIngestedSchema { config, tally in
            let events = try tally(
                ["events", "--config", config, "--subject", "cust-1", "--meter", "api_calls", "--format", "json"]
                    + Self.day)
            #expect(events.status == 0)
            #expect(events.standardOutput.contains(#""quantity":"9007199254740993.027121761950711698""#))
            #expect(events.standardOutput.contains(#""quantity":"2""#))

            let usage = try tally(
                ["usage", "--config", config, "--meter", "api_calls", "--window", "day", "--format", "json"] + Self.day)
            #expect(usage.status == 0)
            #expect(usage.standardOutput.contains(#""value":"9007199254740998.027121761950711698""#))
            #expect(usage.standardOutput.contains(#""events":3"#))
        }
    }
}
