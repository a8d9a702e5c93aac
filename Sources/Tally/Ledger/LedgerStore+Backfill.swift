import JSON
import Postgres

/// The offset range of one partition in a backfill run, with its progress and counts.
public struct BackfillPartition: Sendable, Equatable {
    public var partition: PartitionID
    public var fromOffset: Int64
    /// The end of the range, exclusive.
    public var toOffset: Int64
    /// The first offset not processed yet.
    public var nextOffset: Int64
    public var counts = BackfillCounts()

    public init(partition: PartitionID, fromOffset: Int64, toOffset: Int64, nextOffset: Int64) {
        self.partition = partition
        self.fromOffset = fromOffset
        self.toOffset = toOffset
        self.nextOffset = nextOffset
    }

    public var isDone: Bool { nextOffset >= toOffset }
}

/// The counts of a backfill: the outcome of each message it read.
public struct BackfillCounts: Sendable, Equatable {
    public var accepted: Int64 = 0
    /// Events whose idempotency key was accepted before, at another offset.
    public var duplicates: Int64 = 0
    /// Offsets that had an outcome already: a ledger row, a duplicate or a dead letter.
    public var alreadyRecorded: Int64 = 0
    public var deadLetters: Int64 = 0
    /// Offsets at or past the live group's stored offset, which the live workers write.
    public var leftToLiveGroup: Int64 = 0
    /// Messages outside the run's event-time range.
    public var outsideTimeRange: Int64 = 0

    public init() {}

    public static func + (lhs: BackfillCounts, rhs: BackfillCounts) -> BackfillCounts {
        var sum = lhs
        sum.accepted += rhs.accepted
        sum.duplicates += rhs.duplicates
        sum.alreadyRecorded += rhs.alreadyRecorded
        sum.deadLetters += rhs.deadLetters
        sum.leftToLiveGroup += rhs.leftToLiveGroup
        sum.outsideTimeRange += rhs.outsideTimeRange
        return sum
    }

    /// The messages that added nothing because their event was recorded before.
    public var duplicatesAndRecorded: Int64 { duplicates + alreadyRecorded }
}

/// A recorded backfill run.
public struct BackfillRun: Sendable {
    public enum Status: String, Sendable {
        case running, interrupted, finished
    }

    public var id: Int64
    public var topic: String
    /// The range as the operator gave it.
    public var rangeDescription: String
    /// Only events whose time lies in `[from, to)` are applied, when set.
    public var eventTimeFrom: EventTime?
    public var eventTimeTo: EventTime?
    public var status: Status
    public var startedAt: String
    public var updatedAt: String
    public var partitions: [BackfillPartition]

    public var counts: BackfillCounts { partitions.reduce(BackfillCounts()) { $0 + $1.counts } }
    public var totalOffsets: Int64 { partitions.reduce(0) { $0 + ($1.toOffset - $1.fromOffset) } }
    public var doneOffsets: Int64 { partitions.reduce(0) { $0 + ($1.nextOffset - $1.fromOffset) } }
}

/// The result of one backfill batch: the counts it added and the ledger ids it accepted.
public struct BackfillBatchSummary: Sendable {
    public var counts = BackfillCounts()
    public var acceptedLedgerIDs: [Int64] = []
}

extension LedgerStore {
    /// Records a new run with its partition ranges, in its own transaction unless one is open.
    ///
    /// A dry run's row is rolled back, so it takes the id `-pg_backend_pid()` instead of a
    /// value of the id sequence: sequence values are not returned on rollback, and the
    /// recorded runs would show gaps. The backend pid is unique among open sessions, so
    /// concurrent dry runs do not collide.
    public func createBackfillRun(
        topic: String, rangeDescription: String, eventTimeFrom: EventTime?, eventTimeTo: EventTime?,
        partitions: [BackfillPartition], isDryRun: Bool = false
    ) throws(PostgresError) -> Int64 {
        let writer = JSONWriter()
        writer.beginArray()
        for range in partitions {
            writer.beginObject()
            writer.field("topic", range.partition.topic)
            writer.field("partition", Int64(range.partition.partition))
            writer.field("from_offset", range.fromOffset)
            writer.field("to_offset", range.toOffset)
            writer.endObject()
        }
        writer.endArray()
        let result = try connection.execute(
            """
            WITH run AS (
                INSERT INTO \(schema).backfill_runs (id, topic, range_description, event_time_from, event_time_to, status)
                VALUES (
                    CASE WHEN $6::boolean THEN -pg_backend_pid() ELSE nextval(pg_get_serial_sequence($7, 'id')) END,
                    $1, $2, $3, $4, 'running')
                RETURNING id
            ), ranges AS (
                INSERT INTO \(schema).backfill_partitions (run_id, topic, partition, from_offset, to_offset, next_offset)
                SELECT run.id, p.topic, p.partition, p.from_offset, p.to_offset, p.from_offset
                FROM run, json_to_recordset($5::json) AS p(topic text, partition integer, from_offset bigint, to_offset bigint)
            )
            SELECT id FROM run
            """,
            [
                .text(topic), .text(rangeDescription), eventTimeFrom.map { .text($0.rfc3339) },
                eventTimeTo.map { .text($0.rfc3339) }, .text(writer.text), .text(isDryRun ? "true" : "false"),
                .text("\(schema).backfill_runs"),
            ])
        return result.int(row: 0, column: 0)!
    }

