import Kafka
import Postgres

/// One end of a backfill range.
public enum BackfillBound: Sendable, Equatable, CustomStringConvertible {
    case offset(Int64)
    /// The log start, for `--from-offset beginning`.
    case beginning
    /// The log end when the run starts, for `--to-offset end`.
    case end
    /// The first offset whose message timestamp is at or after this time (ListOffsets by
    /// timestamp).
    case time(EventTime)

    public var description: String {
        switch self {
        case .offset(let offset): String(offset)
        case .beginning: "beginning"
        case .end: "end"
        case .time(let time): time.rfc3339
        }
    }
}

/// A new backfill run as the operator describes it.
public struct BackfillRequest: Sendable {
    public var topic: String
    /// The partitions to read; empty means all of the topic's partitions.
    public var partitions: [Int32] = []
    public var from: BackfillBound = .beginning
    /// The last offset read is inclusive for `.offset`; `.end` and `.time` are exclusive ends.
    public var to: BackfillBound = .end
    public var eventTimeFrom: EventTime?
    public var eventTimeTo: EventTime?
    /// Reads the range and reports what it would add, then rolls everything back.
    public var dryRun = false

    public init(topic: String) {
        self.topic = topic
    }
}

/// A failure of a backfill that an operator must act on.
public struct BackfillError: Error, Sendable, CustomStringConvertible {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// How far a run has come, reported after each batch.
public struct BackfillProgress: Sendable {
    public var doneOffsets: Int64
    public var totalOffsets: Int64
    public var counts: BackfillCounts
    /// Seconds since this process started the run or resumed it.
    public var elapsedSeconds: Double
    /// Offsets done by this process, for the rate.
    public var offsetsThisSession: Int64
}

/// The end of a backfill: the run as stored, and for a dry run what it would add per meter,
/// subject, groups and minute (`meter, subject, groups, minute, events, aggregation, value`).
public struct BackfillResult: Sendable {
    public var run: BackfillRun
    public var stopped: Bool
    public var dryRunAdditions: [[String]] = []
    /// `resume` found the run finished and read nothing.
    public var wasAlreadyFinished = false
}

/// Reruns a range of a topic through the worker's validation, dedupe, ledger and rollup step.
///
/// It reads with its own consumer, assigned partitions by hand: it joins no consumer group and
/// commits no offset, so the live group's membership and offsets stay as they are. Each batch
/// is one transaction that also moves the run's recorded progress, so `resume` continues where
/// an interrupted run stopped.
public final class Backfill {
    let configuration: Configuration
    let clock: any TallyClock
    let logger: Logger
    let stopSignal: StopSignal
    let validator: EventValidator
    let limits: ValidationLimits
    /// The messages per transaction; the configured `batch.max_messages` unless a test sets it.
    public var batchMaxMessages: Int
    /// Called on the backfill's thread after each committed batch.
    public var onProgress: (BackfillProgress) -> Void = { _ in }

    public init(
        configuration: Configuration, clock: any TallyClock = SystemClock(), logger: Logger, stopSignal: StopSignal
    ) {
        self.configuration = configuration
        self.clock = clock
        self.logger = logger
        self.stopSignal = stopSignal
        self.limits = ValidationLimits(
            maxPayloadBytes: configuration.ingest.maxPayloadBytes,
            dedupeWindowMicroseconds: configuration.ingest.dedupeWindowMicroseconds,
            maxFutureSkewMicroseconds: configuration.ingest.maxFutureSkewMicroseconds)
        self.validator = EventValidator(meters: MeterSet(configuration.meters), limits: limits)
        self.batchMaxMessages = configuration.ingest.batchMaxMessages
    }

