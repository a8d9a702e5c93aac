import Glibc
import Kafka
import Postgres

extension Worker {
    /// Validates and writes the pending batch. On return the batch is committed or was found
    /// committed already, unless one of three things happened. Another consumer owns its
    /// offsets now, and the partitions are moved back to their stored offsets. The partitions
    /// were revoked while the batch waited. A stop was requested while PostgreSQL could not be
    /// reached.
    func flush() {
        guard !pending.isEmpty else { return }
        let messages = pending.messages
        pending.removeAll()
        let now = clock.now()
        if let failed = writeSplit(messages, now: now) {
            for half in failed { write(validated: half, validatedAt: now, polling: true) }
            if !pausedForRestart.isEmpty { restartPausedPartitions() }
            return
        }
        write(messages, polling: true)
    }

    /// Writes the pending messages of partitions being revoked, inside the rebalance callback.
    /// The worker cannot poll there, so failed attempts are retried for a short time only.
    /// Then the messages are rolled back, and the partitions' next owner reads them again.
    func writeBeforeRevocation(_ messages: [KafkaMessage]) {
        let deadline = MonotonicTime.now().nanoseconds + Self.revocationWriteBudgetMilliseconds * 1_000_000
        if write(messages, polling: false, deadline: MonotonicTime(nanoseconds: deadline)) == .abandoned {
            logger.warning(
                "the batch of the revoked partitions could not be written in time; rolled back for their next owner",
                ["batch.messages": messages.count])
        }
    }

    @discardableResult
    private func write(_ messages: [KafkaMessage], polling: Bool, deadline: MonotonicTime? = nil) -> WriteResult {
        let now = clock.now()
        let started = MonotonicTime.now()
        let batch = messages.map { ValidatedMessage(message: $0, outcome: validator.validate($0.value, now: now)) }
        logger.debug(
            "batch validated",
            ["batch.messages": batch.count, "stage.validate_ms": milliseconds(since: started)])
        observer.batchValidated(batch.count)
        return write(validated: batch, validatedAt: now, polling: polling, deadline: deadline)
    }

    /// Writes validated messages with `write(_:)`'s retries, and afterwards resumes the
    /// partitions that were paused meanwhile.
    @discardableResult
    private func write(
        validated batch: [ValidatedMessage], validatedAt: EventTime, polling: Bool, deadline: MonotonicTime? = nil
    ) -> WriteResult {
        isWriting = true
        defer { isWriting = false }
        var retry = RetryState(batch: batch, validatedAt: validatedAt, polling: polling, deadline: deadline)
        let result = write(&retry)
        if polling, !pausedForRestart.isEmpty {
            restartPausedPartitions()
        }
        return result
    }

    /// Writes `retry.batch`, retrying transient failures:
    /// - a serialization failure or deadlock is retried at once;
    /// - a lost connection is re-opened with backoff, and a commit whose outcome was lost is
    ///   recognized by the stored offsets having moved to exactly the batch's end;
    /// - an event that PostgreSQL rejects is isolated by writing the batch one message at a
    ///   time, and then stored as a dead letter `storage_rejected`;
    /// - a batch that keeps failing for another reason is also written one message at a time.
    /// While it waits between attempts, the worker pauses its partitions and keeps polling, so
    /// that it keeps its group membership without holding more than this batch in memory.
    /// A stop request ends the retries; the batch is then left for the next run to read again.
    /// Errors that only a person can fix, such as a missing permission, stop the worker.
    ///
    /// `retry.isolated` marks one message written alone after its batch failed. When it keeps
    /// failing for a reason other than a lost connection, its partition is set aside. The worker
    /// goes back to the partition's stored offset and reads it again later, and the other
    /// partitions of the batch go on.
    private func write(_ retry: inout RetryState) -> WriteResult {
        while true {
            // Partitions revoked or lost while the batch waited are no longer ours to write.
            retry.batch = retry.batch.filter(isUnwritten)
            if retry.batch.isEmpty { return .abandoned }
            if fatalFailure != nil { return .stopped }
            guard let store = connectedStore() else {
                if !waitBeforeRetry(&retry) { return retry.stopResult }
                continue
            }
            revalidateIfStale(&retry)
            let partitions = Set(retry.batch.map(\.partitionID))
            let expected = Dictionary(uniqueKeysWithValues: partitions.map { ($0, positions[$0]!.storedOffset) })
            if retry.logStarts == nil {
                retry.logStarts = logStartsBelowFirstMessages(retry.batch)
            }
            observer.beforeWrite(offsetRanges(retry.batch))
            do {
                let summary = try store.writeBatch(
                    retry.batch, expectedOffsets: expected, now: retry.validatedAt, limits: limits,
                    logStarts: retry.logStarts ?? [:])
                recordCommit(summary)
                return .committed
            } catch {
                switch error {
                case .staleOffsets(let stored):
                    return resolveStaleOffsets(stored, retry: retry)
                case .database(let error):
                    switch nextStep(after: error, store: store, retry: &retry) {
                    case .retry:
                        continue
                    case .stop:
                        return retry.stopResult
                    case .writeOneByOne:
                        return writeOneByOne(&retry)
                    case .setAside:
                        setAside(retry.batch[0], after: error)
                        return .stale
                    }
                }
            }
        }
    }

