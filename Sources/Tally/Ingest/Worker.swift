import Glibc
import Kafka
import Postgres

/// A worker failure that stops `tally run`, with a one-line message for the operator.
public struct WorkerError: Error, Sendable, CustomStringConvertible {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// The ingest loop: consumes the topics as a member of the consumer group, validates each
/// batch of messages and writes it to the ledger in one transaction.
///
/// `run()` blocks its thread until `stopSignal` is set or a fatal error occurs. Everything,
/// the rebalance callbacks included, runs on that thread, so the worker needs no locks.
public final class Worker: KafkaRebalanceHandler {
    /// Callbacks for tests and embedding programs. All run on the worker's thread.
    public struct Observer: Sendable {
        /// After partitions start, with the stored offset each starts from (nil: the log start).
        public var partitionsAssigned: @Sendable ([PartitionID: Int64?]) -> Void = { _ in }
        /// After each committed batch.
        public var batchCommitted: @Sendable (BatchSummary) -> Void = { _ in }
        /// After validating a batch read from Kafka, with its message count. Retries of a
        /// batch keep its validated outcomes and do not call it again.
        public var batchValidated: @Sendable (Int) -> Void = { _ in }
        /// TEST HOOK: before each attempt to write a batch, with the offsets of each partition
        /// in it. A test can block here to stall the worker inside a batch.
        public var beforeWrite: @Sendable ([PartitionID: ClosedRange<Int64>]) -> Void = { _ in }
        /// After each failed attempt to connect to PostgreSQL.
        public var connectionFailed: @Sendable (Error) -> Void = { _ in }

        public init(
            partitionsAssigned: @escaping @Sendable ([PartitionID: Int64?]) -> Void = { _ in },
            batchCommitted: @escaping @Sendable (BatchSummary) -> Void = { _ in },
            batchValidated: @escaping @Sendable (Int) -> Void = { _ in },
            beforeWrite: @escaping @Sendable ([PartitionID: ClosedRange<Int64>]) -> Void = { _ in },
            connectionFailed: @escaping @Sendable (Error) -> Void = { _ in }
        ) {
            self.partitionsAssigned = partitionsAssigned
            self.batchCommitted = batchCommitted
            self.batchValidated = batchValidated
            self.beforeWrite = beforeWrite
            self.connectionFailed = connectionFailed
        }
    }

    let configuration: Configuration
    let clock: any TallyClock
    let logger: Logger
    let stopSignal: StopSignal
    let validator: EventValidator
    let limits: ValidationLimits
    let observer: Observer
    /// Fault injection inside the batch transaction, for tests; empty in production.
    let storeTestHooks: LedgerStoreTestHooks

    var store: LedgerStore?
    /// The second connection for batches written as two transactions; nil until first needed.
    var splitWriter: SplitWriter?
    var consumer: KafkaConsumer?
    /// The partitions being consumed, with the stored offset of each as of the last commit.
    var positions: [PartitionID: PartitionPosition] = [:]
    /// Partitions assigned while their stored offsets could not be read. They are assigned
    /// paused and start once PostgreSQL responds.
    var awaitingStart: Set<PartitionID> = []
    var startAttempt = RetryTimer()
    /// Partitions paused because a batch waits to be written or their offsets moved. They are
    /// moved to `positions[…].nextOffset` and resumed as soon as the write is over.
    var pausedForRestart: Set<PartitionID> = []
    var restartAttempt = RetryTimer()
    var pending = PendingBatch()
    var totals = IngestTotals()
    /// True while a batch is written, including the waits between its attempts.
    var isWriting = false
    var lastProgressLog = MonotonicTime.now()
    var lastMaintenance = MonotonicTime.now()
    var progress = ProgressTracker()
    let identity = WorkerIdentity()
    /// An error that ends `run()`, set where throwing is not possible (inside a rebalance).
    var fatalFailure: WorkerError?

