import Foundation
import Glibc
import Postgres
import Tally

/// Returns the `tally` executable named by `TALLY_BINARY`, or the one that `swift build` put
/// next to the test bundle.
func tallyExecutable() throws -> URL {
    if let path = ProcessInfo.processInfo.environment["TALLY_BINARY"], !path.isEmpty {
        return URL(fileURLWithPath: path)
    }
    let bundle = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    var directory = bundle.deletingLastPathComponent()
    // On Linux the test bundle is an executable in the bin directory; elsewhere a directory.
    for _ in 0..<4 {
        let candidate = directory.appendingPathComponent("tally")
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
        directory = directory.deletingLastPathComponent()
    }
    throw SetupError("no tally executable next to \(bundle.path); run swift build first, or set TALLY_BINARY")
}

/// Writes the YAML configuration of a `tally run` process for the tests' topic, schema and meters.
func writeProcessConfiguration(
    kafka: TestKafka, schema: TestSchema, groupID: String, extraIngest: String = "", extraProperties: String = ""
) throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("tally-\(UUID().uuidString).yaml")
    let text = """
        kafka:
          brokers: \(kafka.cluster.bootstrapServers)
          topics: [\(kafka.topic)]
          group_id: \(groupID)
          properties:
            session.timeout.ms: "6000"
            heartbeat.interval.ms: "500"
            log_level: "3"
        \(extraProperties)
        postgres:
          schema: \(schema.name)
        ingest:
          batch:
            max_wait: 200ms
        \(extraIngest)
        log:
          level: info
        meters:
          - slug: api_calls
            event_type: api.call
            aggregation: sum
            value: $.data.quantity
          - slug: calls
            event_type: api.call
            aggregation: count
        """
    try text.write(to: url, atomically: true, encoding: .utf8)
    return url
}

/// A `tally` child process whose stderr goes to a file.
final class TallyProcess: @unchecked Sendable {
    let process = Process()
    let logURL: URL
    let startedAt = Date()

    init(_ arguments: [String], environment extra: [String: String] = [:]) throws {
        logURL = FileManager.default.temporaryDirectory.appendingPathComponent("tally-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: logURL.path, contents: nil)
        process.executableURL = try tallyExecutable()
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        environment.removeValue(forKey: "TALLY_TEST_HOOK")
        environment.merge(extra) { $1 }
        process.environment = environment
        process.standardOutput = FileHandle.nullDevice
        process.standardError = try FileHandle(forWritingTo: logURL)
        try process.run()
    }

    var log: String {
        (try? String(contentsOf: logURL, encoding: .utf8)) ?? ""
    }

    var logLines: [String] { log.split(separator: "\n").map(String.init) }

    func signal(_ number: Int32) {
        if process.isRunning { kill(process.processIdentifier, number) }
    }

    /// Waits for the process to end and returns its status, or nil after `timeoutSeconds`.
    func waitForExit(timeoutSeconds: Double) async throws -> (status: Int32, signaled: Bool)? {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while process.isRunning && Date() < deadline {
            try await Task.sleep(nanoseconds: 20_000_000)
        }
        guard !process.isRunning else { return nil }
        return (process.terminationStatus, process.terminationReason == .uncaughtSignal)
    }

    /// Waits until a log line contains `text`, and returns that line.
    @discardableResult
    func waitForLog(_ text: String, timeoutSeconds: Double = 60) async throws -> String {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Date() < deadline {
            if let line = logLines.first(where: { $0.contains(text) }) { return line }
            if !process.isRunning {
                throw SetupError("tally exited before logging \(text); its log:\n\(log)")
            }
            try await Task.sleep(nanoseconds: 20_000_000)
        }
        throw SetupError("tally did not log \(text) within \(timeoutSeconds) s; its log:\n\(log)")
    }

    /// Kills the process if it still runs, and removes the log file.
    func cleanUp() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(at: logURL)
    }
}

/// Polls PostgreSQL until the stored offset of `partition` reaches `offset`.
func waitForStoredOffset(
    _ schema: TestSchema, partition: Int32 = 0, atLeast offset: Int64, timeoutSeconds: Double = 60
) async throws {
    let connection = try PostgresConnection(conninfo: "", applicationName: "tally tests")
    defer { connection.close() }
    let deadline = Date().addingTimeInterval(timeoutSeconds)
    var last: Int64?
    while Date() < deadline {
        let result = try connection.execute(
            "SELECT next_offset FROM \(schema.name).partition_offsets WHERE partition = $1",
            [.text(String(partition))])
        last = result.rowCount == 1 ? result.int(row: 0, column: 0) : nil
        if let last, last >= offset { return }
        try await Task.sleep(nanoseconds: 20_000_000)
    }
    throw SetupError("the stored offset of partition \(partition) is \(last.map(String.init) ?? "none"), not \(offset)")
}
