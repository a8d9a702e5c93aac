import Glibc
import Kafka
import Postgres

extension Worker {
    /// Validates and writes the pending batch. On return the batch is committed or was found
    /// committed already. Otherwise another consumer owns its offsets now, and the partitions
    /// were moved back to their stored offsets, or a stop was requested while PostgreSQL could
    /// not be reached.
    func flush() {
        guard !pending.isEmpty else { return }
        let messages = pending.messages
        pending.removeAll()

        let now = clock.now()
        if let failed = writeSplit(messages, now: now) {
            for half in failed { write(half, validatedAt: now) }
            return
        }
        let started = MonotonicTime.now()
        let batch = messages.map { ValidatedMessage(message: $0, outcome: validator.validate($0.value, now: now)) }
        logger.debug(
            "batch validated",
            ["batch.messages": batch.count, "stage.validate_ms": milliseconds(since: started)])
        observer.batchValidated(batch.count)
        write(batch, validatedAt: now)
    }

    /// Writes `batch`, retrying transient failures:
    /// - a serialization failure or deadlock is retried at once;
    /// - a lost connection is re-opened with backoff, and a commit whose outcome was lost is
    ///   recognized by the stored offsets having moved to exactly the batch's end;
    /// - an event that PostgreSQL rejects is isolated by writing the batch one message at a
    ///   time, and then stored as a dead letter `storage_rejected`;
    /// - a batch that keeps failing for another reason is also written one message at a time.
    /// A stop request ends the retries; the batch is then left for the next run to read again.
    /// Errors that only a person can fix, such as a missing permission, stop the worker.
    ///
    /// NOTE: the retries do not poll Kafka. An outage longer than `max.poll.interval.ms` therefore
    /// makes the group move this worker's partitions, and only the compare-and-set keeps the
    /// result exact. Pausing the partitions and polling on would keep the membership.
    ///
    /// `isolated` marks one message written alone after its batch failed. When it keeps failing
    /// for a reason other than a lost connection, its partition is set aside. The worker goes
    /// back to the partition's stored offset and reads it again later, and the other partitions
    /// of the batch go on.
    @discardableResult
    private func write(_ batch: [ValidatedMessage], validatedAt: EventTime, isolated: Bool = false) -> WriteResult {
        var retry = RetryState(batch: batch.filter(isUnwritten), validatedAt: validatedAt, isolated: isolated)

        while !retry.batch.isEmpty {
            if fatalFailure != nil { return .stopped }
            guard let store = connectedStore() else {
                if !waitBeforeRetry(&retry) { return .stopped }
                continue
            }
            revalidateIfStale(&retry)
            let partitions = Set(retry.batch.map(\.partitionID))
            let expected = Dictionary(uniqueKeysWithValues: partitions.map { ($0, positions[$0]!.storedOffset) })
            do {
                let summary = try store.writeBatch(
                    retry.batch, expectedOffsets: expected, now: retry.validatedAt, limits: limits)
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
                        return .stopped
                    case .writeOneByOne:
                        return writeOneByOne(retry.batch, validatedAt: retry.validatedAt)
                    case .setAside:
                        setAside(retry.batch[0], after: error)
                        return .stale
                    }
                }
            }
        }
        return .committed
    }

    /// Writes each message in its own transaction. Once a message of a partition is not
    /// committed, the partition's later messages are left out: they are read again from the
    /// stored offset, so that no offset is passed over unwritten.
    private func writeOneByOne(_ batch: [ValidatedMessage], validatedAt: EventTime) -> WriteResult {
        var leftOut = Set<PartitionID>()
        for single in batch where !leftOut.contains(single.partitionID) {
            switch write([single], validatedAt: validatedAt, isolated: true) {
            case .committed:
                continue
            case .stale:
                leftOut.insert(single.partitionID)
            case .stopped:
                return .stopped
            }
        }
        return leftOut.isEmpty ? .committed : .stale
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
            // connection may reach the new primary.
            retry.connectionWasLost = true
            logger.rateLimited(
                .error, "lost the PostgreSQL connection; retrying the batch", intervalSeconds: 10,
                ["error": error, "batch.messages": batch.count])
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

    /// Sleeps before the next attempt. Returns false when a stop was requested meanwhile.
    private func waitBeforeRetry(_ retry: inout RetryState) -> Bool {
        let delay = retry.backoff.next()
        let deadline = MonotonicTime.now().nanoseconds + delay * 1_000_000
        while MonotonicTime.now().nanoseconds < deadline {
            if stopSignal.isRequested {
                logger.warning(
                    "stopping with the batch not written; it will be read again on the next start",
                    ["batch.messages": retry.batch.count])
                return false
            }
            usleep(20_000)
        }
        return true
    }

    /// Returns the open ledger store, reconnecting if needed, or nil when PostgreSQL cannot be reached.
    func connectedStore() -> LedgerStore? {
        if let store, store.connection.isOpen { return store }
        store?.connection.close()
        store = nil
        do {
            let reconnected = try LedgerStore(settings: configuration.postgres, logger: logger)
            reconnected.consumerGroup = configuration.kafka.groupID
            logger.info("connected to PostgreSQL", ["pg.target": reconnected.connection.target])
            store = reconnected
            return reconnected
        } catch {
            logger.rateLimited(
                .error, "cannot connect to PostgreSQL; retrying", intervalSeconds: 10, ["error": "\(error)"])
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

    /// Another consumer wrote some of these partitions: drop the batch and go back to the
    /// stored offsets of every partition it covered.
    private func handleStaleOffsets(_ staleStored: [PartitionID: Int64?], batch: [ValidatedMessage]) {
        let partitions = Set(batch.map(\.partitionID)).sorted()
        logger.warning(
            "stored offsets moved since the batch started; another consumer wrote them. Dropping the batch",
            [
                "kafka.partitions": staleStored.keys.sorted().map(\.description).joined(separator: ","),
                "batch.messages": batch.count,
            ])

        seekToStoredOffsets(partitions, knownStored: staleStored)
    }

    /// Moves each partition back to its stored offset, read again from PostgreSQL when it can
    /// be reached, and otherwise taken from `knownStored` or the last commit.
    private func seekToStoredOffsets(_ partitions: [PartitionID], knownStored: [PartitionID: Int64?]) {
        var current: [PartitionID: Int64] = [:]
        if let store = connectedStore() {
            current = (try? store.storedOffsets(partitions)) ?? [:]
        }
        var targets: [KafkaTopicPartition] = []
        for partition in partitions where positions[partition] != nil {
            let stored = current[partition] ?? (knownStored[partition] ?? positions[partition]!.storedOffset)
            positions[partition] = PartitionPosition(storedOffset: stored, nextOffset: stored)
            targets.append(
                KafkaTopicPartition(
                    topic: partition.topic, partition: partition.partition, offset: stored ?? KafkaOffset.beginning))
        }
        do {
            try consumer?.seek(targets, timeoutMilliseconds: 10_000)
        } catch {
            logger.error("seeking back to the stored offsets failed", ["error": error])
        }
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
    /// A stop was requested, or the worker met an error it cannot go on from.
    case stopped
}

/// The state of one batch's retries.
private struct RetryState {
    /// The messages still to write; one message becomes a dead letter when PostgreSQL rejects it.
    var batch: [ValidatedMessage]
    /// The clock reading that validation used.
    var validatedAt: EventTime
    var backoff = Backoff()
    var conflicts = 0
    var failures = 0
    var contentRejections = 0
    var connectionWasLost = false
    /// True for one message written alone after its batch failed.
    var isolated = false

    init(batch: [ValidatedMessage], validatedAt: EventTime, isolated: Bool) {
        self.batch = batch
        self.validatedAt = validatedAt
        self.isolated = isolated
    }
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
