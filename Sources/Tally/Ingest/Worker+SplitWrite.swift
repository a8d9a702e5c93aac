import Dispatch
import Kafka
import Postgres

/// The second PostgreSQL connection and validator of a worker that writes large batches as two
/// transactions at once.
///
/// Unchecked `Sendable`: its members are used by the worker thread, or by the writer queue's
/// thread while the worker thread waits for it in `writeSplit`, never by both at once.
final class SplitWriter: @unchecked Sendable {
    let queue = DispatchQueue(label: "tally.split-writer")
    let validator: EventValidator
    var store: LedgerStore?
    /// No connection is attempted before this time after a failed one.
    var nextConnectAttempt = MonotonicTime(nanoseconds: 0)

    init(validator: EventValidator) {
        self.validator = validator
    }
}

extension Worker {
    /// The minimum size of a batch that is split into two transactions.
    /// NOTE: an estimate, not measured: below it, a second commit is assumed to cost more than
    /// the parallel work saves.
    static let minimumSplitMessages = 100

    /// Validates and writes a batch that spans several partitions as two transactions at once.
    /// One runs on this thread and connection, the other on the split writer's. Each covers
    /// its own partitions, so each keeps the compare-and-set of its stored offsets. Two cores
    /// then share the validation, and PostgreSQL runs both transactions in parallel.
    ///
    /// Returns the validated messages of each transaction that failed, for `write` to retry with
    /// its full error handling, or nil when the batch was not split and is left to the caller.
    func writeSplit(_ messages: [KafkaMessage], now: EventTime) -> [[ValidatedMessage]]? {
        guard configuration.ingest.writeConnections == 2, messages.count >= Self.minimumSplitMessages else {
            return nil
        }
        // A message that `write` would leave out sends the whole batch the usual way.
        var counts: [PartitionID: Int] = [:]
        for message in messages {
            let partition = PartitionID(topic: message.topic, partition: message.partition)
            guard let position = positions[partition] else { return nil }
            if let stored = position.storedOffset, message.offset < stored { return nil }
            counts[partition, default: 0] += 1
        }
        guard counts.count >= 2, let store, store.connection.isOpen, let helper = connectedSplitWriter() else {
            return nil
        }

        // The largest partitions first, each to the half with fewer messages so far.
        var secondPartitions = Set<PartitionID>()
        var firstCount = 0
        var secondCount = 0
        for (partition, count) in counts.sorted(by: { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }) {
            if firstCount <= secondCount {
                firstCount += count
            } else {
                secondPartitions.insert(partition)
                secondCount += count
            }
        }
        var first: [KafkaMessage] = []
        var second: [KafkaMessage] = []
        for message in messages {
            if secondPartitions.contains(PartitionID(topic: message.topic, partition: message.partition)) {
                second.append(message)
            } else {
                first.append(message)
            }
        }

        let secondMessages = second
        let secondExpected = expectedOffsets(second)
        let secondResult = SplitHalfBox()
        let group = DispatchGroup()
        let limits = self.limits
        let logger = self.logger
        helper.queue.async(group: group) {
            secondResult.half = validateAndWriteHalf(
                secondMessages, validator: helper.validator, store: helper.store!, expected: secondExpected, now: now,
                limits: limits, logger: logger)
        }
        let firstHalf = validateAndWriteHalf(
            first, validator: validator, store: store, expected: expectedOffsets(first), now: now, limits: limits,
            logger: logger)
        group.wait()
        observer.batchValidated(firstHalf.validated.count + secondResult.half!.validated.count)

        var failed: [[ValidatedMessage]] = []
        for (half, owner) in [(firstHalf, "main"), (secondResult.half!, "split")] {
            switch half.result {
            case .success(let summary):
                recordCommit(summary)
            case .failure(let error):
                logger.info(
                    "a split transaction failed; retrying its messages on the main connection",
                    ["error": error, "batch.messages": half.validated.count, "pg.connection": owner])
                if case .database(let databaseError) = error, databaseError.isConnectionProblem {
                    if owner == "split" {
                        helper.store?.connection.close()
                        helper.store = nil
                    }
                    if wasCommittedBeforeLoss(half.validated) { continue }
                }
                failed.append(half.validated)
            }
        }
        return failed
    }