    /// The consumer properties of a backfill: the configured ones with another group id and
    /// end-of-partition events, so that a range that ends in offsets without a message is seen
    /// to end. librdkafka's `assign` needs a group id, but a consumer that never subscribes
    /// joins no group, and with auto-commit off (as `consumerProperties` sets it) it commits
    /// nothing.
    var consumerProperties: [(String, String)] {
        var properties = configuration.kafka.consumerProperties.filter {
            !["group.id", "enable.partition.eof", "client.id", "enable.auto.commit"].contains($0.0)
        }
        properties += [
            ("group.id", configuration.kafka.groupID + ".backfill"), ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"), ("client.id", "tally-backfill"),
        ]
        return properties
    }

    /// Resolves the request's range against the brokers, records a run and processes it.
    public func start(_ request: BackfillRequest) throws -> BackfillResult {
        if case .offset(let from) = request.from, case .offset(let to) = request.to, from > to {
            throw BackfillError("the range \(from)..\(to) is empty: its first offset is after its last")
        }
        let store = try LedgerStore(settings: configuration.postgres, logger: logger)
        defer { store.connection.close() }
        let consumer = try KafkaConsumer(properties: consumerProperties)
        let ranges = try resolveRanges(request, consumer: consumer)
        let description = "\(request.from)..\(request.to)"

        if request.dryRun {
            // The whole dry run is one transaction that rolls back, so later batches see the
            // keys the earlier ones would have claimed.
            try store.ensureDedupePartitions(now: clock.now(), limits: limits)
            try store.connection.execute("BEGIN")
            defer { store.rollbackQuietly() }
            let id = try store.createBackfillRun(
                topic: request.topic, rangeDescription: description, eventTimeFrom: request.eventTimeFrom,
                eventTimeTo: request.eventTimeTo, partitions: ranges, isDryRun: true)
            let run = try store.backfillRuns(id: id)[0]
            return try process(run, store: store, consumer: consumer, dryRun: true)
        }

        let id = try store.createBackfillRun(
            topic: request.topic, rangeDescription: description, eventTimeFrom: request.eventTimeFrom,
            eventTimeTo: request.eventTimeTo, partitions: ranges)
        logger.info("backfill started", ["backfill.run": id, "kafka.topic": request.topic, "range": description])
        return try processMarkingFailures(try store.backfillRuns(id: id)[0], store: store, consumer: consumer)
    }

    /// Continues a run that was interrupted, from its recorded progress.
    public func resume(runID: Int64) throws -> BackfillResult {
        let store = try LedgerStore(settings: configuration.postgres, logger: logger)
        defer { store.connection.close() }
        guard let run = try store.backfillRuns(id: runID).first else {
            throw BackfillError("backfill run \(runID) not found; tally backfill --list shows the runs")
        }
        guard run.status != .finished else {
            return BackfillResult(run: run, stopped: false, wasAlreadyFinished: true)
        }
        try store.setBackfillStatus(runID, .running)
        logger.info("backfill resumed", ["backfill.run": runID, "offsets.done": run.doneOffsets])
        let consumer = try KafkaConsumer(properties: consumerProperties)
        return try processMarkingFailures(run, store: store, consumer: consumer)
    }

    /// Processes a recorded run, and marks it interrupted when that fails, so that `--list`
    /// shows it as one to resume. Marking it is best effort: PostgreSQL may be the failure.
    private func processMarkingFailures(_ run: BackfillRun, store: LedgerStore, consumer: KafkaConsumer) throws
        -> BackfillResult
    {
        do {
            return try process(run, store: store, consumer: consumer, dryRun: false)
        } catch {
            logger.error(
                "backfill failed; resume it once the cause is fixed",
                ["backfill.run": run.id, "error": String(describing: error)])
            try? store.setBackfillStatus(run.id, .interrupted)
            throw error
        }
    }

    // MARK: Ranges