    /// Writes each message in its own transaction. Once a message of a partition is not
    /// committed, the partition's later messages are left out: they are read again from the
    /// stored offset, so that no offset is passed over unwritten.
    private func writeOneByOne(_ whole: inout RetryState) -> WriteResult {
        var leftOut = Set<PartitionID>()
        for single in whole.batch where !leftOut.contains(single.partitionID) {
            var retry = RetryState(
                batch: [single], validatedAt: whole.validatedAt, polling: whole.polling, deadline: whole.deadline)
            retry.isolated = true
            switch write(&retry) {
            case .committed:
                continue
            case .stale, .abandoned:
                leftOut.insert(single.partitionID)
            case .stopped:
                return .stopped
            }
        }
        return leftOut.isEmpty ? .committed : .stale
    }

    /// Returns the offsets of each partition's messages in the batch.
    private func offsetRanges(_ batch: [ValidatedMessage]) -> [PartitionID: ClosedRange<Int64>] {
        var ranges: [PartitionID: ClosedRange<Int64>] = [:]
        for validated in batch {
            let offset = validated.message.offset
            if let range = ranges[validated.partitionID] {
                ranges[validated.partitionID] = min(range.lowerBound, offset)...max(range.upperBound, offset)
            } else {
                ranges[validated.partitionID] = offset...offset
            }
        }
        return ranges
    }

    /// Finds the partitions whose first message in the batch lies beyond the stored offset
    /// while the stored offset is below the log start: retention deleted the offsets between
    /// before Tally read them. Returns their log starts, for the gap records.
    private func logStartsBelowFirstMessages(_ batch: [ValidatedMessage]) -> [PartitionID: Int64] {
        var firstOffsets: [PartitionID: Int64] = [:]
        for validated in batch where firstOffsets[validated.partitionID] == nil {
            firstOffsets[validated.partitionID] = validated.message.offset
        }
        var logStarts: [PartitionID: Int64] = [:]
        for (partition, first) in firstOffsets {
            guard let stored = positions[partition]?.storedOffset, first > stored, let consumer else { continue }
            // The fetch that brought the message also reported the log start.
            var low = consumer.cachedWatermarks(topic: partition.topic, partition: partition.partition)?.low
            if low == nil || low! <= stored {
                low = try? consumer.watermarks(
                    topic: partition.topic, partition: partition.partition, timeoutMilliseconds: 2000
                ).low
            }
            if let low, low > stored {
                logStarts[partition] = low
            } else if low == nil {
                logger.warning(
                    "cannot read the log start of a partition with skipped offsets; recording them as offsets_skipped",
                    ["kafka.topic": partition.topic, "kafka.partition": partition.partition])
            }
        }
        return logStarts
    }

    /// Checks that a message still belongs to this worker and lies at or after its partition's
    /// stored offset. Messages below it were written already, by this worker or another.
    private func isUnwritten(_ validated: ValidatedMessage) -> Bool {
        guard let position = positions[validated.partitionID] else { return false }
        guard let stored = position.storedOffset else { return true }
        return validated.message.offset >= stored
    }

    /// Validates the batch again when its retries have outlasted the dedupe claim margin, so
    /// that the window checks and the key claims use a current clock.
    private func revalidateIfStale(_ retry: inout RetryState) {
        let now = clock.now()
        let margin = DedupePeriods.claimMarginSeconds * EventTime.microsecondsPerSecond / 2
        guard now.microseconds - retry.validatedAt.microseconds > margin else { return }
        retry.batch = retry.batch.map { validated in
            // A dead letter made after PostgreSQL rejected the event keeps that reason.
            if case .rejected(let rejection) = validated.outcome, rejection.reason == .storageRejected {
                return validated
            }
            return ValidatedMessage(
                message: validated.message, outcome: validator.validate(validated.message.value, now: now))
        }
        retry.validatedAt = now
    }

