import Hashing
import JSON
import Postgres

extension LedgerStore {
    /// Writes the outcome of every message in one transaction and advances the stored offsets.
    ///
    /// `expectedOffsets` holds, for every partition in `messages`, the stored offset the
    /// batch starts from (nil when the partition has none yet). The transaction locks the
    /// stored offsets first and throws `staleOffsets` when one moved: another consumer owns the
    /// partition now, and nothing is written. Otherwise it inserts accepted events into the
    /// ledger, adds them to the rollups, records duplicates and dead letters, and sets each
    /// stored offset past the partition's last message, all or nothing.
    ///
    /// Messages of one partition must be in increasing offset order.
    ///
    /// `logStarts` contains the log start of partitions whose first message lies beyond the
    /// stored offset. The offsets below the log start are recorded as a gap with the reason
    /// `retention`: the broker deleted them before they were read.
    public func writeBatch(
        _ messages: [ValidatedMessage], expectedOffsets: [PartitionID: Int64?], now: EventTime,
        limits: ValidationLimits, logStarts: [PartitionID: Int64] = [:]
    ) throws(BatchWriteError) -> BatchSummary {
        var spans = partitionSpans(messages, expectedOffsets: expectedOffsets)
        let gaps = offsetGaps(messages, spans: spans, logStarts: logStarts)
        do {
            try ensureDedupePartitions(now: now, limits: limits)
        } catch {
            throw .database(error)
        }

        var timings = BatchTimings()
        var lapStart = MonotonicTime.now()
        func lap() -> Int64 {
            let end = MonotonicTime.now()
            defer { lapStart = end }
            return (end.nanoseconds - lapStart.nanoseconds) / 1000
        }

        do {
            try connection.execute("BEGIN")
            try lockStoredOffsets(spans)
            timings.classify = lap()
            let outcomes = try writeOutcomes(messages, now: now, limits: limits, timings: &timings)
            lapStart = MonotonicTime.now()

            for (index, validated) in messages.enumerated() {
                let partition = validated.partitionID
                switch outcomes[index] {
                case .accepted:
                    spans[partition]!.accepted += 1
                    if case .accepted(let event) = validated.outcome, event.readings.isEmpty {
                        spans[partition]!.unmetered += 1
                    }
                case .duplicate:
                    spans[partition]!.duplicates += 1
                case .deadLetter(let rejection):
                    spans[partition]!.deadLetters[rejection.reason, default: 0] += 1
                }
            }

            try insertGaps(gaps)
            try advanceStoredOffsets(spans)
            timings.other += lap()
            try testHooks.beforeCommit?()
            try connection.execute("COMMIT")
            timings.commit = lap()
            logGaps(gaps)
            try testHooks.afterCommit?()

            var summary = BatchSummary()
            summary.timings = timings
            summary.outcomes = outcomes
            summary.gaps = gaps
            for span in spans.values {
                summary.nextOffsets[span.partition] = span.lastOffset + 1
                summary.accepted += span.accepted
                summary.unmetered += span.unmetered
                summary.duplicates += span.duplicates
                summary.deadLetters.merge(span.deadLetters, uniquingKeysWith: +)
            }
            return summary
        } catch let error as BatchWriteError {
            rollbackQuietly()
            throw error
        } catch let error as PostgresError {
            rollbackQuietly()
            throw .database(error)
        } catch {
            rollbackQuietly()
            preconditionFailure("unexpected error in batch transaction: \(error)")
        }
    }

    /// Decides the outcome of every message and writes its ledger row and rollup readings,
    /// duplicate row or dead letter, inside the caller's transaction. The batch writer, backfill
    /// and dead-letter replay share this step, so an event has one path into the ledger.
    func writeOutcomes(
        _ messages: [ValidatedMessage], now: EventTime, limits: ValidationLimits,
        options: OutcomeOptions = OutcomeOptions()
    )
        throws -> [MessageOutcome]
    {
        var timings = BatchTimings()
        return try writeOutcomes(messages, now: now, limits: limits, options: options, timings: &timings)
    }

    /// Does what `writeOutcomes` does and adds the time of each step to `timings`.
    func writeOutcomes(
        _ messages: [ValidatedMessage], now: EventTime, limits: ValidationLimits,
        options: OutcomeOptions = OutcomeOptions(), timings: inout BatchTimings
    )
        throws -> [MessageOutcome]
    {
        var lapStart = MonotonicTime.now()
        func lap() -> Int64 {
            let end = MonotonicTime.now()
            defer { lapStart = end }
            return (end.nanoseconds - lapStart.nanoseconds) / 1000
        }

        let outcomes = try classify(
            messages, now: now, limits: limits, reclaimOrphanedKeys: options.reclaimOrphanedKeys)
        timings.classify += lap()
        try insertLedgerRows(messages, outcomes: outcomes)
        timings.ledger += lap()
        try upsertRollups(messages, outcomes: outcomes)
        timings.rollups += lap()
        try insertDuplicates(messages, outcomes: outcomes)
        if options.insertsDeadLetters {
            try insertDeadLetters(messages, outcomes: outcomes)
        }
        timings.other += lap()
        return outcomes
    }