    func resolveRanges(_ request: BackfillRequest, consumer: KafkaConsumer) throws -> [BackfillPartition] {
        let counts: [String: Int]
        do {
            counts = try consumer.partitionCounts(topics: [request.topic], timeoutMilliseconds: 10_000)
        } catch {
            throw BackfillError("cannot reach the Kafka brokers at \(configuration.kafka.brokers): \(error)")
        }
        guard let count = counts[request.topic] else {
            throw BackfillError("topic \(request.topic) does not exist on the brokers")
        }
        let partitions = request.partitions.isEmpty ? Array(0..<Int32(count)) : Set(request.partitions).sorted()
        if let unknown = partitions.first(where: { $0 < 0 || $0 >= Int32(count) }) {
            throw BackfillError("topic \(request.topic) has \(count) partitions; partition \(unknown) does not exist")
        }

        var ranges: [BackfillPartition] = []
        for partition in partitions {
            let marks = try consumer.watermarks(topic: request.topic, partition: partition, timeoutMilliseconds: 10_000)
            let from = try resolve(
                request.from, topic: request.topic, partition: partition, marks: marks, consumer: consumer)
            var to = try resolve(
                request.to, topic: request.topic, partition: partition, marks: marks, consumer: consumer)
            if case .offset(let last) = request.to { to = last + 1 }
            let start = max(from, marks.low)
            if from < marks.low {
                logger.warning(
                    "the range starts below the log start; those offsets are no longer in Kafka",
                    ["kafka.topic": request.topic, "kafka.partition": partition, "from": from, "log_start": marks.low])
            }
            let end = min(to, marks.high)
            ranges.append(
                BackfillPartition(
                    partition: PartitionID(topic: request.topic, partition: partition), fromOffset: start,
                    toOffset: max(start, end), nextOffset: start))
        }
        return ranges
    }

    private func resolve(
        _ bound: BackfillBound, topic: String, partition: Int32, marks: KafkaWatermarks, consumer: KafkaConsumer
    ) throws -> Int64 {
        switch bound {
        case .offset(let offset):
            return offset
        case .beginning:
            return marks.low
        case .end:
            return marks.high
        case .time(let time):
            let milliseconds = floorDivide(time.microseconds, 1000)
            let found = try consumer.offsetsForTimes(
                [KafkaTopicPartition(topic: topic, partition: partition, offset: milliseconds)],
                timeoutMilliseconds: 10_000)
            return try Self.offset(forTimeLookup: found.first?.offset, time: time, topic: topic, partition: partition)
        }
    }

    /// Checks the offset a ListOffsets-by-timestamp lookup returned. Kafka returns -1 when no
    /// message has a timestamp at or after the time, and librdkafka 2.0.2's mock cluster
    /// returns -1 for every lookup.
    static func offset(forTimeLookup offset: Int64?, time: EventTime, topic: String, partition: Int32) throws -> Int64 {
        guard let offset, offset >= 0 else {
            throw BackfillError(
                "the broker returned no offset (\(offset.map(String.init) ?? "none")) for time \(time) on \(topic)[\(partition)]: no message has a timestamp at or after it, or the broker does not implement ListOffsets by timestamp (librdkafka's mock cluster does not); give --from-offset/--to-offset instead"
            )
        }
        return offset
    }

    // MARK: Reading