    /// Checks whether a transaction whose connection was lost had committed: then every stored
    /// offset of its partitions is at exactly its end. Records the commit when it had, with the
    /// offsets only, because its counts are unknown here.
    /// NOTE: no test loses a connection during a split commit, so this path has only been read.
    private func wasCommittedBeforeLoss(_ messages: [ValidatedMessage]) -> Bool {
        var ends: [PartitionID: Int64] = [:]
        for validated in messages {
            ends[validated.partitionID] = max(ends[validated.partitionID] ?? 0, validated.message.offset + 1)
        }
        guard let store = connectedStore(), let current = try? store.storedOffsets(Array(ends.keys)), current == ends
        else {
            return false
        }
        logger.info(
            "the split transaction was committed before its connection was lost", ["batch.messages": messages.count])
        var summary = BatchSummary()
        summary.nextOffsets = ends
        recordCommit(summary)
        return true
    }

    private func expectedOffsets(_ messages: [KafkaMessage]) -> [PartitionID: Int64?] {
        var expected: [PartitionID: Int64?] = [:]
        for message in messages {
            let partition = PartitionID(topic: message.topic, partition: message.partition)
            expected[partition] = positions[partition]!.storedOffset
        }
        return expected
    }

    /// Returns the split writer with an open connection, connecting it if needed, or nil when
    /// PostgreSQL cannot be reached. After a failed attempt, the next waits at least 10 seconds.
    private func connectedSplitWriter() -> SplitWriter? {
        let helper: SplitWriter
        if let splitWriter {
            helper = splitWriter
        } else {
            helper = SplitWriter(validator: EventValidator(meters: MeterSet(configuration.meters), limits: limits))
            splitWriter = helper
        }
        if let store = helper.store, store.connection.isOpen { return helper }
        helper.store?.connection.close()
        helper.store = nil
        let now = MonotonicTime.now()
        guard now.nanoseconds >= helper.nextConnectAttempt.nanoseconds else { return nil }
        do {
            let store = try LedgerStore(settings: configuration.postgres, logger: logger)
            store.consumerGroup = configuration.kafka.groupID
            store.testHooks = storeTestHooks
            helper.store = store
            logger.info("connected the split writer to PostgreSQL", ["pg.target": store.connection.target])
            return helper
        } catch {
            helper.nextConnectAttempt = MonotonicTime(nanoseconds: now.nanoseconds + 10_000_000_000)
            logger.warning(
                "cannot connect the split writer to PostgreSQL; writing batches as one transaction",
                ["error": "\(error)"])
            return nil
        }
    }
}

/// One transaction of a split batch: its validated messages and how the write ended.
private struct SplitHalf {
    var validated: [ValidatedMessage]
    var result: Result<BatchSummary, BatchWriteError>
}

/// Carries the second half's result from the writer queue. Written before `group.leave()` and
/// read after `group.wait()`, which orders the two accesses.
private final class SplitHalfBox: @unchecked Sendable {
    var half: SplitHalf?
}

private func validateAndWriteHalf(
    _ messages: [KafkaMessage], validator: EventValidator, store: LedgerStore, expected: [PartitionID: Int64?],
    now: EventTime, limits: ValidationLimits, logger: Logger
) -> SplitHalf {
    let started = MonotonicTime.now()
    let validated = messages.map { ValidatedMessage(message: $0, outcome: validator.validate($0.value, now: now)) }
    let elapsed = (MonotonicTime.now().nanoseconds - started.nanoseconds) / 1000
    logger.debug(
        "batch validated",
        ["batch.messages": validated.count, "stage.validate_ms": "\(elapsed / 1000).\(elapsed % 1000 / 100)"])
    do {
        let summary = try store.writeBatch(validated, expectedOffsets: expected, now: now, limits: limits)
        return SplitHalf(validated: validated, result: .success(summary))
    } catch {
        return SplitHalf(validated: validated, result: .failure(error))
    }
}
