import Foundation
import Glibc
import Kafka
import Postgres
import Synchronization
import Tally
import Testing

/// A point where a worker's thread waits until the test releases it.
final class Gate: Sendable {
    private let semaphore = DispatchSemaphore(value: 0)
    private let state = Mutex((armed: false, entered: false))

    /// Makes the next `pass` block.
    func arm() { state.withLock { $0.armed = true } }

    var entered: Bool { state.withLock { $0.entered } }

    /// Blocks the calling thread when armed, once, until `release` or `timeoutSeconds`.
    func pass(timeoutSeconds: Double = 60) {
        let shouldWait = state.withLock { state -> Bool in
            guard state.armed else { return false }
            state.armed = false
            state.entered = true
            return true
        }
        if shouldWait { _ = semaphore.wait(timeout: .now() + timeoutSeconds) }
    }

    func release() { semaphore.signal() }
}

/// Waits until `condition` holds, polling every 20 ms, or throws after `timeoutSeconds`.
func waitUntil(
    _ what: String, timeoutSeconds: Double = 60, _ condition: () throws -> Bool
) async throws {
    let deadline = Date().addingTimeInterval(timeoutSeconds)
    while Date() < deadline {
        if try condition() { return }
        try await Task.sleep(nanoseconds: 20_000_000)
    }
    throw SetupError("timed out after \(timeoutSeconds) s waiting for \(what)")
}

/// Consumer-group cases from the field: rebalances, zombies, start positions,
/// retention, crashes around COMMIT and transient database errors. Each comes from a public
/// bug report against a Kafka-to-database pipeline.
@Suite("Field cases: consumer groups and faults")
struct GroupFieldCaseTests {
    /// Returns the settings of a group whose members give up a partition quickly. librdkafka
    /// needs `max.poll.interval.ms` of at least `session.timeout.ms`, and the mock cluster a
    /// session of at least 6 s.
    static func shortPollConfiguration(kafka: TestKafka, schema: TestSchema) throws -> Configuration {
        var configuration = try testConfiguration(kafka: kafka, schema: schema)
        configuration.kafka.properties += [("max.poll.interval.ms", "7000")]
        return configuration
    }

    static func captured() -> (LogSink, Logger) {
        let sink = LogSink.capturing()
        return (sink, Logger(level: .info, sink: sink))
    }

    // MARK: 1

    /// W1 has committed e0..e2 and is inside the transaction that writes e3 when W2 joins and,
    /// because W1 stopped polling, takes the partition. W2 reads the stored offset 3 and waits
    /// on W1's row lock. When W1 commits, W2's compare-and-set fails and it goes on from the
    /// new stored offset.
    @Test func case1RedeliveryAfterARebalance() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let clock = try clockNearT0()
            let configuration = try Self.shortPollConfiguration(kafka: kafka, schema: schema)
            let gate = Gate()
            let writesThree = Mutex(false)
            var hooks = LedgerStoreTestHooks()
            hooks.beforeCommit = { () throws(PostgresError) in
                if writesThree.withLock({ $0 }) { gate.pass() }
            }
            let observer = Worker.Observer(beforeWrite: { ranges in
                writesThree.withLock { $0 = ranges.values.contains { $0.contains(3) } }
            })
            let (sink1, logger1) = Self.captured()
            let w1 = RunningWorker(
                configuration: configuration, clock: clock, logger: logger1, observer: observer, storeTestHooks: hooks)
            defer { try? w1.stop() }
            try kafka.produce((0..<3).map { apiCall("e\($0)") })
            try await w1.waitUntilCaughtUp(with: kafka)

            gate.arm()
            try kafka.produce((3..<6).map { apiCall("e\($0)") })
            try await waitUntil("W1 inside the transaction of e3") { gate.entered }