    /// Decides how to go on after PostgreSQL failed to commit the batch.
    private func nextStep(after error: PostgresError, store: LedgerStore, retry: inout RetryState) -> RetryStep {
        let batch = retry.batch
        if error.isConnectionProblem || error.sqlState == "25006" {
            // 25006: a read-only transaction, as on a standby after a failover. A new
            // connection may reach the new primary. Once reconnected, the batch's compare-and-set
            // reads the stored offsets again: offsets at the batch's end mean its COMMIT landed.
            retry.connectionWasLost = true
            logger.rateLimited(
                .error, "lost the PostgreSQL connection; pausing consumption and retrying the batch",
                intervalSeconds: 10, ["error": error, "batch.messages": batch.count])
            store.connection.close()
            self.store = nil
            return waitBeforeRetry(&retry) ? .retry : .stop
        }
        if error.isTransactionConflict {
            logger.info(
                "transaction conflict; retrying the batch",
                ["pg.sqlstate": error.sqlState ?? "", "batch.messages": batch.count])
            retry.conflicts += 1
            if retry.conflicts > 3 {
                return waitBeforeRetry(&retry) ? .retry : .stop
            }
            return .retry
        }
        if needsOperator(error) {
            logger.error(
                "PostgreSQL rejected the batch for a reason only an operator can fix; stopping", ["error": error])
            fatalFailure = WorkerError(
                "PostgreSQL rejected a batch: \(error); fix the database or its permissions and restart")
            return .stop
        }
        if isRejectedContent(error) {
            if batch.count > 1 {
                logger.warning(
                    "PostgreSQL rejected the batch; writing its messages one at a time",
                    ["error": error, "batch.messages": batch.count])
                return .writeOneByOne
            }
            return storeAsDeadLetter(batch[0], after: error, retry: &retry)
        }
        retry.failures += 1
        logger.rateLimited(
            .error, "writing the batch failed; retrying", intervalSeconds: 10,
            ["error": error, "batch.messages": batch.count])
        if batch.count > 1, retry.failures >= 3 {
            logger.warning(
                "the batch keeps failing; writing its messages one at a time", ["batch.messages": batch.count])
            return .writeOneByOne
        }
        if retry.isolated, retry.failures >= 3 {
            return .setAside
        }
        return waitBeforeRetry(&retry) ? .retry : .stop
    }

    /// Replaces a message that PostgreSQL rejected with a dead letter `storage_rejected`. If
    /// the dead letter is rejected too, the next one leaves out the headers and the event key, and
    /// its detail is ASCII. Its key and value go to `bytea` columns, which take any bytes.
    private func storeAsDeadLetter(_ rejected: ValidatedMessage, after error: PostgresError, retry: inout RetryState)
        -> RetryStep
    {
        var message = rejected.message
        retry.contentRejections += 1
        logger.error(
            "PostgreSQL rejected an event; storing it as a dead letter",
            [
                "error": error, "kafka.topic": message.topic, "kafka.partition": message.partition,
                "kafka.offset": message.offset,
            ])
        switch retry.contentRejections {
        case 1:
            let rejection = Rejection(
                .storageRejected, "PostgreSQL rejected the event: \(error)", eventKey: rejected.acceptedKey)
            retry.batch = [ValidatedMessage(message: message, outcome: .rejected(rejection))]
            return .retry
        case 2:
            message.headers = []
            let detail = asciiOnly("PostgreSQL rejected the event and its dead letter: \(error)")
            retry.batch = [ValidatedMessage(message: message, outcome: .rejected(Rejection(.storageRejected, detail)))]
            return .retry
        default:
            return waitBeforeRetry(&retry) ? .retry : .stop
        }
    }

