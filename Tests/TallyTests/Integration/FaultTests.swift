import Foundation
import Glibc
import Kafka
import Postgres
import Synchronization
import Tally
import Testing

/// PostgreSQL outages, workers without progress, and shutdown under faults.
@Suite("Faults")
struct FaultTests {
    /// A PostgreSQL role for one worker, so that a test can refuse that worker's connections
    /// (`NOLOGIN` and `pg_terminate_backend`) without touching the other tests.
    final class WorkerRole: Sendable {
        let name = "tally_fault_" + UUID().uuidString.prefix(8).lowercased()

        init(_ schema: TestSchema) throws {
            try schema.query("CREATE ROLE \(name) LOGIN SUPERUSER")
        }

        /// Refuses new connections of the role and ends the open ones.
        func cutOff(_ schema: TestSchema) throws {
            try schema.query("ALTER ROLE \(name) NOLOGIN")
            try schema.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '\(name)'")
        }

        func restore(_ schema: TestSchema) throws {
            try schema.query("ALTER ROLE \(name) LOGIN")
        }

        func drop(_ schema: TestSchema) {
            _ = try? schema.query("REASSIGN OWNED BY \(name) TO CURRENT_USER")
            _ = try? schema.query("DROP ROLE \(name)")
        }
    }

    /// While PostgreSQL refuses the worker for longer than max.poll.interval.ms, the worker
    /// pauses its partitions and keeps polling: it keeps its membership, reports that it makes no
    /// progress, lets a joining member take partitions, and resumes by itself afterwards.
    @Test func postgresOutageKeepsTheGroupMembership() async throws {
        try await withTestSchema { schema in
            let role = try WorkerRole(schema)
            defer { role.drop(schema) }
            let kafka = try TestKafka(partitions: 2)
            let clock = try clockNearT0()
            var configuration = try testConfiguration(kafka: kafka, schema: schema)
            configuration.kafka.properties += [("max.poll.interval.ms", "7000")]
            configuration.ingest.noProgressTimeoutMilliseconds = 1000
            // Small batches: the pending batch fills up during the outage, and the worker pauses.
            configuration.ingest.batchMaxMessages = 200
            var first = configuration
            first.postgres.conninfo = "user=\(role.name)"
            let sink = LogSink.capturing()
            let w1 = RunningWorker(configuration: first, clock: clock, logger: Logger(level: .info, sink: sink))
            defer { try? w1.stop() }
            for partition in Int32(0)..<2 {
                try kafka.produce((0..<50).map { apiCall("before-\(partition)-\($0)") }, partition: partition)
            }
            try await w1.waitUntilCaughtUp(with: kafka)

            try role.cutOff(schema)
            for partition in Int32(0)..<2 {
                try kafka.produce((0..<500).map { apiCall("during-\(partition)-\($0)") }, partition: partition)
            }
            try await waitUntil("the worker to pause") {
                sink.capturedLines.contains { $0.contains("pausing consumption until the batch in flight is written") }
            }
            // Longer than max.poll.interval.ms: the worker keeps its partitions.
            try await Task.sleep(nanoseconds: 9_000_000_000)
            let outageLines = sink.capturedLines
            #expect(
                !outageLines.contains {
                    $0.contains("max.poll.interval.ms exceeded") || $0.contains("partitions lost")
                },
                "\(outageLines.joined(separator: "\n"))")
            #expect(outageLines.contains { $0.contains("no progress while lag exists") })

            // A second member joins during the outage; the paused worker serves the rebalance.
            let w2 = RunningWorker(configuration: configuration, clock: clock)
            defer { try? w2.stop() }
            try await Task.sleep(nanoseconds: 4_000_000_000)

            try role.restore(schema)
            try await waitForStoredOffset(schema, partition: 0, atLeast: 550)
            try await waitForStoredOffset(schema, partition: 1, atLeast: 550)
            try kafka.produce((0..<10).map { apiCall("after-\($0)") }, partition: 0)
            try kafka.produce((0..<10).map { apiCall("after-1-\($0)") }, partition: 1)
            try await waitForStoredOffset(schema, partition: 0, atLeast: 560)
            try await waitForStoredOffset(schema, partition: 1, atLeast: 560)
            try w2.stop()
            try w1.stop()

            let lines = sink.capturedLines
            // The 2.0.2 mock cluster may still declare an assignment lost when an offset commit
            // races a cooperative rebalance; that is not a missed poll.
            #expect(
                !lines.contains { $0.contains("max.poll.interval.ms exceeded") }, "\(lines.joined(separator: "\n"))")
            #expect(lines.contains { $0.contains("consumption resumed") })
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 1120)
            #expect(try schema.count("SELECT count(DISTINCT event_id) FROM {s}.ledger") == 1120)
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 0)
            try schema.expectInvariants()
        }
    }

    /// A batch that keeps failing leaves the worker without progress while lag exists: it logs
    /// it, and `tally stats` shows it, until the cause is gone.
    @Test func noProgressIsReportedInStats() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            var configuration = try testConfiguration(kafka: kafka, schema: schema)
            configuration.ingest.noProgressTimeoutMilliseconds = 1000
            try schema.query(
                """
                CREATE FUNCTION {s}.stuck() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.event_id = 'stuck' THEN RAISE EXCEPTION 'stuck for the test'; END IF; RETURN NEW; END $$
                """)
            try schema.query(
                "CREATE TRIGGER stuck BEFORE INSERT ON {s}.ledger FOR EACH ROW EXECUTE FUNCTION {s}.stuck()")
            let sink = LogSink.capturing()
            let worker = RunningWorker(
                configuration: configuration, clock: try clockNearT0(), logger: Logger(level: .info, sink: sink))
            defer { try? worker.stop() }
            try kafka.produce([apiCall("fine"), apiCall("stuck"), apiCall("later")])

            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            var problems: [String] = []
            try await waitUntil("stats to report no progress", timeoutSeconds: 30) {
                let report = try store.statsReport(meters: try standardMeters())
                problems = report.problems(stalledAfterSeconds: 60)
                return report.workers.contains { $0.status == "no_progress" }
            }
            #expect(problems.contains { $0.contains("makes no progress on usage[0]") && $0.contains("lag 2") })
            let warning = sink.capturedLines.first { $0.contains("no progress while lag exists") }
            #expect(warning != nil)
            #expect(warning?.contains("lag=2") == true)

            try schema.query("DROP TRIGGER stuck ON {s}.ledger")
            try await waitForStoredOffset(schema, atLeast: 3)
            try await waitUntil("the status to recover", timeoutSeconds: 30) {
                try store.statsReport(meters: try standardMeters()).workers.allSatisfy { $0.status == "consuming" }
            }
            try worker.stop()
            let report = try store.statsReport(meters: try standardMeters())
            #expect(report.workers.map(\.status) == ["stopped"])
            #expect(report.problems(stalledAfterSeconds: 60).isEmpty)
            store.connection.close()
            try schema.expectInvariants()
        }
    }

    /// SIGTERM exits 0 within ingest.shutdown_timeout even when the group coordinator cannot
    /// be reached, and a second signal exits at once.
    @Test func shutdownIsBoundedAndASecondSignalExitsAtOnce() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let config = try writeProcessConfiguration(
                kafka: kafka, schema: schema, groupID: "shutdown-\(UUID().uuidString.prefix(8))",
                extraIngest: "  shutdown_timeout: 3s")
            defer { try? FileManager.default.removeItem(at: config) }
            try kafka.produce(GroupFieldCaseTests.threeEvents(time: GroupFieldCaseTests.nowText()))

            // The broker goes away; the worker cannot leave the group cleanly.
            let bounded = try TallyProcess(["run", "--config", config.path])
            defer { bounded.cleanUp() }
            try await bounded.waitForLog("usage[0]@")
            try await waitForStoredOffset(schema, atLeast: 3)
            try kafka.cluster.setBrokerDown(1)
            try await Task.sleep(nanoseconds: 500_000_000)
            let signaled = Date()
            bounded.signal(SIGTERM)
            let exit = try await bounded.waitForExit(timeoutSeconds: 10)
            let took = Date().timeIntervalSince(signaled)
            #expect(exit?.status == 0, "\(bounded.log)")
            #expect(exit?.signaled == false, "\(bounded.log)")
            // Bounded by the 3 s timeout, with room for a loaded machine; without the bound the
            // worker would wait for the unreachable coordinator.
            #expect(took < 10, "the stop took \(took) s with a 3 s shutdown timeout")
            try kafka.cluster.setBrokerUp(1)

            // A stop waits for the statement in flight, here one that sleeps; a second signal
            // does not wait for it.
            try schema.query("CREATE SEQUENCE {s}.slow_once")
            try schema.query(
                """
                CREATE FUNCTION {s}.slow() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.event_id = 'slow' AND nextval('{s}.slow_once') = 1 THEN PERFORM pg_sleep(20); END IF;
                RETURN NEW; END $$
                """)
            try schema.query("CREATE TRIGGER slow BEFORE INSERT ON {s}.ledger FOR EACH ROW EXECUTE FUNCTION {s}.slow()")
            try kafka.produce([apiCall("slow", time: GroupFieldCaseTests.nowText())])
            let impatient = try TallyProcess(["run", "--config", config.path])
            defer { impatient.cleanUp() }
            try await impatient.waitForLog("usage[0]@3")
            try await waitUntil("the batch to sleep in PostgreSQL") {
                try schema.count(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE '%\(schema.name)%'"
                ) > 0
            }
            impatient.signal(SIGTERM)
            try await impatient.waitForLog("stop requested")
            try await Task.sleep(nanoseconds: 300_000_000)
            let second = Date()
            impatient.signal(SIGINT)
            let quick = try await impatient.waitForExit(timeoutSeconds: 10)
            #expect(quick != nil, "\(impatient.log)")
            // The first signal alone would end the process 3 s after it, at the shutdown timeout.
            #expect(Date().timeIntervalSince(second) < 2, "\(impatient.log)")
            #expect(impatient.log.contains("second stop signal"))
            try schema.query(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE '%\(schema.name)%'"
            )

            // The transaction made that safe: the next run writes the event once.
            let next = try TallyProcess(["run", "--config", config.path])
            defer { next.cleanUp() }
            try await next.waitForLog("usage[0]@3")
            try await waitForStoredOffset(schema, atLeast: 4)
            next.signal(SIGTERM)
            #expect(try await next.waitForExit(timeoutSeconds: 10)?.status == 0)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger WHERE event_id = 'slow'") == 1)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 4)
            try schema.expectInvariants()
        }
    }
}