    /// Reads the runs, newest first, or the one run with `id`.
    public func backfillRuns(id: Int64? = nil) throws(PostgresError) -> [BackfillRun] {
        let runs = try connection.execute(
            """
            SELECT id, topic, range_description,
                   to_char(event_time_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   to_char(event_time_to AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   status, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                   to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            FROM \(schema).backfill_runs
            WHERE $1::bigint IS NULL OR id = $1::bigint
            ORDER BY id DESC
            """,
            [id.map { .text(String($0)) }])
        let partitions = try connection.execute(
            """
            SELECT run_id, topic, partition, from_offset, to_offset, next_offset, accepted, duplicates,
                   already_recorded, dead_letters, left_to_live_group, outside_time_range
            FROM \(schema).backfill_partitions
            WHERE $1::bigint IS NULL OR run_id = $1::bigint
            ORDER BY run_id, topic, partition
            """,
            [id.map { .text(String($0)) }])
        var byRun: [Int64: [BackfillPartition]] = [:]
        for row in 0..<partitions.rowCount {
            var range = BackfillPartition(
                partition: PartitionID(
                    topic: partitions.string(row: row, column: 1)!,
                    partition: Int32(partitions.int(row: row, column: 2)!)),
                fromOffset: partitions.int(row: row, column: 3)!, toOffset: partitions.int(row: row, column: 4)!,
                nextOffset: partitions.int(row: row, column: 5)!)
            range.counts.accepted = partitions.int(row: row, column: 6)!
            range.counts.duplicates = partitions.int(row: row, column: 7)!
            range.counts.alreadyRecorded = partitions.int(row: row, column: 8)!
            range.counts.deadLetters = partitions.int(row: row, column: 9)!
            range.counts.leftToLiveGroup = partitions.int(row: row, column: 10)!
            range.counts.outsideTimeRange = partitions.int(row: row, column: 11)!
            byRun[partitions.int(row: row, column: 0)!, default: []].append(range)
        }
        return (0..<runs.rowCount).map { row in
            let id = runs.int(row: row, column: 0)!
            return BackfillRun(
                id: id, topic: runs.string(row: row, column: 1)!, rangeDescription: runs.string(row: row, column: 2)!,
                eventTimeFrom: runs.string(row: row, column: 3).flatMap { try? EventTime.parseRFC3339($0) },
                eventTimeTo: runs.string(row: row, column: 4).flatMap { try? EventTime.parseRFC3339($0) },
                status: BackfillRun.Status(rawValue: runs.string(row: row, column: 5)!) ?? .running,
                startedAt: runs.string(row: row, column: 6)!, updatedAt: runs.string(row: row, column: 7)!,
                partitions: byRun[id] ?? [])
        }
    }

    public func setBackfillStatus(_ id: Int64, _ status: BackfillRun.Status) throws(PostgresError) {
        try connection.execute(
            """
            UPDATE \(schema).backfill_runs
            SET status = $2, updated_at = now(), finished_at = CASE WHEN $2 = 'finished' THEN now() END
            WHERE id = $1
            """,
            [.text(String(id)), .text(status.rawValue)])
    }