    /// Handles a batch whose stored offsets moved. After a lost connection, offsets at exactly
    /// the batch's end in every partition mean that its COMMIT landed; otherwise another
    /// consumer wrote them.
    private func resolveStaleOffsets(_ stored: [PartitionID: Int64?], retry: RetryState) -> WriteResult {
        let ends = batchEnds(retry.batch)
        if retry.connectionWasLost, let store = connectedStore(),
            let current = try? store.storedOffsets(Array(ends.keys)), current == ends
        {
            // The counts of that commit are unknown here, so the summary carries only the offsets.
            logger.info("the batch was committed before the connection was lost", ["batch.messages": retry.batch.count])
            var summary = BatchSummary()
            summary.nextOffsets = ends
            recordCommit(summary)
            return .committed
        }
        handleStaleOffsets(stored, batch: retry.batch)
        return .stale
    }

    /// Errors in configuration or permissions (class 42) and a missing database or schema
    /// (3D000, 3F000) repeat on every attempt until a person changes something.
    private func needsOperator(_ error: PostgresError) -> Bool {
        error.sqlStateClass == "42" || error.sqlState == "3D000" || error.sqlState == "3F000"
    }

    /// Data errors (class 22) and limits such as an oversized index row (class 54) come from
    /// one event's content. Integrity violations (class 23) would mean a broken invariant, so
    /// they are retried and logged instead of being turned into dead letters.
    private func isRejectedContent(_ error: PostgresError) -> Bool {
        guard let sqlStateClass = error.sqlStateClass else { return false }
        return sqlStateClass == "22" || sqlStateClass == "54"
    }

    /// Waits before the next attempt. Returns false when a stop was requested meanwhile, or
    /// when the attempts have run past `retry.deadline`.
    ///
    /// With `retry.polling`, the worker polls while it waits: it keeps its group membership
    /// (`max.poll.interval.ms`) and serves rebalances. Messages fetched meanwhile go to the
    /// pending batch, which is written after this one. Once the pending batch is full, the
    /// worker pauses its partitions, so memory contains at most these two batches whatever the
    /// outage's length. Without `polling`, as inside a rebalance callback, it sleeps.
    private func waitBeforeRetry(_ retry: inout RetryState) -> Bool {
        let delay = retry.backoff.next()
        var deadline = MonotonicTime.now().nanoseconds + delay * 1_000_000
        if let limit = retry.deadline {
            if MonotonicTime.now().nanoseconds >= limit.nanoseconds {
                retry.pastDeadline = true
                return false
            }
            deadline = min(deadline, limit.nanoseconds)
        }
        while MonotonicTime.now().nanoseconds < deadline {
            if retry.polling, pending.isFull(configuration.ingest) {
                pauseForRestart(Array(positions.keys))
            }
            if stopSignal.isRequested {
                logger.warning(
                    "stopping with the batch not written; it will be read again on the next start",
                    ["batch.messages": retry.batch.count])
                return false
            }
            if fatalFailure != nil { return false }
            guard retry.polling, let consumer else {
                usleep(20_000)
                continue
            }
            let remaining = (deadline - MonotonicTime.now().nanoseconds) / 1_000_000
            let result = consumer.poll(timeoutMilliseconds: Int32(max(0, min(Self.pollTimeoutMilliseconds, remaining))))
            switch result {
            case .message(let message):
                accept(message)
            case .error(let error, let partition):
                do {
                    try handleConsumerError(error, partition: partition)
                } catch {
                    fatalFailure = error
                    return false
                }
            case nil:
                break
            }
            if MonotonicTime.now().milliseconds(since: progress.lastCheck) >= Self.statusIntervalMilliseconds {
                let state = checkProgress(now: MonotonicTime.now())
                // Between attempts no transaction is open; the report needs a live connection.
                reportStatus(state.state, detail: state.detail)
            }
        }
        return true
    }

    /// Pauses partitions that must later continue from `positions[…].nextOffset`.
    func pauseForRestart(_ partitions: [PartitionID]) {
        let newlyPaused = partitions.filter { !pausedForRestart.contains($0) }
        guard !newlyPaused.isEmpty, let consumer else { return }
        do {
            try consumer.pause(newlyPaused.map { KafkaTopicPartition(topic: $0.topic, partition: $0.partition) })
        } catch {
            logger.warning("pausing partitions failed", ["error": error])
        }
        if pausedForRestart.isEmpty {
            logger.info(
                "pausing consumption until the batch in flight is written",
                ["kafka.partitions": describe(newlyPaused), "batch.writing": isWriting])
        }
        pausedForRestart.formUnion(newlyPaused)
    }

