import Glibc
import Kafka

extension Worker {
    /// Starts new partitions at their stored offsets in PostgreSQL, or at the log start when
    /// none is stored. Kafka's committed offsets are never read.
    ///
    /// The stored offsets may be unreadable now, because PostgreSQL is unreachable or a batch
    /// is waiting to be written. Then the partitions are assigned paused, and the main loop
    /// starts them once their stored offsets are read. The rebalance is not held up, and the
    /// worker goes on polling.
    public func partitionsAssigned(_ partitions: [KafkaTopicPartition]) -> KafkaAssignment {
        let ids = partitions.map { PartitionID(topic: $0.topic, partition: $0.partition) }
        // The cooperative protocol calls this with an empty list when a rebalance leaves this
        // member's assignment unchanged.
        guard !ids.isEmpty else { return KafkaAssignment(start: []) }

        var stored: [PartitionID: Int64]?
        if !isWriting, let store = connectedStore() {
            do {
                let partitions = try store.storedPartitions(ids)
                warnAboutOtherGroups(partitions.compactMapValues(\.consumerGroup))
                stored = partitions.mapValues(\.nextOffset)
            } catch {
                logger.rateLimited(.error, "reading stored offsets failed", intervalSeconds: 10, ["error": error])
                if error.isConnectionProblem {
                    store.connection.close()
                    self.store = nil
                }
            }
        }
        guard let stored else {
            awaitingStart.formUnion(ids)
            logger.warning(
                "partitions assigned while their stored offsets cannot be read; they stay paused until PostgreSQL responds",
                ["kafka.partitions": describe(ids), "batch.writing": isWriting])
            return KafkaAssignment(
                start: [],
                paused: ids.map {
                    KafkaTopicPartition(topic: $0.topic, partition: $0.partition, offset: KafkaOffset.beginning)
                })
        }

        // A partition this worker consumed already starts over from its stored offset.
        _ = dropPending(of: Set(ids))
        pausedForRestart.subtract(ids)
        var start: [KafkaTopicPartition] = []
        var logEndsReadable = true
        for partition in ids {
            let offset = stored[partition]
            if let offset, isBeyondLogEnd(partition, storedOffset: offset, checking: &logEndsReadable) { continue }
            positions[partition] = PartitionPosition(storedOffset: offset, nextOffset: offset)
            start.append(
                KafkaTopicPartition(
                    topic: partition.topic, partition: partition.partition, offset: offset ?? KafkaOffset.beginning))
        }
        // The time without progress counts from now for new partitions.
        progress.lastProgress = MonotonicTime.now()
        logger.info("partitions assigned", ["kafka.partitions": describeStart(start)])
        observer.partitionsAssigned(Dictionary(uniqueKeysWithValues: ids.map { ($0, stored[$0]) }))
        return KafkaAssignment(start: start)
    }

    /// Starts the partitions that were assigned paused: reads their stored offsets, moves each
    /// to its offset and resumes it. Called from the main loop; retried with backoff.
    func startAwaitingPartitions() {
        guard startAttempt.isDue, let consumer else { return }
        guard let store = connectedStore() else {
            startAttempt.failed()
            return
        }
        let ids = awaitingStart.sorted()
        let stored: [PartitionID: Int64]
        do {
            let partitions = try store.storedPartitions(ids)
            warnAboutOtherGroups(partitions.compactMapValues(\.consumerGroup))
            stored = partitions.mapValues(\.nextOffset)
        } catch {
            logger.rateLimited(.error, "reading stored offsets failed; retrying", intervalSeconds: 10, ["error": error])
            if error.isConnectionProblem {
                store.connection.close()
                self.store = nil
            }
            startAttempt.failed()
            return
        }

        var start: [KafkaTopicPartition] = []
        var logEndsReadable = true
        for partition in ids {
            let offset = stored[partition]
            if let offset, isBeyondLogEnd(partition, storedOffset: offset, checking: &logEndsReadable) {
                // Left assigned and paused until the next rebalance, as the error message states.
                awaitingStart.remove(partition)
                continue
            }
            start.append(
                KafkaTopicPartition(
                    topic: partition.topic, partition: partition.partition, offset: offset ?? KafkaOffset.beginning))
        }
        do {
            // A partition just assigned may not have started fetching yet; the seek then
            // fails and is tried again.
            try consumer.seek(start, timeoutMilliseconds: 10_000)
            try consumer.resume(start)
        } catch {
            logger.rateLimited(
                .warning, "starting paused partitions failed; retrying", intervalSeconds: 10, ["error": error])
            startAttempt.failed()
            return
        }
        for partition in ids where awaitingStart.contains(partition) {
            positions[partition] = PartitionPosition(storedOffset: stored[partition], nextOffset: stored[partition])
        }
        awaitingStart.removeAll()
        startAttempt.succeeded()
        progress.lastProgress = MonotonicTime.now()
        logger.info("partitions started at their stored offsets", ["kafka.partitions": describeStart(start)])
        observer.partitionsAssigned(Dictionary(uniqueKeysWithValues: ids.map { ($0, stored[$0]) }))
    }

