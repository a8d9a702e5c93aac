import Glibc
import Kafka

extension Worker {
    /// Starts new partitions at their stored offsets in PostgreSQL, or at the log start when
    /// none is stored. Kafka's committed offsets are never read.
    public func partitionsAssigned(_ partitions: [KafkaTopicPartition]) -> [KafkaTopicPartition] {
        let ids = partitions.map { PartitionID(topic: $0.topic, partition: $0.partition) }
        // The cooperative protocol calls this with an empty list when a rebalance leaves this
        // member's assignment unchanged.
        guard !ids.isEmpty else { return [] }
        var backoff = Backoff()
        var stored: [PartitionID: Int64]?
        while stored == nil {
            if let store = connectedStore() {
                do {
                    let partitions = try store.storedPartitions(ids)
                    warnAboutOtherGroups(partitions.compactMapValues(\.consumerGroup))
                    stored = partitions.mapValues(\.nextOffset)
                    break
                } catch {
                    logger.rateLimited(
                        .error, "reading stored offsets failed; retrying", intervalSeconds: 10, ["error": error])
                    store.connection.close()
                    self.store = nil
                }
            }
            if stopSignal.isRequested {
                logger.warning(
                    "stopping before the assigned partitions could start", ["kafka.partitions": describe(ids)])
                return []
            }
            sleepMilliseconds(backoff.next())
        }

        var start: [KafkaTopicPartition] = []
        for partition in ids {
            let offset = stored?[partition]
            if let offset, isBeyondLogEnd(partition, storedOffset: offset) { continue }
            positions[partition] = PartitionPosition(storedOffset: offset, nextOffset: offset)
            start.append(
                KafkaTopicPartition(
                    topic: partition.topic, partition: partition.partition, offset: offset ?? KafkaOffset.beginning))
        }
        logger.info(
            "partitions assigned",
            [
                "kafka.partitions": start.map {
                    "\($0.topic)[\($0.partition)]@\($0.offset == KafkaOffset.beginning ? "start" : String($0.offset!))"
                }.joined(separator: ",")
            ])
        observer.partitionsAssigned(Dictionary(uniqueKeysWithValues: ids.map { ($0, stored?[$0]) }))
        return start
    }

    /// Commits the batch in flight before the partitions go. When the assignment was lost,
    /// another member may own them already, so their messages are dropped instead; the
    /// stored-offset check would refuse them anyway.
    public func partitionsRevoked(_ partitions: [KafkaTopicPartition], lost: Bool) {
        let ids = Set(partitions.map { PartitionID(topic: $0.topic, partition: $0.partition) })
        if lost {
            let remaining = pending.messages.filter {
                !ids.contains(PartitionID(topic: $0.topic, partition: $0.partition))
            }
            let dropped = pending.messages.count - remaining.count
            pending.removeAll()
            for message in remaining { pending.append(message) }
            logger.warning(
                "partitions lost; dropping their uncommitted messages",
                ["kafka.partitions": describe(Array(ids)), "batch.dropped": dropped])
        } else {
            flush()
            logger.info("partitions revoked", ["kafka.partitions": describe(Array(ids))])
        }
        for partition in ids { positions[partition] = nil }
    }

    /// Checks a stored offset against the partition's log end. An offset beyond it means that
    /// the topic was re-created or its log truncated. Reading from the log start would then
    /// skip the new messages below the stored offset, so the partition is left unconsumed, with
    /// an error in the log, until an operator resolves it. A failed check lets the partition start.
    private func isBeyondLogEnd(_ partition: PartitionID, storedOffset: Int64) -> Bool {
        let watermarks: KafkaWatermarks
        do {
            guard let consumer else { return false }
            watermarks = try consumer.watermarks(
                topic: partition.topic, partition: partition.partition, timeoutMilliseconds: 5000)
        } catch {
            logger.warning(
                "cannot read the log end of an assigned partition; starting it at its stored offset",
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

    private func describe(_ partitions: [PartitionID]) -> String {
        partitions.sorted().map(\.description).joined(separator: ",")
    }
}

func sleepMilliseconds(_ milliseconds: Int64) {
    var request = timespec(tv_sec: Int(milliseconds / 1000), tv_nsec: Int(milliseconds % 1000) * 1_000_000)
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR {
        request = remaining
    }
}