    // MARK: Offsets

    private func partitionSpans(_ messages: [ValidatedMessage], expectedOffsets: [PartitionID: Int64?])
        -> [PartitionID: PartitionSpan]
    {
        var spans: [PartitionID: PartitionSpan] = [:]
        for validated in messages {
            let partition = validated.partitionID
            let offset = validated.message.offset
            if var span = spans[partition] {
                precondition(offset > span.lastOffset, "messages of \(partition) are not in offset order")
                span.lastOffset = offset
                spans[partition] = span
            } else {
                guard let expected = expectedOffsets[partition] else {
                    preconditionFailure("no expected stored offset given for \(partition)")
                }
                precondition(expected.map { offset >= $0 } ?? true, "\(partition)@\(offset) is below its stored offset")
                spans[partition] = PartitionSpan(
                    partition: partition, expectedStoredOffset: expected, firstOffset: offset, lastOffset: offset)
            }
        }
        return spans
    }

    /// Finds the offset ranges without a message between each stored offset and the last
    /// message. The part of a range below the partition's log start is a retention gap.
    private func offsetGaps(
        _ messages: [ValidatedMessage], spans: [PartitionID: PartitionSpan], logStarts: [PartitionID: Int64]
    ) -> [OffsetGap] {
        var nextExpected = spans.mapValues { $0.startOffset }
        var gaps: [OffsetGap] = []
        for validated in messages {
            let partition = validated.partitionID
            let offset = validated.message.offset
            if var expected = nextExpected[partition], offset > expected {
                if let logStart = logStarts[partition], logStart > expected {
                    let end = min(logStart, offset)
                    gaps.append(
                        OffsetGap(
                            partition: partition, fromOffset: expected, toOffset: end - 1,
                            reason: OffsetGap.retentionReason))
                    expected = end
                }
                if offset > expected {
                    gaps.append(
                        OffsetGap(
                            partition: partition, fromOffset: expected, toOffset: offset - 1,
                            reason: OffsetGap.skippedReason))
                }
            }
            nextExpected[partition] = offset + 1
        }
        return gaps
    }

    /// Locks the stored offsets of the batch's partitions and checks them, inserting rows for
    /// partitions that have none. Locks are taken in (topic, partition) order.
    private func lockStoredOffsets(_ spans: [PartitionID: PartitionSpan]) throws {
        let partitions = spans.keys.sorted()
        let locked = try connection.execute(
            """
            SELECT o.topic, o.partition, o.next_offset
            FROM \(schema).partition_offsets o
            JOIN json_to_recordset($1::json) AS p(topic text, partition integer)
              ON o.topic = p.topic COLLATE "C" AND o.partition = p.partition
            ORDER BY o.topic, o.partition
            FOR UPDATE OF o
            """,
            [.text(partitionListJSON(partitions))])
        var stored: [PartitionID: Int64?] = [:]
        for row in 0..<locked.rowCount {
            let partition = PartitionID(
                topic: locked.string(row: row, column: 0)!, partition: Int32(locked.int(row: row, column: 1)!))
            stored[partition] = locked.int(row: row, column: 2)!
        }

        var stale: [PartitionID: Int64?] = [:]
        var missing: [PartitionSpan] = []
        for partition in partitions {
            let span = spans[partition]!
            let found: Int64?? = stored[partition]
            switch (span.expectedStoredOffset, found) {
            case (let expected?, let current??) where expected == current:
                break
            case (nil, nil):
                missing.append(span)
            default:
                stale[partition] = found ?? nil
            }
        }
        guard stale.isEmpty else { throw BatchWriteError.staleOffsets(stale) }
        guard !missing.isEmpty else { return }

        // A concurrent insert of the same row makes this one wait, then do nothing.
        let writer = JSONWriter()
        writer.beginArray()
        for span in missing {
            writer.beginObject()
            writer.field("topic", span.partition.topic)
            writer.field("partition", Int64(span.partition.partition))
            writer.field("first_offset", span.firstOffset)
            writer.endObject()
        }
        writer.endArray()
        let inserted = try connection.execute(
            """
            INSERT INTO \(schema).partition_offsets (topic, partition, first_offset, next_offset)
            SELECT p.topic, p.partition, p.first_offset, p.first_offset
            FROM json_to_recordset($1::json) AS p(topic text, partition integer, first_offset bigint)
            ORDER BY p.topic COLLATE "C", p.partition
            ON CONFLICT (topic, partition) DO NOTHING
            """,
            [.text(writer.text)])
        if inserted.affectedRows != missing.count {
            let current = try storedOffsets(missing.map(\.partition))
            throw BatchWriteError.staleOffsets(
                Dictionary(uniqueKeysWithValues: missing.map { ($0.partition, current[$0.partition]) }))
        }
        for span in missing {
            logger.info(
                "partition has no stored offset; starting at its first message",
                [
                    "kafka.topic": span.partition.topic, "kafka.partition": span.partition.partition,
                    "kafka.offset": span.firstOffset,
                ])
        }
    }

