import Foundation
import Kafka
import KafkaMock
import Postgres
import Synchronization
import Tally
import Testing

/// A failure of the test setup itself, such as PostgreSQL not being reachable.
struct SetupError: Error, CustomStringConvertible {
    var description: String

    init(_ description: String) {
        self.description = description
    }
}

/// A fresh schema in the PostgreSQL server that `scripts/test` started (found through the
/// PG* environment variables), migrated to the current version. `withTestSchema` drops it.
final class TestSchema {
    let name: String
    let connection: PostgresConnection
    let logger: Logger

    init() throws {
        guard ProcessInfo.processInfo.environment["PGHOST"] != nil else {
            throw SetupError("PGHOST is not set; run the tests through scripts/test, which starts PostgreSQL")
        }
        name = "test_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(16).lowercased()
        logger = Logger(level: .warning)
        connection = try PostgresConnection(conninfo: "", applicationName: "tally tests")
        _ = try Migrator.migrate(connection, schema: name, logger: logger)
    }

    var settings: PostgresSettings { PostgresSettings(conninfo: "", schema: name) }

    func drop() {
        _ = try? connection.execute("DROP SCHEMA \(name) CASCADE")
        connection.close()
    }

    /// Runs a query and returns its rows as text.
    @discardableResult
    func query(_ sql: String, _ parameters: [String?] = []) throws -> [[String?]] {
        try connection.execute(
            sql.replacingOccurrences(of: "{s}", with: name), parameters.map { $0.map(PostgresParameter.text) }
        ).rows
    }

    /// The single value of a query that returns one row and one column.
    func scalar(_ sql: String, _ parameters: [String?] = []) throws -> String? {
        let rows = try query(sql, parameters)
        guard rows.count == 1, rows[0].count == 1 else {
            throw SetupError("expected one value from \(sql), got \(rows.count) rows")
        }
        return rows[0][0]
    }

    func count(_ sql: String) throws -> Int {
        Int(try scalar(sql) ?? "0") ?? -1
    }

    /// Checks the invariants that the batch transaction keeps. Every rollup equals its ledger
    /// rows. Every offset below each stored offset has exactly one outcome or lies in a recorded
    /// gap. A dead letter resolved by a replay is replaced by its ledger or duplicate row. No
    /// message is both accepted and dead-lettered. The live batch records of each
    /// partition chain from its first offset to its stored offset.
    func expectInvariants(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let mismatches = try query("SELECT meter, subject, minute::text FROM {s}.rollup_mismatches")
        #expect(mismatches.isEmpty, "rollups differ from the ledger: \(mismatches)", sourceLocation: sourceLocation)

        let outcomeGaps = try query(
            """
            WITH outcomes AS (
                SELECT kafka_topic AS topic, kafka_partition AS partition, kafka_offset AS kafka_offset FROM {s}.ledger
                UNION ALL SELECT kafka_topic, kafka_partition, kafka_offset FROM {s}.duplicates
                UNION ALL SELECT kafka_topic, kafka_partition, kafka_offset FROM {s}.dead_letters WHERE resolved_at IS NULL
                UNION ALL SELECT g.topic, g.partition, o FROM {s}.offset_gaps g, generate_series(g.from_offset, g.to_offset) o
            ), expected AS (
                SELECT p.topic, p.partition, o AS kafka_offset
                FROM {s}.partition_offsets p, generate_series(p.first_offset, p.next_offset - 1) o
            )
            SELECT e.topic, e.partition, e.kafka_offset, count(x.kafka_offset)
            FROM expected e
            LEFT JOIN outcomes x USING (topic, partition, kafka_offset)
            GROUP BY 1, 2, 3
            HAVING count(x.kafka_offset) <> 1
            """)
        #expect(
            outcomeGaps.isEmpty, "offsets without exactly one outcome: \(outcomeGaps)", sourceLocation: sourceLocation)

        let both = try count(
            """
            SELECT count(*) FROM {s}.ledger l JOIN {s}.dead_letters d
              ON d.kafka_topic = l.kafka_topic AND d.kafka_partition = l.kafka_partition AND d.kafka_offset = l.kafka_offset
            WHERE d.resolved_at IS NULL
            """)
        #expect(both == 0, "messages both accepted and dead-lettered", sourceLocation: sourceLocation)

