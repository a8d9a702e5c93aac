import Glibc
import Kafka
import Postgres

extension Worker {
    /// Validates and writes the pending batch. On return the batch is committed, was found
    /// committed already, or was dropped because another consumer owns its offsets now (the
    /// partitions are then moved back to their stored offsets).
    func flush() {
        guard !pending.isEmpty else { return }
        let messages = pending.messages
        pending.removeAll()

        let now = clock.now()
        let batch = messages.map { ValidatedMessage(message: $0, outcome: validator.validate($0.value, now: now)) }
        write(batch, now: now)
    }

    /// Writes `batch`, retrying transient failures:
    /// - a serialization failure or deadlock is retried at once;
    /// - a lost connection is re-opened with backoff, and a commit whose outcome was lost is
    ///   recognized by the stored offsets having moved to exactly the batch's end;
    /// - an event that PostgreSQL rejects is isolated by writing the batch one message at a
    ///   time, and then stored as a dead letter `storage_rejected`.
    /// A stop request ends the retries; the batch is then left for the next run to read again.
    ///
    /// NOTE: the retries do not poll Kafka. An outage longer than `max.poll.interval.ms` therefore
    /// makes the group move this worker's partitions, and only the compare-and-set keeps the
    /// result exact; pausing the partitions and polling on would keep the membership.
    private func write(_ batch: [ValidatedMessage], now: EventTime) {
        var retry = RetryState(batch: batch.filter { positions[$0.partitionID] != nil })

        while !retry.batch.isEmpty {
            guard let store = connectedStore() else {
                if !waitBeforeRetry(&retry) { return }
                continue
            }
            let partitions = Set(retry.batch.map(\.partitionID))
            let expected = Dictionary(uniqueKeysWithValues: partitions.map { ($0, positions[$0]!.storedOffset) })
            do {
                let summary = try store.writeBatch(retry.batch, expectedOffsets: expected, now: now, limits: limits)
                recordCommit(summary)
                return
            } catch {
                switch error {
                case .staleOffsets(let stored):
                    resolveStaleOffsets(stored, retry: retry)
                    return
                case .database(let error):
                    switch nextStep(after: error, store: store, retry: &retry) {
                    case .retry:
                        continue
                    case .stop:
                        return
                    case .writeOneByOne:
                        for single in retry.batch { write([single], now: now) }
                        return
                    }
                }
            }
        }
    }

    /// Decides how to go on after PostgreSQL failed to commit the batch.
    private func nextStep(after error: PostgresError, store: LedgerStore, retry: inout RetryState) -> RetryStep {
        let batch = retry.batch
        if error.isConnectionProblem {
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
        if isRejectedContent(error) {
            if batch.count > 1 {
                logger.warning(
                    "PostgreSQL rejected the batch; writing its messages one at a time",
                    ["error": error, "batch.messages": batch.count])
                return .writeOneByOne
            }
            let message = batch[0].message
            logger.error(
                "PostgreSQL rejected an event; storing it as a dead letter",
                [
                    "error": error, "kafka.topic": message.topic, "kafka.partition": message.partition,
                    "kafka.offset": message.offset,
                ])
            let rejection = Rejection(
                .storageRejected, "PostgreSQL rejected the event: \(error)", eventKey: batch[0].acceptedKey)
            retry.batch = [ValidatedMessage(message: message, outcome: .rejected(rejection))]
            return .retry
        }
        logger.rateLimited(
            .error, "writing the batch failed; retrying", intervalSeconds: 10,
            ["error": error, "batch.messages": batch.count])
        return waitBeforeRetry(&retry) ? .retry : .stop
    }

    /// Handles a batch whose stored offsets moved. After a lost connection, offsets at exactly
    /// the batch's end mean that its COMMIT landed; otherwise another consumer wrote them.
    private func resolveStaleOffsets(_ stored: [PartitionID: Int64?], retry: RetryState) {
        let ends = batchEnds(retry.batch)
        if retry.connectionWasLost, stored.allSatisfy({ $0.value == ends[$0.key] }) {
            logger.info("the batch was committed before the connection was lost", ["batch.messages": retry.batch.count])
            for (partition, next) in ends { positions[partition]?.storedOffset = next }
            return
        }
        handleStaleOffsets(stored, batch: retry.batch)
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

    private func recordCommit(_ summary: BatchSummary) {
        for (partition, next) in summary.nextOffsets {
            positions[partition]?.storedOffset = next
        }
        totals.add(summary)
        logger.debug(
            "batch committed",
            [
                "ledger.accepted": summary.accepted, "ledger.duplicates": summary.duplicates,
                "ledger.dead_letters": summary.deadLetterCount, "batch.partitions": summary.nextOffsets.count,
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

        var current: [PartitionID: Int64] = [:]
        if let store = connectedStore() {
            current = (try? store.storedOffsets(partitions)) ?? [:]
        }
        var targets: [KafkaTopicPartition] = []
        for partition in partitions where positions[partition] != nil {
            let stored = current[partition] ?? (staleStored[partition] ?? positions[partition]!.storedOffset)
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

/// The state of one batch's retries.
private struct RetryState {
    /// The messages still to write; one message becomes a dead letter when PostgreSQL rejects it.
    var batch: [ValidatedMessage]
    var backoff = Backoff()
    var conflicts = 0
    var connectionWasLost = false
}

/// The next step after a failed attempt.
private enum RetryStep {
    case retry
    case stop
    case writeOneByOne
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