    private func advanceStoredOffsets(_ spans: [PartitionID: PartitionSpan]) throws {
        let writer = JSONWriter()
        writer.beginArray()
        for span in spans.values.sorted(by: { $0.partition < $1.partition }) {
            writer.beginObject()
            writer.field("topic", span.partition.topic)
            writer.field("partition", Int64(span.partition.partition))
            writer.field("expected", span.startOffset)
            writer.field("next_offset", span.lastOffset + 1)
            writer.field("accepted", Int64(span.accepted))
            writer.field("unmetered", Int64(span.unmetered))
            writer.field("duplicates", Int64(span.duplicates))
            writer.field("dead_letters", Int64(span.deadLetters.values.reduce(0, +)))
            writer.endObject()
        }
        writer.endArray()
        // The update and the batch records are one statement: the records are the rows the
        // compare-and-set changed.
        let updated = try connection.execute(
            """
            WITH moved AS (
            UPDATE \(schema).partition_offsets o SET
                next_offset = u.next_offset,
                accepted = o.accepted + u.accepted,
                unmetered = o.unmetered + u.unmetered,
                duplicates = o.duplicates + u.duplicates,
                dead_letters = o.dead_letters + u.dead_letters,
                consumer_group = coalesce($2, o.consumer_group),
                updated_at = now()
            FROM json_to_recordset($1::json) AS u(
                topic text, partition integer, expected bigint, next_offset bigint,
                accepted bigint, unmetered bigint, duplicates bigint, dead_letters bigint)
            WHERE o.topic = u.topic COLLATE "C" AND o.partition = u.partition AND o.next_offset = u.expected
            RETURNING o.topic, o.partition, u.expected, u.next_offset, u.accepted, u.duplicates, u.dead_letters
            )
            INSERT INTO \(schema).batches
                (topic, partition, from_offset, next_offset, accepted, duplicates, dead_letters, consumer_group)
            SELECT topic, partition, expected, next_offset, accepted, duplicates, dead_letters, $2
            FROM moved
            """,
            [.text(writer.text), consumerGroup.map(PostgresParameter.text)])
        // The rows are locked since the start of the transaction, so this holds unless a bug broke it.
        guard updated.affectedRows == spans.count else {
            preconditionFailure(
                "compare-and-set of stored offsets changed \(updated.affectedRows) of \(spans.count) rows")
        }

        let counts = spans.values.flatMap { span in span.deadLetters.map { (span.partition, $0.key, $0.value) } }
        guard !counts.isEmpty else { return }
        writer.reset()
        writer.beginArray()
        for (partition, reason, count) in counts.sorted(by: { ($0.0, $0.1) < ($1.0, $1.1) }) {
            writer.beginObject()
            writer.field("topic", partition.topic)
            writer.field("partition", Int64(partition.partition))
            writer.field("reason", reason.rawValue)
            writer.field("count", Int64(count))
            writer.endObject()
        }
        writer.endArray()
        try connection.execute(
            """
            INSERT INTO \(schema).dead_letter_counts AS c (topic, partition, reason, count)
            SELECT topic, partition, reason, count
            FROM json_to_recordset($1::json) AS d(topic text, partition integer, reason text, count bigint)
            ON CONFLICT (topic, partition, reason) DO UPDATE SET count = c.count + excluded.count
            """,
            [.text(writer.text)])
    }

    private func insertGaps(_ gaps: [OffsetGap]) throws {
        guard !gaps.isEmpty else { return }
        let writer = JSONWriter()
        writer.beginArray()
        for gap in gaps {
            writer.beginObject()
            writer.field("topic", gap.partition.topic)
            writer.field("partition", Int64(gap.partition.partition))
            writer.field("from_offset", gap.fromOffset)
            writer.field("to_offset", gap.toOffset)
            writer.field("reason", gap.reason)
            writer.endObject()
        }
        writer.endArray()
        try connection.execute(
            """
            INSERT INTO \(schema).offset_gaps (topic, partition, from_offset, to_offset, reason, detected_at)
            SELECT topic, partition, from_offset, to_offset, reason, now()
            FROM json_to_recordset($1::json) AS g(topic text, partition integer, from_offset bigint, to_offset bigint, reason text)
            """,
            [.text(writer.text)])
    }

    private func logGaps(_ gaps: [OffsetGap]) {
        for gap in gaps where gap.reason == OffsetGap.retentionReason {
            logger.error(
                "offsets lost to retention: the broker deleted them before Tally read them; continuing from the log start",
                [
                    "kafka.topic": gap.partition.topic, "kafka.partition": gap.partition.partition,
                    "gap.from_offset": gap.fromOffset, "gap.to_offset": gap.toOffset,
                    "gap.offsets": gap.toOffset - gap.fromOffset + 1,
                ])
        }
        for gap in gaps where gap.reason != OffsetGap.retentionReason {
            logger.warning(
                "offsets without a message",
                [
                    "kafka.topic": gap.partition.topic, "kafka.partition": gap.partition.partition,
                    "gap.from_offset": gap.fromOffset, "gap.to_offset": gap.toOffset,
                ])
        }
    }
}