    private func process(_ initial: BackfillRun, store: LedgerStore, consumer: KafkaConsumer, dryRun: Bool) throws
        -> BackfillResult
    {
        var run = initial
        var open: [PartitionID: Int] = [:]
        for (index, range) in run.partitions.enumerated() where !range.isDone {
            open[range.partition] = index
        }
        try consumer.assign(
            open.keys.sorted().map { partition in
                KafkaTopicPartition(
                    topic: partition.topic, partition: partition.partition,
                    offset: run.partitions[open[partition]!].nextOffset)
            })

        let started = MonotonicTime.now()
        let doneAtStart = run.doneOffsets
        var pending: [PartitionID: [KafkaMessage]] = [:]
        var dryRunLedgerIDs: [Int64] = []
        var stopped = false

        func flush(_ partition: PartitionID, through nextOffset: Int64) throws {
            let index = open[partition] ?? run.partitions.firstIndex { $0.partition == partition }!
            let range = run.partitions[index]
            let messages = pending.removeValue(forKey: partition) ?? []
            guard nextOffset > range.nextOffset else { return }
            let now = clock.now()
            let validated = messages.map {
                ValidatedMessage(message: $0, outcome: validator.validate($0.value, now: now))
            }
            let summary = try writeIsolatingRejectedContent(
                validated, run: run, partition: partition, from: range.nextOffset, to: nextOffset, now: now,
                store: store, dryRun: dryRun)
            run.partitions[index].nextOffset = nextOffset
            run.partitions[index].counts = run.partitions[index].counts + summary.counts
            dryRunLedgerIDs += summary.acceptedLedgerIDs
            onProgress(
                BackfillProgress(
                    doneOffsets: run.doneOffsets, totalOffsets: run.totalOffsets, counts: run.counts,
                    elapsedSeconds: Double(MonotonicTime.now().milliseconds(since: started)) / 1000,
                    offsetsThisSession: run.doneOffsets - doneAtStart))
        }

        func finish(_ partition: PartitionID) throws {
            guard let index = open.removeValue(forKey: partition) else { return }
            try flush(partition, through: run.partitions[index].toOffset)
            try? consumer.pause([KafkaTopicPartition(topic: partition.topic, partition: partition.partition)])
        }

        while !open.isEmpty {
            if stopSignal.isRequested {
                stopped = true
                break
            }
            guard let result = consumer.poll(timeoutMilliseconds: 100) else {
                // Idle: write what was read so far.
                for partition in pending.keys.sorted() {
                    if let last = pending[partition]?.last?.offset { try flush(partition, through: last + 1) }
                }
                continue
            }
            switch result {
            case .message(let message):
                let partition = PartitionID(topic: message.topic, partition: message.partition)
                guard let index = open[partition] else { continue }
                let range = run.partitions[index]
                if message.offset >= range.toOffset {
                    try finish(partition)
                    continue
                }
                guard message.offset >= range.nextOffset else { continue }
                pending[partition, default: []].append(message)
                if message.offset == range.toOffset - 1 {
                    try finish(partition)
                } else if pending[partition]!.count >= batchMaxMessages {
                    try flush(partition, through: message.offset + 1)
                }
            case .error(let error, let position):
                if error.isPartitionEOF, let position {
                    let partition = PartitionID(topic: position.topic, partition: position.partition)
                    if let index = open[partition], let offset = position.offset,
                        offset >= run.partitions[index].toOffset
                    {
                        try finish(partition)
                    }
                } else if error.isFatal {
                    throw error
                } else {
                    logger.rateLimited(
                        .warning, "Kafka consumer error during backfill", intervalSeconds: 10, ["error": error])
                }
            }
        }

        if stopped {
            for partition in pending.keys.sorted() {
                if let last = pending[partition]?.last?.offset { try flush(partition, through: last + 1) }
            }
        }

        if dryRun {
            let aggregations = Dictionary(
                configuration.meters.map { ($0.slug, $0.aggregation.rawValue) }, uniquingKeysWith: { first, _ in first }
            )
            let additions = try store.readingsPerMinute(ledgerIDs: dryRunLedgerIDs, aggregations: aggregations)
            return BackfillResult(run: run, stopped: stopped, dryRunAdditions: additions)
        }
        let status: BackfillRun.Status = stopped ? .interrupted : .finished
        try store.setBackfillStatus(run.id, status)
        run.status = status
        logger.info(
            stopped ? "backfill interrupted" : "backfill finished",
            [
                "backfill.run": run.id, "offsets.done": run.doneOffsets, "offsets.total": run.totalOffsets,
                "accepted": run.counts.accepted, "duplicates": run.counts.duplicatesAndRecorded,
                "dead_letters": run.counts.deadLetters,
            ])
        return BackfillResult(run: try store.backfillRuns(id: run.id).first ?? run, stopped: stopped)
    }