    /// How often the dedupe partitions are checked, and progress is logged.
    static let maintenanceIntervalMilliseconds: Int64 = 10 * 60 * 1000
    static let progressIntervalMilliseconds: Int64 = 10 * 1000
    /// How often the worker checks its progress and writes its row of the `workers` table.
    static let statusIntervalMilliseconds: Int64 = 5 * 1000
    /// The maximum wait for one message, short so that a stop request is seen quickly.
    static let pollTimeoutMilliseconds: Int64 = 100
    /// How long a revocation may retry the batch of the revoked partitions before it rolls it
    /// back. The rebalance waits meanwhile, and the worker cannot poll.
    static let revocationWriteBudgetMilliseconds: Int64 = 5000

    public init(
        configuration: Configuration, clock: any TallyClock = SystemClock(), logger: Logger, stopSignal: StopSignal,
        observer: Observer = Observer(), storeTestHooks: LedgerStoreTestHooks = LedgerStoreTestHooks()
    ) {
        self.configuration = configuration
        self.clock = clock
        self.logger = logger
        self.stopSignal = stopSignal
        self.observer = observer
        self.storeTestHooks = storeTestHooks
        self.limits = ValidationLimits(
            maxPayloadBytes: configuration.ingest.maxPayloadBytes,
            dedupeWindowMicroseconds: configuration.ingest.dedupeWindowMicroseconds,
            maxFutureSkewMicroseconds: configuration.ingest.maxFutureSkewMicroseconds)
        self.validator = EventValidator(meters: MeterSet(configuration.meters), limits: limits)
    }

    /// Connects, joins the group and ingests until stopped. Throws when PostgreSQL or Kafka
    /// cannot be reached at start, or on a fatal Kafka error.
    public func run() throws {
        try start()
        defer {
            consumer = nil
            store?.connection.close()
            store = nil
            splitWriter?.store?.connection.close()
            splitWriter = nil
        }
        logger.info(
            "worker started",
            [
                "kafka.topics": configuration.kafka.topics.joined(separator: ","),
                "kafka.group_id": configuration.kafka.groupID,
                "pg.target": store!.connection.target,
                "pg.schema": configuration.postgres.schema,
                "meters": configuration.meters.count,
                "worker.id": identity.id,
            ])

        do {
            while !stopSignal.isRequested {
                let maxWait = Int64(configuration.ingest.batchMaxWaitMilliseconds)
                let timeout = min(
                    Self.pollTimeoutMilliseconds, max(0, pending.remainingWait(limitMilliseconds: maxWait)))
                if let result = consumer!.poll(timeoutMilliseconds: Int32(timeout)) {
                    try handle(result)
                }
                if pending.isFull(configuration.ingest) || pending.hasWaited(maxWait) {
                    flush()
                }
                if let fatalFailure {
                    throw fatalFailure
                }
                if !pausedForRestart.isEmpty { restartPausedPartitions() }
                if !awaitingStart.isEmpty { startAwaitingPartitions() }
                performPeriodicWork()
            }
        } catch {
            reportStatus(.stopped, detail: "\(error)")
            throw error
        }

        let stopSeen = MonotonicTime.now()
        logger.info("stopping", ["batch.messages": pending.messages.count])
        flush()
        do {
            // Leaving the group runs the revocation callback, which has nothing left to flush.
            // The budget is what the shutdown timeout leaves, less a margin for the exit.
            let spent = MonotonicTime.now().milliseconds(since: stopSeen)
            let budget = max(500, Int64(configuration.ingest.shutdownTimeoutMilliseconds) - spent - 1000)
            if try consumer?.close(timeoutMilliseconds: budget) == false {
                logger.warning(
                    "leaving the consumer group took too long; exiting without waiting for the group coordinator",
                    ["shutdown.wait_ms": budget])
            }
        } catch {
            logger.warning("leaving the consumer group failed", ["error": error])
        }
        reportStatus(.stopped, detail: "")
        logTotals("worker stopped")
    }

    // MARK: Start