        // Each partition's live batches chain from its first offset to its stored offset, so no
        // offset belongs to two committed batches and none to no batch.
        let brokenChains = try query(
            """
            WITH chain AS (
                SELECT topic, partition, from_offset, next_offset,
                       lag(next_offset) OVER (PARTITION BY topic, partition ORDER BY from_offset) AS previous_next
                FROM {s}.batches WHERE backfill_run IS NULL
            )
            SELECT p.topic, p.partition, p.first_offset, p.next_offset,
                   min(c.from_offset), max(c.next_offset),
                   count(*) FILTER (WHERE c.previous_next IS NOT NULL AND c.previous_next <> c.from_offset)
            FROM {s}.partition_offsets p
            LEFT JOIN chain c ON c.topic = p.topic AND c.partition = p.partition
            GROUP BY 1, 2, 3, 4
            HAVING min(c.from_offset) IS DISTINCT FROM p.first_offset
                OR max(c.next_offset) IS DISTINCT FROM p.next_offset
                OR count(*) FILTER (WHERE c.previous_next IS NOT NULL AND c.previous_next <> c.from_offset) > 0
            """)
        #expect(
            brokenChains.isEmpty, "batch records do not chain to the stored offsets: \(brokenChains)",
            sourceLocation: sourceLocation)
    }
}

/// Runs `body` with a new migrated schema and drops the schema afterwards.
func withTestSchema<Result>(_ body: (TestSchema) async throws -> Result) async throws -> Result {
    let schema = try TestSchema()
    defer { schema.drop() }
    return try await body(schema)
}

/// A mock Kafka cluster with one topic, and a producer that writes to chosen partitions.
final class TestKafka {
    let cluster: MockCluster
    let producer: KafkaProducer
    let topic: String
    let partitions: Int32

    init(topic: String = "usage", partitions: Int32 = 1) throws {
        cluster = try MockCluster(brokerCount: 1)
        try cluster.createTopic(topic, partitions: partitions)
        producer = try KafkaProducer(properties: [
            ("bootstrap.servers", cluster.bootstrapServers), ("linger.ms", "0"), ("log_level", "3"),
        ])
        self.topic = topic
        self.partitions = partitions
    }

    /// Produces raw values (nil for a tombstone) to one partition, in order, and waits for delivery.
    func produce(_ values: [[UInt8]?], partition: Int32 = 0, key: [UInt8]? = nil, headers: [KafkaHeader] = []) throws {
        for value in values {
            try producer.produce(topic: topic, partition: partition, key: key, value: value, headers: headers)
        }
        try producer.flush(timeoutMilliseconds: 10_000)
    }

    func produce(_ texts: [String], partition: Int32 = 0) throws {
        try produce(texts.map { Array($0.utf8) }, partition: partition)
    }

    /// Returns the log start and end of each partition.
    func watermarks() throws -> [Int32: KafkaWatermarks] {
        var marks: [Int32: KafkaWatermarks] = [:]
        for partition in 0..<partitions {
            marks[partition] = try producer.watermarks(topic: topic, partition: partition, timeoutMilliseconds: 10_000)
        }
        return marks
    }
}

/// A worker on its own thread, as `tally run` has it.
final class RunningWorker: @unchecked Sendable {
    let stopSignal = StopSignal()
    private let finished = DispatchSemaphore(value: 0)
    private let failure = Mutex<String?>(nil)
    private let assignedCount = Mutex(0)
    private let hasStopped = Mutex(false)
    private let settings: PostgresSettings

    /// The number of messages the worker has validated, retries not counted again.
    var validatedCount: Int { validated.withLock { $0 } }
    private let validated = Mutex(0)

    init(
        configuration: Configuration, clock: any TallyClock, logger: Logger = Logger(level: .warning),
        observer: Worker.Observer = Worker.Observer(), storeTestHooks: LedgerStoreTestHooks = LedgerStoreTestHooks()
    ) {
        let stopSignal = self.stopSignal
        settings = configuration.postgres
        let thread = Thread { [self] in
            var counting = observer
            counting.partitionsAssigned = { partitions in
                self.assignedCount.withLock { $0 += partitions.count }
                observer.partitionsAssigned(partitions)
            }
            counting.batchValidated = { count in
                self.validated.withLock { $0 += count }
                observer.batchValidated(count)
            }
            let worker = Worker(
                configuration: configuration, clock: clock, logger: logger, stopSignal: stopSignal, observer: counting,
                storeTestHooks: storeTestHooks)
            do {
                try worker.run()
            } catch {
                self.failure.withLock { $0 = String(describing: error) }
            }
            self.finished.signal()
        }
        thread.start()
    }