    /// Commits or rolls back the batch in flight for the partitions before they go. When the
    /// assignment was lost, another member may own them already, so their messages are
    /// dropped instead; the stored-offset check would refuse them anyway.
    public func partitionsRevoked(_ partitions: [KafkaTopicPartition], lost: Bool) {
        let ids = Set(partitions.map { PartitionID(topic: $0.topic, partition: $0.partition) })
        let dropped = dropPending(of: ids)
        if lost {
            logger.warning(
                "partitions lost; dropping their uncommitted messages",
                ["kafka.partitions": describe(Array(ids)), "batch.dropped": dropped.count, "batch.writing": isWriting])
        } else if isWriting {
            // Only while a write waits between attempts: that write drops their messages.
            logger.warning(
                "partitions revoked while their batch waits to be written; rolling it back for them",
                ["kafka.partitions": describe(Array(ids))])
        } else {
            if !dropped.isEmpty {
                writeBeforeRevocation(dropped)
            }
            logger.info("partitions revoked", ["kafka.partitions": describe(Array(ids))])
        }
        for partition in ids {
            positions[partition] = nil
            awaitingStart.remove(partition)
            pausedForRestart.remove(partition)
        }
    }

    /// Removes the pending messages of the partitions and returns them.
    func dropPending(of partitions: Set<PartitionID>) -> [KafkaMessage] {
        let matching = pending.messages.filter {
            partitions.contains(PartitionID(topic: $0.topic, partition: $0.partition))
        }
        guard !matching.isEmpty else { return [] }
        let remaining = pending.messages.filter {
            !partitions.contains(PartitionID(topic: $0.topic, partition: $0.partition))
        }
        pending.removeAll()
        for message in remaining { pending.append(message) }
        return matching
    }

    /// Checks a stored offset against the partition's log end. An offset beyond it means that
    /// the topic was re-created or its log truncated. Reading from the log start would then
    /// skip the new messages below the stored offset, so the partition is left unconsumed, with
    /// an error in the log, until an operator resolves it. A failed check lets the partition start.
    /// After one failure (the broker is unreachable), `checking` turns false and the other
    /// partitions of the assignment start unchecked, so that a rebalance never waits long.
    private func isBeyondLogEnd(_ partition: PartitionID, storedOffset: Int64, checking: inout Bool) -> Bool {
        guard checking else { return false }
        let watermarks: KafkaWatermarks
        do {
            guard let consumer else { return false }
            watermarks = try consumer.watermarks(
                topic: partition.topic, partition: partition.partition, timeoutMilliseconds: 2000)
        } catch {
            checking = false
            logger.warning(
                "cannot read the log end of an assigned partition; starting it and the others at their stored offsets",
                ["kafka.topic": partition.topic, "kafka.partition": partition.partition, "error": error])
            return false
        }
        guard storedOffset > watermarks.high else { return false }
        logger.error(
            "stored offset is beyond the log end; the topic was re-created or truncated. The partition is not consumed until the stored offset is corrected",
            [
                "kafka.topic": partition.topic, "kafka.partition": partition.partition, "stored_offset": storedOffset,
                "kafka.log_end": watermarks.high,
            ])
        return true
    }

    /// Logs each partition whose stored offset another consumer group advanced last. Stored
    /// offsets belong to the schema, not to a group, so two groups that write one schema take
    /// each other's offsets. The compare-and-set keeps the ledger exact, but work is lost.
    private func warnAboutOtherGroups(_ lastGroups: [PartitionID: String]) {
        for (partition, group) in lastGroups.sorted(by: { $0.key < $1.key })
        where !group.utf8.elementsEqual(configuration.kafka.groupID.utf8) {
            logger.warning(
                "partition was last written by another consumer group; one schema must be written by one group",
                [
                    "kafka.topic": partition.topic, "kafka.partition": partition.partition,
                    "kafka.group_id": configuration.kafka.groupID, "kafka.other_group_id": group,
                ])
        }
    }

    func describe(_ partitions: [PartitionID]) -> String {
        partitions.sorted().map(\.description).joined(separator: ",")
    }

    private func describeStart(_ start: [KafkaTopicPartition]) -> String {
        start.map {
            "\($0.topic)[\($0.partition)]@\($0.offset == KafkaOffset.beginning ? "start" : String($0.offset!))"
        }.joined(separator: ",")
    }
}

func sleepMilliseconds(_ milliseconds: Int64) {
    var request = timespec(tv_sec: Int(milliseconds / 1000), tv_nsec: Int(milliseconds % 1000) * 1_000_000)
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR {
        request = remaining
    }
}