    /// Writes one batch of a backfill run for one partition through the worker's outcome step,
    /// and moves the run's progress on that partition from `expectedNextOffset` to `nextOffset`.
    ///
    /// Only offsets below the live group's stored offset that have no outcome yet are written.
    /// An offset with an outcome is counted as already recorded and gets no second row, and an
    /// offset at or past the stored offset is left to the live workers, so an offset never has
    /// two outcomes. The stored offsets themselves are only read. Idempotency keys whose
    /// ledger row was deleted are claimed again, so that removed events can be restored.
    ///
    /// With `ownTransaction` false, the caller has opened a transaction, as a dry run does, and
    /// this writes into it without committing.
    public func writeBackfillBatch(
        _ messages: [ValidatedMessage], runID: Int64, partition: PartitionID, expectedNextOffset: Int64,
        nextOffset: Int64, eventTimeFrom: EventTime?, eventTimeTo: EventTime?, now: EventTime,
        limits: ValidationLimits, ownTransaction: Bool = true
    ) throws(BatchWriteError) -> BackfillBatchSummary {
        if ownTransaction {
            do {
                try ensureDedupePartitions(now: now, limits: limits)
            } catch {
                throw .database(error)
            }
        }
        do {
            if ownTransaction { try connection.execute("BEGIN") }
            let progress = try connection.execute(
                """
                SELECT next_offset FROM \(schema).backfill_partitions
                WHERE run_id = $1 AND topic = $2 AND partition = $3
                FOR UPDATE
                """,
                [.text(String(runID)), .text(partition.topic), .text(String(partition.partition))])
            guard progress.rowCount == 1, progress.int(row: 0, column: 0)! == expectedNextOffset else {
                throw BatchWriteError.staleOffsets([
                    partition: progress.rowCount == 1 ? progress.int(row: 0, column: 0) : nil
                ])
            }

            var summary = BackfillBatchSummary()
            let eligible = try backfillEligible(
                messages, partition: partition, eventTimeFrom: eventTimeFrom, eventTimeTo: eventTimeTo,
                counts: &summary.counts)
            let outcomes = try writeOutcomes(
                eligible, now: now, limits: limits, options: OutcomeOptions(reclaimOrphanedKeys: true))
            for outcome in outcomes {
                switch outcome {
                case .accepted(let ledgerID):
                    summary.counts.accepted += 1
                    summary.acceptedLedgerIDs.append(ledgerID)
                case .duplicate:
                    summary.counts.duplicates += 1
                case .deadLetter:
                    summary.counts.deadLetters += 1
                }
            }
            try recordBackfillBatch(
                runID: runID, partition: partition, fromOffset: expectedNextOffset, nextOffset: nextOffset,
                counts: summary.counts)
            if ownTransaction { try connection.execute("COMMIT") }
            return summary
        } catch let error as BatchWriteError {
            if ownTransaction { rollbackQuietly() }
            throw error
        } catch let error as PostgresError {
            if ownTransaction { rollbackQuietly() }
            throw .database(error)
        } catch {
            if ownTransaction { rollbackQuietly() }
            preconditionFailure("unexpected error in backfill transaction: \(error)")
        }
    }

    /// Returns the messages a backfill batch writes, and counts the others.
    private func backfillEligible(
        _ messages: [ValidatedMessage], partition: PartitionID, eventTimeFrom: EventTime?, eventTimeTo: EventTime?,
        counts: inout BackfillCounts
    ) throws(PostgresError) -> [ValidatedMessage] {
        guard let first = messages.first?.message.offset, let last = messages.last?.message.offset else { return [] }
        let stored = try connection.execute(
            "SELECT next_offset FROM \(schema).partition_offsets WHERE topic = $1 AND partition = $2",
            [.text(partition.topic), .text(String(partition.partition))])
        let liveStoredOffset = stored.rowCount == 1 ? stored.int(row: 0, column: 0)! : 0

        let recorded = try connection.execute(
            """
            SELECT kafka_offset FROM \(schema).ledger
            WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset BETWEEN $3 AND $4
            UNION
            SELECT kafka_offset FROM \(schema).duplicates
            WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset BETWEEN $3 AND $4
            UNION
            SELECT kafka_offset FROM \(schema).dead_letters
            WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset BETWEEN $3 AND $4
            """,
            [.text(partition.topic), .text(String(partition.partition)), .text(String(first)), .text(String(last))])
        // NOTE: a dead letter that a replay resolved counts as recorded even when the ledger row
        // it was resolved into was deleted later, so a backfill does not restore that event.
        // `tally reconcile` reports the offset as missing and the dead letter as referring to a
        // missing row.
        let recordedOffsets = Set((0..<recorded.rowCount).map { recorded.int(row: $0, column: 0)! })

        let filtersTime = eventTimeFrom != nil || eventTimeTo != nil
        var eligible: [ValidatedMessage] = []
        for validated in messages {
            let offset = validated.message.offset
            if offset >= liveStoredOffset {
                counts.leftToLiveGroup += 1
            } else if recordedOffsets.contains(offset) {
                counts.alreadyRecorded += 1
            } else if filtersTime && !isInTimeRange(validated, from: eventTimeFrom, to: eventTimeTo) {
                counts.outsideTimeRange += 1
            } else {
                eligible.append(validated)
            }
        }
        return eligible
    }