    /// Waits until the worker has been assigned `partitionCount` partitions and every
    /// partition that has messages is stored up to its log end.
    func waitUntilCaughtUp(with kafka: TestKafka, timeoutSeconds: Double = 60) async throws {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        let connection = try PostgresConnection(conninfo: settings.conninfo, applicationName: "tally tests")
        var lastSeen: [[String?]] = []
        while Date() < deadline {
            if let message = failure.withLock({ $0 }) {
                throw SetupError("the worker stopped: \(message)")
            }
            if assignedCount.withLock({ $0 }) >= Int(kafka.partitions) {
                let marks = try kafka.watermarks()
                let stored = try connection.execute(
                    "SELECT partition, next_offset FROM \(settings.schema).partition_offsets")
                lastSeen = stored.rows
                var offsets: [Int32: Int64] = [:]
                for row in 0..<stored.rowCount {
                    offsets[Int32(stored.int(row: row, column: 0)!)] = stored.int(row: row, column: 1)!
                }
                let done = marks.allSatisfy { partition, mark in
                    mark.low == mark.high || offsets[partition, default: -1] >= mark.high
                }
                if done { return }
            }
            try await Task.sleep(nanoseconds: 20_000_000)
        }
        throw SetupError("the worker did not catch up within \(timeoutSeconds) s; stored offsets: \(lastSeen)")
    }

    /// The error that ended the worker, if it failed.
    var failureMessage: String? { failure.withLock { $0 } }

    /// Stops the worker and waits for its thread to end. Calling it again returns at once.
    func stop() throws {
        stopSignal.request()
        let alreadyStopped = hasStopped.withLock { stopped in
            defer { stopped = true }
            return stopped
        }
        if !alreadyStopped {
            guard finished.wait(timeout: .now() + 60) == .success else {
                throw SetupError("the worker did not stop within 60 s")
            }
        }
        if let message = failure.withLock({ $0 }) {
            throw SetupError("the worker failed: \(message)")
        }
    }
}

/// The configuration of the tests: topic `usage`, the meters `api_calls` (sum of
/// `$.data.quantity`) and `calls` (count) for type `api.call`, and short batch waits.
func testConfiguration(kafka: TestKafka, schema: TestSchema, meters: [Meter]? = nil, groupID: String = "tally-test")
    throws -> Configuration
{
    var ingest = IngestSettings()
    ingest.batchMaxWaitMilliseconds = 50
    return Configuration(
        kafka: KafkaSettings(
            brokers: kafka.cluster.bootstrapServers, topics: [kafka.topic], groupID: groupID,
            properties: [("session.timeout.ms", "6000"), ("heartbeat.interval.ms", "500"), ("log_level", "3")]),
        postgres: schema.settings,
        ingest: ingest,
        meters: try meters ?? standardMeters())
}

func standardMeters() throws -> [Meter] {
    [
        Meter(slug: "api_calls", eventType: "api.call", aggregation: .sum, valuePath: try JSONPath("$.data.quantity")),
        Meter(slug: "calls", eventType: "api.call", aggregation: .count, valuePath: nil),
    ]
}

/// Runs a worker until it has written everything produced so far, then stops it. Returns the
/// number of messages it validated.
@discardableResult
func ingestAll(
    kafka: TestKafka, schema: TestSchema, clock: any TallyClock, meters: [Meter]? = nil,
    logger: Logger = Logger(level: .warning), configure: (inout Configuration) -> Void = { _ in }
) async throws -> Int {
    var configuration = try testConfiguration(kafka: kafka, schema: schema, meters: meters)
    configure(&configuration)
    let worker = RunningWorker(configuration: configuration, clock: clock, logger: logger)
    do {
        try await worker.waitUntilCaughtUp(with: kafka)
    } catch {
        try? worker.stop()
        throw error
    }
    try worker.stop()
    return worker.validatedCount
}

/// `E(id, subject, quantity, time)`: an `api.call` CloudEvent with no whitespace.
func apiCall(
    _ id: String, _ subject: String = "cust-1", _ quantity: String = "1", time: String = "2025-01-15T12:00:10Z"
)
    -> String
{
    #"{"specversion":"1.0","id":"\#(id)","source":"test","type":"api.call","subject":"\#(subject)","time":"\#(time)","data":{"quantity":\#(quantity)}}"#
}

/// Returns the default clock of the tests, set shortly after T0 = 2025-01-15T12:00:10Z.
func clockNearT0() throws -> ManualClock {
    ManualClock(try EventTime.parseRFC3339("2025-01-15T12:30:00Z"))
}

/// Runs blocking work on a thread of its own and waits for it without holding one of the few
/// threads of Swift's cooperative pool, which other tests running in parallel need.
func onOwnThread<Value: Sendable>(_ body: @escaping @Sendable () throws -> Value) async throws -> Value {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try body() }) }.start()
    }
}