            let w2 = RunningWorker(configuration: configuration, clock: clock)
            defer { try? w2.stop() }
            // W2 gets the partition once W1 is out of the group, and blocks on W1's lock.
            try await waitUntil("W2 waiting for W1's lock", timeoutSeconds: 60) {
                // Other tests run workers at the same time; the query text names this schema.
                try schema.count(
                    """
                    SELECT count(*) FROM pg_stat_activity
                    WHERE wait_event_type = 'Lock' AND application_name = 'tally' AND query LIKE '%\(schema.name)%'
                    """) > 0
            }
            gate.release()

            try await waitForStoredOffset(schema, atLeast: 6)
            try w2.stop()
            try w1.stop()

            #expect(
                try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_offset")
                    == (0..<6).map { ["e\($0)"] })
            #expect(try schema.scalar("SELECT sum FROM {s}.rollups WHERE meter = 'api_calls'") == "6")
            #expect(try schema.scalar("SELECT event_count FROM {s}.rollups WHERE meter = 'calls'") == "6")
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == "6")
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 0)
            // At most one committed batch covers offset 3.
            #expect(
                try schema.count(
                    "SELECT count(*) FROM {s}.batches WHERE backfill_run IS NULL AND from_offset <= 3 AND next_offset > 3"
                )
                    == 1)
            #expect(
                sink1.capturedLines.contains { $0.contains("max.poll.interval.ms exceeded") },
                "\(sink1.capturedLines.joined(separator: "\n"))")
            try schema.expectInvariants()
        }
    }

    // MARK: 2

    /// The start position comes from PostgreSQL, never from Kafka's committed offset.
    @Test func case2StartPositionComesFromPostgreSQL() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let clock = try clockNearT0()
            try kafka.produce((0..<8).map { apiCall("e\($0)") })
            // e0..e4 are in the ledger and the stored offset is 5, as a worker of the group left them.
            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            store.consumerGroup = "tally-test"
            let validator = EventValidator(meters: MeterSet(try standardMeters()), limits: WorkerFailureTests.limits)
            let firstFive = (0..<5).map { index in
                let message = KafkaMessage(
                    topic: "usage", partition: 0, offset: Int64(index), key: nil,
                    value: Array(apiCall("e\(index)").utf8))
                return ValidatedMessage(message: message, outcome: validator.validate(message.value, now: clock.now()))
            }
            _ = try store.writeBatch(
                firstFive, expectedOffsets: [PartitionID(topic: "usage", partition: 0): nil], now: clock.now(),
                limits: WorkerFailureTests.limits)
            store.connection.close()
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == "5")

            // Kafka's committed offset for the group is 2.
            let partition = KafkaTopicPartition(topic: kafka.topic, partition: 0)
            func kafkaCommitted() throws -> Int64? {
                let client = try KafkaConsumer(properties: [
                    ("bootstrap.servers", kafka.cluster.bootstrapServers), ("group.id", "tally-test"),
                    ("enable.auto.commit", "false"), ("log_level", "3"),
                ])
                return try client.committedOffsets([partition], timeoutMilliseconds: 10_000).first?.offset
            }
            let committer = try KafkaConsumer(properties: [
                ("bootstrap.servers", kafka.cluster.bootstrapServers), ("group.id", "tally-test"),
                ("enable.auto.commit", "false"), ("log_level", "3"),
            ])
            try committer.commit([KafkaTopicPartition(topic: kafka.topic, partition: 0, offset: 2)], async: false)
            try committer.close()
            #expect(try kafkaCommitted() == 2)

            let (sink, logger) = Self.captured()
            let worker = RunningWorker(
                configuration: try testConfiguration(kafka: kafka, schema: schema), clock: clock, logger: logger)
            try await worker.waitUntilCaughtUp(with: kafka)
            // The asynchronous copy to Kafka follows the commit.
            try await waitUntil("Kafka's committed offset to follow") { try kafkaCommitted() == 8 }
            try worker.stop()

            #expect(sink.capturedLines.contains { $0.contains("partitions assigned") && $0.contains("usage[0]@5") })
            #expect(
                try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_offset")
                    == (0..<8).map { ["e\($0)"] })
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger WHERE kafka_offset BETWEEN 2 AND 4") == 3)
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 0)
            #expect(try kafkaCommitted() == 8)
            try schema.expectInvariants()
        }
    }

    // MARK: 3

    /// W1 stalls inside a batch of offsets 10..19 past max.poll.interval.ms; W2 takes the
    /// partition and commits them; W1's late commit fails its compare-and-set and is rolled
    /// back once, without retries.
    @Test func case3ZombieAfterMaxPollInterval() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let clock = try clockNearT0()
            let configuration = try Self.shortPollConfiguration(kafka: kafka, schema: schema)
            let gate = Gate()
            let observer = Worker.Observer(beforeWrite: { ranges in
                if ranges.values.contains(where: { $0.contains(10) }) { gate.pass() }
            })
            let (sink1, logger1) = Self.captured()
            let w1 = RunningWorker(configuration: configuration, clock: clock, logger: logger1, observer: observer)
            defer { try? w1.stop() }
            try kafka.produce((0..<10).map { apiCall("e\($0)") })
            try await w1.waitUntilCaughtUp(with: kafka)

            gate.arm()
            try kafka.produce((10..<20).map { apiCall("e\($0)") })
            try await waitUntil("W1 stalled in the batch of 10..19") { gate.entered }
            let w2 = RunningWorker(configuration: configuration, clock: clock)
            defer { try? w2.stop() }
            try await waitForStoredOffset(schema, atLeast: 20)
            gate.release()

            // W1 wakes, fails the compare-and-set, learns that it lost the partition and rejoins.
            try await waitUntil("W1 to log the lost partition") {
                sink1.capturedLines.contains { $0.contains("partitions lost") && $0.contains("usage[0]") }
            }
            try await waitUntil("W1 to roll back") {
                sink1.capturedLines.contains { $0.contains("stored offsets moved") }
            }
            try kafka.produce([apiCall("e20")])
            try await waitForStoredOffset(schema, atLeast: 21)
            try await Task.sleep(nanoseconds: 500_000_000)
            #expect(w1.failureMessage == nil)
            try w2.stop()
            try w1.stop()

            let rolledBack = sink1.capturedLines.filter { $0.contains("stored offsets moved") }
            #expect(rolledBack.count == 1, "W1 retried its stale commit: \(rolledBack)")
            #expect(rolledBack.first?.contains("usage[0]") == true)
            #expect(
                try schema.query(
                    "SELECT kafka_offset::text FROM {s}.ledger WHERE kafka_offset BETWEEN 10 AND 19 ORDER BY 1"
                )
                .count == 10)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 21)
            #expect(try schema.scalar("SELECT event_count FROM {s}.rollups WHERE meter = 'calls'") == "21")
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 0)
            try schema.expectInvariants()
        }
    }

    // MARK: 4

    /// Two events produced before any worker ran, with no offsets anywhere: both are read.
    @Test func case4NewGroupStartsAtTheLogStart() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([apiCall("first"), apiCall("second")])
            let (sink, logger) = Self.captured()
            var configuration = try testConfiguration(kafka: kafka, schema: schema)
            configuration.kafka.groupID = "brand-new-\(UUID().uuidString.prefix(8))"
            let worker = RunningWorker(configuration: configuration, clock: try clockNearT0(), logger: logger)
            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()
            #expect(sink.capturedLines.contains { $0.contains("partitions assigned") && $0.contains("usage[0]@start") })
            #expect(
                try schema.query("SELECT event_id FROM {s}.ledger ORDER BY kafka_offset") == [["first"], ["second"]])
            try schema.expectInvariants()
        }
    }

    // MARK: 5

    /// The stored offset is 100, but retention moved the log start to 150 (the log ends at
    /// 200): the gap 100..149 is recorded and logged as an error, and reading goes on from 150.
    @Test func case5OffsetsLostToRetention() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            // The 2.0.2 mock cluster keeps at most 5 MiB of message sets per partition. With one
            // message of about 103 KB per set, it keeps the last 50 of 200.
            let padding = String(repeating: "x", count: 103_400)
            for index in 0..<200 {
                let event =
                    #"{"specversion":"1.0","id":"r\#(index)","source":"test","type":"api.call","subject":"cust-1","time":"2025-01-15T12:00:10Z","data":{"quantity":1,"pad":"\#(padding)"}}"#
                try kafka.produce([event])
            }
            let marks = try kafka.watermarks()[0]!
            #expect(marks.low == 150, "the log is \(marks.low)..<\(marks.high)")
            #expect(marks.high == 200, "the log is \(marks.low)..<\(marks.high)")

            try schema.query(
                "INSERT INTO {s}.partition_offsets (topic, partition, first_offset, next_offset) VALUES ('usage', 0, 100, 100)"
            )
            let (sink, logger) = Self.captured()
            let worker = RunningWorker(
                configuration: try testConfiguration(kafka: kafka, schema: schema), clock: try clockNearT0(),
                logger: logger)
            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()

            #expect(
                try schema.query("SELECT from_offset::text, to_offset::text, reason FROM {s}.offset_gaps") == [
                    ["100", String(marks.low - 1), "retention"]
                ])
            #expect(try schema.scalar("SELECT count(*) FROM {s}.offset_gaps WHERE detected_at IS NOT NULL") == "1")
            let error = sink.capturedLines.first { $0.contains("level=error") && $0.contains("lost to retention") }
            #expect(error?.contains("gap.from_offset=100 gap.to_offset=\(marks.low - 1)") == true)
            #expect(
                try schema.query(
                    "SELECT min(kafka_offset)::text, max(kafka_offset)::text, count(*)::text FROM {s}.ledger")
                    == [[String(marks.low), "199", String(200 - marks.low)]])
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == "200")

            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            let report = try store.statsReport(meters: try standardMeters(), partitionCounts: ["usage": 1])
            #expect(report.retentionGaps.map { [$0.fromOffset, $0.toOffset] } == [[100, marks.low - 1]])
            #expect(report.partitions.first?.retentionGapOffsets == marks.low - 100)
            try schema.expectInvariants()
        }
    }

    // MARK: 6

    /// e0: cust-1, 5; e1: cust-1, 7; e2: cust-2, 11; at T0, or at `time`.
    static func threeEvents(time: String = "2025-01-15T12:00:10Z") -> [String] {
        [
            apiCall("e0", "cust-1", "5", time: time), apiCall("e1", "cust-1", "7", time: time),
            apiCall("e2", "cust-2", "11", time: time),
        ]
    }

    /// Now, in RFC 3339, for events that a `tally run` process with the system clock accepts.
    static func nowText() -> String {
        let formatter = ISO8601DateFormatter()
        formatter.timeZone = TimeZone(identifier: "UTC")
        return formatter.string(from: Date().addingTimeInterval(-60))
    }

    static func expectThreeEvents(_ schema: TestSchema, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 3, sourceLocation: sourceLocation)
        #expect(
            try schema.query(
                "SELECT subject, sum::text, event_count::text FROM {s}.rollups WHERE meter = 'api_calls' ORDER BY subject"
            ) == [["cust-1", "12", "2"], ["cust-2", "11", "1"]], sourceLocation: sourceLocation)
        #expect(
            try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == "3", sourceLocation: sourceLocation)
        #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 0, sourceLocation: sourceLocation)
        try schema.expectInvariants(sourceLocation: sourceLocation)
    }

    /// SIGKILL right after the PostgreSQL COMMIT returned, before any Kafka commit; and, as a
    /// variant, after the inserts but before COMMIT. Uses the `TALLY_TEST_HOOK` of `tally run`.
    @Test(arguments: ["kill-after-commit", "kill-before-commit"])
    func case6CrashBetweenThePostgreSQLAndTheKafkaCommit(hook: String) async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let group = "crash-\(UUID().uuidString.prefix(8))"
            let config = try writeProcessConfiguration(
                kafka: kafka, schema: schema, groupID: group, extraIngest: "  shutdown_timeout: 10s")
            defer { try? FileManager.default.removeItem(at: config) }
            try kafka.produce(Self.threeEvents(time: Self.nowText()))

            let crashing = try TallyProcess(
                ["run", "--config", config.path], environment: ["TALLY_TEST_HOOK": hook])
            defer { crashing.cleanUp() }
            let crash = try await crashing.waitForExit(timeoutSeconds: 60)
            #expect(
                crash?.signaled == true && crash?.status == SIGKILL, "tally did not die by SIGKILL: \(crashing.log)")

            let committed = try KafkaConsumer(properties: [
                ("bootstrap.servers", kafka.cluster.bootstrapServers), ("group.id", group), ("log_level", "3"),
            ]).committedOffsets([KafkaTopicPartition(topic: kafka.topic, partition: 0)], timeoutMilliseconds: 10_000)
            #expect(committed.first?.offset == nil, "a Kafka commit happened before the kill")
            if hook == "kill-after-commit" {
                try Self.expectThreeEvents(schema)
            } else {
                #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 0)
                #expect(try schema.count("SELECT count(*) FROM {s}.partition_offsets") == 0)
                // Nothing was committed, so the restart reads from the log start and commits 0..2.
                let recovering = try TallyProcess(["run", "--config", config.path])
                defer { recovering.cleanUp() }
                try await recovering.waitForLog("usage[0]@start")
                try await waitForStoredOffset(schema, atLeast: 3)
                recovering.signal(SIGTERM)
                #expect(try await recovering.waitForExit(timeoutSeconds: 20)?.status == 0)
                try Self.expectThreeEvents(schema)
            }

            // After the restart the worker reads from offset 3, and writes nothing twice.
            let restarted = try TallyProcess(["run", "--config", config.path])
            defer { restarted.cleanUp() }
            try await restarted.waitForLog("usage[0]@3")
            try await Task.sleep(nanoseconds: 1_000_000_000)
            restarted.signal(SIGTERM)
            let stopped = try await restarted.waitForExit(timeoutSeconds: 20)
            #expect(stopped?.status == 0, "\(restarted.log)")
            #expect(stopped?.signaled == false, "\(restarted.log)")
            try Self.expectThreeEvents(schema)
        }
    }

    // MARK: 7

    enum TransientFault: String, CaseIterable, CustomTestStringConvertible {
        case serializationFailureAtFirstCommit
        case connectionDropsDuringCommit
        case connectionDropsAfterCommitLanded
        case threeConnectionFailuresThenSuccess

        var testDescription: String { rawValue }
    }

    /// A transient database error neither loses nor duplicates a batch, and no committed state
    /// ever shows the stored offset 3 with fewer than 3 ledger rows.
    @Test(arguments: TransientFault.allCases)
    func case7TransientDatabaseErrors(fault: TransientFault) async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            var configuration = try testConfiguration(kafka: kafka, schema: schema)
            var hooks = LedgerStoreTestHooks()
            var observer = Worker.Observer()
            let role = "tally_case7_" + UUID().uuidString.prefix(8).lowercased()
            let failedConnections = Mutex(0)
            let assigned = Mutex(false)

            switch fault {
            case .serializationFailureAtFirstCommit, .connectionDropsDuringCommit:
                // A deferred constraint trigger runs at COMMIT; a sequence, which a rollback does
                // not undo, makes it fail the first COMMIT only.
                let action =
                    fault == .serializationFailureAtFirstCommit
                    ? "RAISE EXCEPTION 'could not serialize access' USING ERRCODE = 'serialization_failure';"
                    : "PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5);"
                try schema.query("CREATE SEQUENCE {s}.fault_once")
                try schema.query(
                    """
                    CREATE FUNCTION {s}.fault() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN IF nextval('{s}.fault_once') = 1 THEN \(action) END IF; RETURN NULL; END $$
                    """)
                try schema.query(
                    """
                    CREATE CONSTRAINT TRIGGER fault AFTER INSERT ON {s}.ledger DEFERRABLE INITIALLY DEFERRED
                    FOR EACH ROW EXECUTE FUNCTION {s}.fault()
                    """)
            case .connectionDropsAfterCommitLanded:
                let fired = Mutex(false)
                hooks.afterCommit = { () throws(PostgresError) in
                    guard
                        !fired.withLock({ value in
                            defer { value = true }
                            return value
                        })
                    else { return }
                    throw PostgresError(
                        kind: .connectionLost, message: "server closed the connection unexpectedly (test hook)",
                        operation: "execute")
                }
            case .threeConnectionFailuresThenSuccess:
                try schema.query("CREATE ROLE \(role) LOGIN SUPERUSER")
                configuration.postgres.conninfo = "user=\(role)"
                observer.partitionsAssigned = { _ in assigned.withLock { $0 = true } }
                observer.connectionFailed = { _ in
                    let count = failedConnections.withLock { count in
                        count += 1
                        return count
                    }
                    if count == 3, let admin = try? PostgresConnection(conninfo: "", applicationName: "tally tests") {
                        _ = try? admin.execute("ALTER ROLE \(role) LOGIN")
                        admin.close()
                    }
                }
            }

            // Watches every committed state: stored offset 3 always comes with 3 rows.
            let watching = Mutex(true)
            let violations = Mutex<[String]>([])
            let schemaName = schema.name
            let watcher = Thread {
                guard let connection = try? PostgresConnection(conninfo: "", applicationName: "tally tests") else {
                    return
                }
                while watching.withLock({ $0 }) {
                    if let result = try? connection.execute(
                        "SELECT (SELECT max(next_offset) FROM \(schemaName).partition_offsets), (SELECT count(*) FROM \(schemaName).ledger)"
                    ), let stored = result.int(row: 0, column: 0), let rows = result.int(row: 0, column: 1),
                        rows < stored
                    {
                        violations.withLock { $0.append("stored \(stored) with \(rows) rows") }
                    }
                    usleep(2000)
                }
                connection.close()
            }
            watcher.start()
            defer { watching.withLock { $0 = false } }

            let (sink, logger) = Self.captured()
            let worker = RunningWorker(
                configuration: configuration, clock: try clockNearT0(), logger: logger, observer: observer,
                storeTestHooks: hooks)
            defer { try? worker.stop() }
            if fault == .threeConnectionFailuresThenSuccess {
                try await waitUntil("the partition to be assigned") { assigned.withLock { $0 } }
                try schema.query("ALTER ROLE \(role) NOLOGIN")
                try schema.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '\(role)'")
            }
            try kafka.produce(Self.threeEvents())
            do {
                try await waitForStoredOffset(schema, atLeast: 3)
                if fault == .connectionDropsAfterCommitLanded {
                    try await waitUntil("the worker to find its commit") {
                        sink.capturedLines.contains { $0.contains("committed before the connection was lost") }
                    }
                }
            } catch {
                Issue.record(
                    "\(error); worker failure: \(worker.failureMessage ?? "none"); the worker's log:\n\(sink.capturedLines.joined(separator: "\n"))"
                )
                throw error
            }
            try worker.stop()
            watching.withLock { $0 = false }

            try Self.expectThreeEvents(schema)
            #expect(violations.withLock { $0 }.isEmpty)
            switch fault {
            case .serializationFailureAtFirstCommit, .connectionDropsDuringCommit:
                // One failed COMMIT, then one trigger call per row of the commit that landed.
                #expect(try schema.scalar("SELECT last_value FROM {s}.fault_once") == "4", "the fault did not fire")
            case .connectionDropsAfterCommitLanded:
                #expect(
                    sink.capturedLines.contains { $0.contains("committed before the connection was lost") },
                    "\(sink.capturedLines.joined(separator: "\n"))")
            case .threeConnectionFailuresThenSuccess:
                #expect(failedConnections.withLock { $0 } == 3)
                try schema.query("REASSIGN OWNED BY \(role) TO CURRENT_USER")
                try schema.query("DROP ROLE \(role)")
            }
        }
    }
}