    /// Accepted events whose time lies in `[from, to)`. A rejected message has no trusted
    /// time, so a time filter leaves it out.
    private func isInTimeRange(_ validated: ValidatedMessage, from: EventTime?, to: EventTime?) -> Bool {
        guard case .accepted(let event) = validated.outcome else { return false }
        if let from, event.time < from { return false }
        if let to, event.time >= to { return false }
        return true
    }

    private func recordBackfillBatch(
        runID: Int64, partition: PartitionID, fromOffset: Int64, nextOffset: Int64, counts: BackfillCounts
    ) throws(PostgresError) {
        try connection.execute(
            """
            UPDATE \(schema).backfill_partitions SET
                next_offset = $4,
                accepted = accepted + $5, duplicates = duplicates + $6, already_recorded = already_recorded + $7,
                dead_letters = dead_letters + $8, left_to_live_group = left_to_live_group + $9,
                outside_time_range = outside_time_range + $10, updated_at = now()
            WHERE run_id = $1 AND topic = $2 AND partition = $3
            """,
            [
                .text(String(runID)), .text(partition.topic), .text(String(partition.partition)),
                .text(String(nextOffset)), .text(String(counts.accepted)), .text(String(counts.duplicates)),
                .text(String(counts.alreadyRecorded)), .text(String(counts.deadLetters)),
                .text(String(counts.leftToLiveGroup)), .text(String(counts.outsideTimeRange)),
            ])
        try connection.execute(
            "UPDATE \(schema).backfill_runs SET updated_at = now() WHERE id = $1", [.text(String(runID))])
        try connection.execute(
            """
            INSERT INTO \(schema).batches
                (topic, partition, from_offset, next_offset, accepted, duplicates, dead_letters, backfill_run)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            [
                .text(partition.topic), .text(String(partition.partition)), .text(String(fromOffset)),
                .text(String(nextOffset)), .text(String(counts.accepted)), .text(String(counts.duplicates)),
                .text(String(counts.deadLetters)), .text(String(runID)),
            ])
    }

    /// Combines the readings of the given ledger rows per meter, subject, groups and minute:
    /// what a dry run would add. `aggregations` maps a meter slug to `sum`, `count`, `min`,
    /// `max` or `latest`, and a slug without an entry is summed. Each row is `meter, subject,
    /// groups (JSON), minute, events, aggregation, value`. Runs inside the dry run's
    /// transaction, before it rolls back.
    public func readingsPerMinute(ledgerIDs: [Int64], aggregations: [String: String]) throws(PostgresError)
        -> [[String]]
    {
        guard !ledgerIDs.isEmpty else { return [] }
        let writer = JSONWriter()
        writer.beginObject()
        for (slug, aggregation) in aggregations.sorted(by: { $0.key < $1.key }) { writer.field(slug, aggregation) }
        writer.endObject()
        let result = try connection.execute(
            """
            WITH readings AS (
                SELECT m.key AS meter, l.subject, coalesce(m.value -> 'groups', '{}'::jsonb) AS groups,
                       date_trunc('minute', l.event_time AT TIME ZONE 'UTC') AS minute,
                       (m.value ->> 'quantity')::numeric AS quantity, l.event_time, l.id,
                       coalesce($2::jsonb ->> m.key, 'sum') AS aggregation
                FROM \(schema).ledger l CROSS JOIN LATERAL jsonb_each(l.meters) AS m
                WHERE l.id = ANY($1::bigint[])
            )
            SELECT meter, subject, groups::text, to_char(minute, 'YYYY-MM-DD"T"HH24:MI"Z"'), count(*)::text,
                   aggregation,
                   (CASE aggregation
                        WHEN 'count' THEN count(*)::numeric
                        WHEN 'min' THEN min(quantity)
                        WHEN 'max' THEN max(quantity)
                        WHEN 'latest' THEN (array_agg(quantity ORDER BY event_time DESC, id DESC))[1]
                        ELSE sum(quantity)
                    END)::text
            FROM readings
            GROUP BY meter, subject, groups, minute, aggregation
            ORDER BY 1, 2, 3, 4
            """,
            [.text("{" + ledgerIDs.map(String.init).joined(separator: ",") + "}"), .text(writer.text)])
        return result.rows.map { $0.map { $0 ?? "" } }
    }
}