    private func start() throws {
        let store: LedgerStore
        do {
            store = try LedgerStore(settings: configuration.postgres, logger: logger)
        } catch let error as PostgresError where error.kind == .connectionFailed {
            throw WorkerError("cannot connect to PostgreSQL: \(error.message)")
        }
        store.consumerGroup = configuration.kafka.groupID
        store.testHooks = storeTestHooks
        self.store = store
        let changed = try store.recordMeters(configuration.meters)
        for slug in changed {
            logger.warning(
                "meter definition changed; rollups written before were computed with the old definition",
                ["meter": slug])
        }
        try store.maintainDedupePartitions(now: clock.now(), limits: limits)

        let consumer = try KafkaConsumer(
            properties: configuration.kafka.consumerProperties,
            onLog: { [logger] record in logKafkaRecord(record, logger) },
            onError: { [logger] error in
                logger.rateLimited(
                    error.isFatal ? .error : .warning, "kafka client error", intervalSeconds: 10,
                    ["kafka.error": error.name, "error": error.message])
            })
        consumer.rebalanceHandler = self
        self.consumer = consumer

        let counts: [String: Int]
        do {
            counts = try consumer.partitionCounts(topics: configuration.kafka.topics, timeoutMilliseconds: 10_000)
        } catch {
            throw WorkerError("cannot reach the Kafka brokers at \(configuration.kafka.brokers): \(error.message)")
        }
        for topic in configuration.kafka.topics where counts[topic] == nil {
            throw WorkerError("topic \(topic) does not exist on the Kafka brokers at \(configuration.kafka.brokers)")
        }
        try consumer.subscribe(topics: configuration.kafka.topics)
    }

    // MARK: Messages

    private func handle(_ result: KafkaPollResult) throws {
        switch result {
        case .message(let message):
            accept(message)
        case .error(let error, let partition):
            try handleConsumerError(error, partition: partition)
        }
    }

    /// Logs a consumer error, and throws a fatal one.
    func handleConsumerError(_ error: KafkaError, partition: KafkaTopicPartition?) throws(WorkerError) {
        if error.isFatal {
            throw WorkerError("fatal Kafka error: \(error)")
        }
        if error.isMaxPollExceeded {
            // The revocation of the lost partitions follows on the next poll, and the consumer
            // rejoins the group by itself.
            logger.warning(
                "max.poll.interval.ms exceeded: the consumer left the group and its partitions move to other members. Dropping their uncommitted messages and rejoining",
                [
                    "kafka.partitions": describe(Array(positions.keys) + Array(awaitingStart)),
                    "batch.messages": pending.messages.count,
                ])
            return
        }
        logger.rateLimited(
            .warning, "kafka consumer error", intervalSeconds: 10,
            [
                "kafka.error": error.name, "error": error.message,
                "kafka.partition": partition.map { "\($0.topic)[\($0.partition)]" } ?? "-",
            ])
    }

    /// Adds a message to the pending batch, unless it is not ours or already handled.
    func accept(_ message: KafkaMessage) {
        let partition = PartitionID(topic: message.topic, partition: message.partition)
        guard var position = positions[partition], !pausedForRestart.contains(partition) else {
            // A message fetched before its partition was revoked or paused. A paused partition
            // is moved to its next offset before it resumes, so the message is read again.
            return
        }
        if let next = position.nextOffset, message.offset < next {
            logger.rateLimited(
                .warning, "skipping a message below the next offset to process", intervalSeconds: 60,
                [
                    "kafka.topic": message.topic, "kafka.partition": message.partition, "kafka.offset": message.offset,
                    "expected": next,
                ])
            return
        }
        position.nextOffset = message.offset + 1
        positions[partition] = position
        pending.append(message)
    }

    private func performPeriodicWork() {
        let now = MonotonicTime.now()
        if now.milliseconds(since: progress.lastCheck) >= Self.statusIntervalMilliseconds {
            let state = checkProgress(now: now)
            reportStatus(state.state, detail: state.detail)
        }
        if now.milliseconds(since: lastProgressLog) >= Self.progressIntervalMilliseconds {
            lastProgressLog = now
            if totals.batchesSinceLastLog > 0 { logTotals("ingest progress") }
            totals.batchesSinceLastLog = 0
        }
        if now.milliseconds(since: lastMaintenance) >= Self.maintenanceIntervalMilliseconds {
            lastMaintenance = now
            do {
                try store?.maintainDedupePartitions(now: clock.now(), limits: limits)
                try store?.deleteStaleWorkerStatuses(olderThanSeconds: 86_400)
            } catch {
                logger.warning("dedupe partition maintenance failed; retrying later", ["error": error])
            }
        }
    }