    /// Moves each paused partition to its next offset and resumes it. A partition never stays
    /// paused: a failure is retried from the main loop.
    func restartPausedPartitions() {
        guard let consumer else { return }
        pausedForRestart = pausedForRestart.filter { positions[$0] != nil }
        guard !pausedForRestart.isEmpty, restartAttempt.isDue else { return }
        let targets = pausedForRestart.sorted().map { partition in
            let position = positions[partition]!
            return KafkaTopicPartition(
                topic: partition.topic, partition: partition.partition,
                offset: position.nextOffset ?? position.storedOffset ?? KafkaOffset.beginning)
        }
        do {
            try consumer.seek(targets, timeoutMilliseconds: 10_000)
            try consumer.resume(targets)
        } catch {
            logger.rateLimited(
                .warning, "resuming paused partitions failed; retrying", intervalSeconds: 10, ["error": error])
            restartAttempt.failed()
            return
        }
        restartAttempt.succeeded()
        pausedForRestart.removeAll()
        logger.info("consumption resumed", ["kafka.partitions": targets.map(\.description).joined(separator: ",")])
    }

    /// Returns the open ledger store, reconnecting if needed, or nil when PostgreSQL cannot be reached.
    func connectedStore() -> LedgerStore? {
        if let store, store.connection.isOpen { return store }
        store?.connection.close()
        store = nil
        do {
            let reconnected = try LedgerStore(settings: configuration.postgres, logger: logger)
            reconnected.consumerGroup = configuration.kafka.groupID
            reconnected.testHooks = storeTestHooks
            logger.info("connected to PostgreSQL", ["pg.target": reconnected.connection.target])
            store = reconnected
            return reconnected
        } catch {
            logger.rateLimited(
                .error, "cannot connect to PostgreSQL; retrying", intervalSeconds: 10, ["error": "\(error)"])
            observer.connectionFailed(error)
            return nil
        }
    }

    private func batchEnds(_ batch: [ValidatedMessage]) -> [PartitionID: Int64] {
        var ends: [PartitionID: Int64] = [:]
        for validated in batch {
            ends[validated.partitionID] = max(ends[validated.partitionID] ?? 0, validated.message.offset + 1)
        }
        return ends
    }

    func recordCommit(_ summary: BatchSummary) {
        for (partition, next) in summary.nextOffsets {
            positions[partition]?.storedOffset = next
        }
        totals.add(summary)
        progress.lastProgress = MonotonicTime.now()
        logger.debug(
            "batch committed",
            [
                "ledger.accepted": summary.accepted, "ledger.duplicates": summary.duplicates,
                "ledger.dead_letters": summary.deadLetterCount, "batch.partitions": summary.nextOffsets.count,
                "stage.classify_ms": milliseconds(summary.timings.classify),
                "stage.ledger_ms": milliseconds(summary.timings.ledger),
                "stage.rollups_ms": milliseconds(summary.timings.rollups),
                "stage.other_ms": milliseconds(summary.timings.other),
                "stage.commit_ms": milliseconds(summary.timings.commit),
            ])

        if configuration.ingest.commitToKafka, let consumer {
            // Kafka's committed offsets only serve lag tools. The worker starts from PostgreSQL's.
            let offsets = summary.nextOffsets.compactMap { partition, next in
                positions[partition] == nil
                    ? nil : KafkaTopicPartition(topic: partition.topic, partition: partition.partition, offset: next)
            }
            do {
                try consumer.commit(offsets, async: true)
            } catch {
                logger.rateLimited(
                    .warning, "committing offsets to Kafka failed", intervalSeconds: 60, ["error": error])
            }
        }
        observer.batchCommitted(summary)
    }

    /// Another consumer wrote some of these partitions, for example a member that took them
    /// over after this worker exceeded `max.poll.interval.ms`: roll the batch back and go on
    /// from the stored offsets of every partition it covered. The batch is not retried.
    private func handleStaleOffsets(_ staleStored: [PartitionID: Int64?], batch: [ValidatedMessage]) {
        let partitions = Set(batch.map(\.partitionID)).sorted()
        logger.warning(
            "stored offsets moved since the batch started; another consumer wrote them. Rolled back the batch, not retrying it",
            [
                "kafka.partitions": staleStored.keys.sorted().map(\.description).joined(separator: ","),
                "batch.messages": batch.count,
            ])

        seekToStoredOffsets(partitions, knownStored: staleStored)
    }