    /// Writes one batch. When PostgreSQL rejects an event's content (SQLSTATE class 22 or 54),
    /// it writes the batch one message at a time and stores the rejected event as a dead letter
    /// `storage_rejected`, as the worker does. A dry run has one transaction, which the
    /// rejection aborts, so it stops with the error instead.
    private func writeIsolatingRejectedContent(
        _ messages: [ValidatedMessage], run: BackfillRun, partition: PartitionID, from: Int64, to: Int64,
        now: EventTime, store: LedgerStore, dryRun: Bool
    ) throws -> BackfillBatchSummary {
        do {
            return try writeWithRetry(
                messages, run: run, partition: partition, from: from, to: to, now: now, store: store, dryRun: dryRun)
        } catch let error as PostgresError where !dryRun && (error.sqlStateClass == "22" || error.sqlStateClass == "54")
        {
            if messages.count > 1 {
                logger.warning(
                    "PostgreSQL rejected a backfill batch; writing its messages one at a time",
                    ["backfill.run": run.id, "kafka.partition": partition.partition, "error": error])
                var total = BackfillBatchSummary()
                var start = from
                for (index, single) in messages.enumerated() {
                    let end = index == messages.count - 1 ? to : single.message.offset + 1
                    let part = try writeIsolatingRejectedContent(
                        [single], run: run, partition: partition, from: start, to: end, now: now, store: store,
                        dryRun: dryRun)
                    total.counts = total.counts + part.counts
                    total.acceptedLedgerIDs += part.acceptedLedgerIDs
                    start = end
                }
                return total
            }
            guard let single = messages.first else { throw error }
            if case .rejected(let rejection) = single.outcome, rejection.reason == .storageRejected { throw error }
            logger.error(
                "PostgreSQL rejected an event; storing it as a dead letter",
                [
                    "error": error, "backfill.run": run.id, "kafka.topic": partition.topic,
                    "kafka.partition": partition.partition, "kafka.offset": single.message.offset,
                ])
            let rejection = Rejection(
                .storageRejected, "PostgreSQL rejected the event: \(error)", eventKey: single.acceptedKey)
            return try writeWithRetry(
                [ValidatedMessage(message: single.message, outcome: .rejected(rejection))], run: run,
                partition: partition, from: from, to: to, now: now, store: store, dryRun: dryRun)
        }
    }

    /// Writes one batch, retrying serialization failures and deadlocks a few times. Other
    /// failures end the run; its progress stays at the last committed batch.
    private func writeWithRetry(
        _ messages: [ValidatedMessage], run: BackfillRun, partition: PartitionID, from: Int64, to: Int64,
        now: EventTime, store: LedgerStore, dryRun: Bool
    ) throws -> BackfillBatchSummary {
        var attempts = 0
        while true {
            do {
                return try store.writeBackfillBatch(
                    messages, runID: run.id, partition: partition, expectedNextOffset: from, nextOffset: to,
                    eventTimeFrom: run.eventTimeFrom, eventTimeTo: run.eventTimeTo, now: now, limits: limits,
                    ownTransaction: !dryRun)
            } catch {
                switch error {
                case .staleOffsets:
                    throw BackfillError(
                        "the progress of backfill run \(run.id) on \(partition) moved; another process is running it")
                case .database(let failure):
                    attempts += 1
                    guard !dryRun, attempts < 5, failure.isTransactionConflict || isUniqueViolation(failure) else {
                        throw failure
                    }
                    logger.info(
                        "transaction conflict in a backfill batch; retrying",
                        [
                            "backfill.run": run.id, "kafka.partition": partition.partition,
                            "pg.sqlstate": failure.sqlState ?? "",
                        ])
                }
            }
        }
    }

    /// Returns whether a concurrent writer recorded an outcome for one of the batch's offsets
    /// first. A retry then counts that offset as already recorded.
    private func isUniqueViolation(_ error: PostgresError) -> Bool {
        error.sqlState == "23505"
    }
}