    func logTotals(_ message: String) {
        logger.info(
            message,
            [
                "batches": totals.batches, "ledger.accepted": totals.accepted, "ledger.unmetered": totals.unmetered,
                "ledger.duplicates": totals.duplicates, "ledger.dead_letters": totals.deadLetters,
            ])
    }
}

/// When to try a failed step again, with exponential backoff.
struct RetryTimer {
    var backoff = Backoff()
    var next = MonotonicTime.now()

    var isDue: Bool { MonotonicTime.now().nanoseconds >= next.nanoseconds }

    mutating func failed() {
        next = MonotonicTime(nanoseconds: MonotonicTime.now().nanoseconds + backoff.next() * 1_000_000)
    }

    mutating func succeeded() {
        backoff = Backoff()
        next = MonotonicTime.now()
    }
}

/// The worker's record of one assigned partition.
struct PartitionPosition {
    /// The stored offset in PostgreSQL as of the last commit: where the next batch starts.
    /// Nil when the partition has none yet.
    var storedOffset: Int64?
    /// The next offset to add to the pending batch; nil until the first message.
    var nextOffset: Int64?
}

/// Messages consumed and not yet written.
struct PendingBatch {
    var messages: [KafkaMessage] = []
    var bytes = 0
    var startedAt: MonotonicTime?

    var isEmpty: Bool { messages.isEmpty }

    mutating func append(_ message: KafkaMessage) {
        if messages.isEmpty { startedAt = MonotonicTime.now() }
        messages.append(message)
        bytes += (message.value?.count ?? 0) + (message.key?.count ?? 0)
    }

    mutating func removeAll() {
        messages.removeAll(keepingCapacity: true)
        bytes = 0
        startedAt = nil
    }

    func isFull(_ settings: IngestSettings) -> Bool {
        messages.count >= settings.batchMaxMessages || bytes >= settings.batchMaxBytes
    }

    func hasWaited(_ limitMilliseconds: Int64) -> Bool {
        guard let startedAt else { return false }
        return MonotonicTime.now().milliseconds(since: startedAt) >= limitMilliseconds
    }

    /// Milliseconds left before the batch must be written.
    func remainingWait(limitMilliseconds: Int64) -> Int64 {
        guard let startedAt else { return limitMilliseconds }
        return limitMilliseconds - MonotonicTime.now().milliseconds(since: startedAt)
    }
}

/// Counts since the worker started, for the progress log.
struct IngestTotals {
    var batches = 0
    var batchesSinceLastLog = 0
    var accepted = 0
    var unmetered = 0
    var duplicates = 0
    var deadLetters = 0

    mutating func add(_ summary: BatchSummary) {
        batches += 1
        batchesSinceLastLog += 1
        accepted += summary.accepted
        unmetered += summary.unmetered
        duplicates += summary.duplicates
        deadLetters += summary.deadLetterCount
    }
}

/// A reading of the monotonic clock, for timeouts that must not jump with the wall clock.
struct MonotonicTime {
    var nanoseconds: Int64

    static func now() -> MonotonicTime {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return MonotonicTime(nanoseconds: Int64(spec.tv_sec) * 1_000_000_000 + Int64(spec.tv_nsec))
    }

    func milliseconds(since earlier: MonotonicTime) -> Int64 {
        (nanoseconds - earlier.nanoseconds) / 1_000_000
    }
}

/// Forwards a librdkafka log line. Runs on librdkafka's threads; the logger is thread-safe.
private func logKafkaRecord(_ record: KafkaLogRecord, _ logger: Logger) {
    var level: Logger.Level
    switch record.level {
    case ...3: level = .error
    case 4: level = .warning
    case 5, 6: level = .info
    default: level = .debug
    }
    // A failed commit of the offset copy in Kafka, typically during a rebalance, changes
    // nothing: the worker starts from the offsets stored in PostgreSQL.
    if record.facility == "COMMITFAIL" {
        level = .debug
    }
    logger.log(
        level, "librdkafka",
        ["kafka.facility": record.facility, "kafka.client": record.client, "kafka.message": record.message])
}