    /// Goes back to the stored offset of a message's partition after writing it alone kept
    /// failing. The partition's messages are read and written again from there.
    private func setAside(_ failed: ValidatedMessage, after error: PostgresError) {
        let message = failed.message
        logger.error(
            "writing one message keeps failing; reading its partition again from the stored offset",
            [
                "error": error, "kafka.topic": message.topic, "kafka.partition": message.partition,
                "kafka.offset": message.offset,
            ])
        seekToStoredOffsets([failed.partitionID], knownStored: [:])
    }

    /// Moves each partition back to its stored offset, read again from PostgreSQL when it can
    /// be reached, and otherwise taken from `knownStored` or the last commit. The partitions
    /// are paused, which drops the messages fetched ahead, and the restart after the write
    /// seeks them to the stored offsets.
    private func seekToStoredOffsets(_ partitions: [PartitionID], knownStored: [PartitionID: Int64?]) {
        var current: [PartitionID: Int64] = [:]
        if let store = connectedStore() {
            current = (try? store.storedOffsets(partitions)) ?? [:]
        }
        // Messages fetched meanwhile for these partitions are read again from the stored offset.
        _ = dropPending(of: Set(partitions))
        var moved: [PartitionID] = []
        for partition in partitions where positions[partition] != nil {
            let stored = current[partition] ?? (knownStored[partition] ?? positions[partition]!.storedOffset)
            positions[partition] = PartitionPosition(storedOffset: stored, nextOffset: stored)
            moved.append(partition)
        }
        pauseForRestart(moved)
    }
}

extension ValidatedMessage {
    var acceptedKey: EventKey? {
        if case .accepted(let event) = outcome { return event.key }
        return nil
    }
}

/// The end state of a write.
enum WriteResult {
    case committed
    /// Another consumer had moved the stored offsets; the partitions seek back to them.
    case stale
    /// Not written: the partitions were revoked while it waited, or the retries outlasted
    /// their deadline. Nothing of it was committed.
    case abandoned
    /// A stop was requested, or the worker met an error it cannot go on from.
    case stopped
}

/// The state of one batch's retries.
private struct RetryState {
    /// The messages still to write; one message becomes a dead letter when PostgreSQL rejects it.
    var batch: [ValidatedMessage]
    /// The clock reading that validation used.
    var validatedAt: EventTime
    /// Whether the worker may poll Kafka while it waits between attempts.
    var polling: Bool
    /// When to give up, for a write that must end soon (inside a rebalance callback).
    var deadline: MonotonicTime?
    var pastDeadline = false
    var backoff = Backoff()
    var conflicts = 0
    var failures = 0
    var contentRejections = 0
    var connectionWasLost = false
    /// True for one message written alone after its batch failed.
    var isolated = false
    /// The log starts of partitions whose offsets before the batch were deleted by retention,
    /// found once per batch.
    var logStarts: [PartitionID: Int64]?

    init(batch: [ValidatedMessage], validatedAt: EventTime, polling: Bool, deadline: MonotonicTime?) {
        self.batch = batch
        self.validatedAt = validatedAt
        self.polling = polling
        self.deadline = deadline
    }

    /// The result of a write that stopped retrying.
    var stopResult: WriteResult { pastDeadline ? .abandoned : .stopped }
}

/// Formats microseconds as milliseconds with one decimal, for the stage timings in the debug log.
private func milliseconds(_ microseconds: Int64) -> String {
    "\(microseconds / 1000).\(microseconds % 1000 / 100)"
}

private func milliseconds(since start: MonotonicTime) -> String {
    milliseconds((MonotonicTime.now().nanoseconds - start.nanoseconds) / 1000)
}

/// Returns the text with every character outside printable ASCII written as `\u{…}`.
private func asciiOnly(_ text: String) -> String {
    var result = ""
    for scalar in text.unicodeScalars {
        if scalar.value >= 0x20 && scalar.value < 0x7F {
            result.unicodeScalars.append(scalar)
        } else {
            result += "\\u{" + String(scalar.value, radix: 16) + "}"
        }
    }
    return result
}

/// The next step after a failed attempt.
private enum RetryStep {
    case retry
    case stop
    case writeOneByOne
    /// Give up on the one message for now and read its partition again from the stored offset.
    case setAside
}

/// Exponential backoff from 100 ms to 5 s.
struct Backoff {
    var attempts = 0

    /// Returns the delay before the next attempt, in milliseconds.
    mutating func next() -> Int64 {
        defer { attempts += 1 }
        return min(100 << min(Int64(attempts), 6), 5000)
    }
}
