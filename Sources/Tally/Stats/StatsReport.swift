import Kafka
import Postgres

/// The content of `tally stats`: per partition, the stored offset and the outcome counts, and
/// per meter, the totals over all rollups.
public struct StatsReport: Sendable {
    public struct PartitionRow: Sendable {
        public var partition: PartitionID
        /// The offset where Tally started reading the partition, or nil when nothing is stored yet.
        public var firstOffset: Int64?
        /// The stored offset: the next offset to read.
        public var storedOffset: Int64?
        public var accepted: Int64 = 0
        public var unmetered: Int64 = 0
        public var duplicates: Int64 = 0
        public var deadLetters: [String: Int64] = [:]
        /// Offsets below the stored offset that carried no message, all reasons together.
        public var gapOffsets: Int64 = 0
        /// Of those, the offsets that retention deleted before Tally read them.
        public var retentionGapOffsets: Int64 = 0
        /// Seconds since the stored offset last moved.
        public var secondsSinceUpdate: Int64?
        /// The log start and end reported by Kafka, when asked.
        public var watermarks: KafkaWatermarks?

        /// Whether the log now starts beyond the stored offset: retention deleted messages that
        /// Tally has not read. The gap is recorded when the partition is next read.
        public var isBelowLogStart: Bool {
            guard let watermarks, let storedOffset else { return false }
            return storedOffset < watermarks.low
        }

        /// Messages in the log that Tally has not written yet.
        public var lag: Int64? {
            guard let watermarks else { return nil }
            return max(0, watermarks.high - max(storedOffset ?? watermarks.low, watermarks.low))
        }
    }

    public struct MeterRow: Sendable {
        public var slug: String
        public var aggregation: String
        /// The meter's value over all time: the sum for `sum`, the event count for `count`,
        /// the extreme for `min` and `max`, the latest value for `latest`. Exact decimal text.
        public var total: String?
        public var events: Int64
        public var subjects: Int64
    }

    /// A recorded range of offsets without a message.
    public struct GapRow: Sendable {
        public var partition: PartitionID
        public var fromOffset: Int64
        public var toOffset: Int64
        public var reason: String
        /// When the worker found the gap, as PostgreSQL text in UTC.
        public var detectedAt: String
    }

    public var partitions: [PartitionRow]
    public var meters: [MeterRow]
    /// The retention gaps, newest first.
    public var retentionGaps: [GapRow] = []
    /// The workers that wrote their status within the last day.
    public var workers: [WorkerStatusRow] = []

    /// Problems an operator should look at: workers without progress, silent workers whose
    /// partitions no live worker reports, partitions with lag whose stored offset has not moved
    /// for `stalledAfterSeconds`, and partitions whose log starts beyond the stored offset.
    /// Empty when all is well. Lag needs the watermarks.
    public func problems(stalledAfterSeconds: Int64) -> [String] {
        var found: [String] = []
        for worker in workers where !worker.isSilent && worker.status == "no_progress" {
            found.append(
                "worker \(worker.workerID) makes no progress on \(worker.partitions) (lag \(worker.lag.map(String.init) ?? "unknown"), \(worker.secondsSinceProgress ?? 0) s): \(worker.detail)"
            )
        }
        // A silent worker matters while no live worker of its group has taken over its partitions.
        let liveOwned = Set(
            workers.filter { !$0.isSilent && $0.status != "stopped" }.flatMap { worker in
                worker.partitionList.map { "\(worker.consumerGroup)/\($0)" }
            })
        for worker in workers where worker.isSilent {
            let orphaned = worker.partitionList.filter { !liveOwned.contains("\(worker.consumerGroup)/\($0)") }
            guard !orphaned.isEmpty else { continue }
            found.append(
                "worker \(worker.workerID) has not reported for \(worker.secondsSinceHeartbeat) s (last \(worker.status)); no live worker reports \(orphaned.joined(separator: ",")). It was killed, or it is blocked"
            )
        }
        for row in partitions {
            if row.isBelowLogStart {
                found.append(
                    "\(row.partition): the log starts at \(row.watermarks!.low), beyond the stored offset \(row.storedOffset!); retention deleted unread messages"
                )
            }
            guard let lag = row.lag, lag > 0 else { continue }
            if let seconds = row.secondsSinceUpdate, seconds >= stalledAfterSeconds {
                found.append("\(row.partition): lag \(lag), and the stored offset has not moved for \(seconds) s")
            } else if row.storedOffset == nil {
                found.append("\(row.partition): lag \(lag), and nothing is stored yet")
            }
        }
        return found
    }

    public var totalAccepted: Int64 { partitions.reduce(0) { $0 + $1.accepted } }
    public var totalDuplicates: Int64 { partitions.reduce(0) { $0 + $1.duplicates } }
    public var totalUnmetered: Int64 { partitions.reduce(0) { $0 + $1.unmetered } }
    public var deadLettersByReason: [String: Int64] {
        partitions.reduce(into: [:]) { totals, row in totals.merge(row.deadLetters, uniquingKeysWith: +) }
    }
}

extension LedgerStore {
    /// Reads the stored offsets, outcome counts and meter totals. Partitions of `topics` that
    /// have no stored offset yet are listed when `partitionCounts` names them.
    public func statsReport(meters: [Meter], partitionCounts: [String: Int] = [:]) throws(PostgresError) -> StatsReport
    {
        var rows: [PartitionID: StatsReport.PartitionRow] = [:]
        for (topic, count) in partitionCounts {
            for partition in 0..<count {
                let id = PartitionID(topic: topic, partition: Int32(partition))
                rows[id] = StatsReport.PartitionRow(partition: id)
            }
        }

        let offsets = try connection.execute(
            """
            SELECT topic, partition, first_offset, next_offset, accepted, unmetered, duplicates,
                   floor(extract(epoch FROM now() - updated_at))::bigint
            FROM \(schema).partition_offsets
            """)
        for row in 0..<offsets.rowCount {
            let id = PartitionID(
                topic: offsets.string(row: row, column: 0)!, partition: Int32(offsets.int(row: row, column: 1)!))
            var entry = rows[id] ?? StatsReport.PartitionRow(partition: id)
            entry.firstOffset = offsets.int(row: row, column: 2)
            entry.storedOffset = offsets.int(row: row, column: 3)
            entry.accepted = offsets.int(row: row, column: 4) ?? 0
            entry.unmetered = offsets.int(row: row, column: 5) ?? 0
            entry.duplicates = offsets.int(row: row, column: 6) ?? 0
            entry.secondsSinceUpdate = offsets.int(row: row, column: 7)
            rows[id] = entry
        }

        let deadLetters = try connection.execute(
            "SELECT topic, partition, reason, count FROM \(schema).dead_letter_counts")
        for row in 0..<deadLetters.rowCount {
            let id = PartitionID(
                topic: deadLetters.string(row: row, column: 0)!, partition: Int32(deadLetters.int(row: row, column: 1)!)
            )
            rows[id, default: StatsReport.PartitionRow(partition: id)].deadLetters[
                deadLetters.string(row: row, column: 2)!] =
                deadLetters.int(row: row, column: 3) ?? 0
        }

        let gaps = try connection.execute(
            """
            SELECT topic, partition, sum(to_offset - from_offset + 1),
                   coalesce(sum(to_offset - from_offset + 1) FILTER (WHERE reason = $1), 0)
            FROM \(schema).offset_gaps GROUP BY 1, 2
            """,
            [.text(OffsetGap.retentionReason)])
        for row in 0..<gaps.rowCount {
            let id = PartitionID(
                topic: gaps.string(row: row, column: 0)!, partition: Int32(gaps.int(row: row, column: 1)!))
            rows[id, default: StatsReport.PartitionRow(partition: id)].gapOffsets = gaps.int(row: row, column: 2) ?? 0
            rows[id, default: StatsReport.PartitionRow(partition: id)].retentionGapOffsets =
                gaps.int(row: row, column: 3) ?? 0
        }

        let retention = try connection.execute(
            """
            SELECT topic, partition, from_offset, to_offset, reason,
                   to_char(detected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            FROM \(schema).offset_gaps WHERE reason = $1
            ORDER BY detected_at DESC, topic, partition, from_offset LIMIT 100
            """,
            [.text(OffsetGap.retentionReason)])
        let retentionGaps = (0..<retention.rowCount).map { row in
            StatsReport.GapRow(
                partition: PartitionID(
                    topic: retention.string(row: row, column: 0)!,
                    partition: Int32(retention.int(row: row, column: 1)!)),
                fromOffset: retention.int(row: row, column: 2)!, toOffset: retention.int(row: row, column: 3)!,
                reason: retention.string(row: row, column: 4)!, detectedAt: retention.string(row: row, column: 5)!)
        }

        var meterRows: [StatsReport.MeterRow] = []
        for meter in meters {
            let totals = try connection.execute(
                """
                SELECT CASE $2
                           WHEN 'sum' THEN sum(sum)::text
                           WHEN 'count' THEN sum(event_count)::text
                           WHEN 'min' THEN min(min)::text
                           WHEN 'max' THEN max(max)::text
                           WHEN 'latest' THEN (array_agg(latest ORDER BY latest_time DESC, latest_ledger_id DESC))[1]::text
                       END,
                       coalesce(sum(event_count), 0), count(DISTINCT subject)
                FROM \(schema).rollups WHERE meter = $1
                """,
                [.text(meter.slug), .text(meter.aggregation.rawValue)])
            meterRows.append(
                StatsReport.MeterRow(
                    slug: meter.slug, aggregation: meter.aggregation.rawValue, total: totals.string(row: 0, column: 0),
                    events: totals.int(row: 0, column: 1) ?? 0, subjects: totals.int(row: 0, column: 2) ?? 0))
        }
        return StatsReport(
            partitions: rows.values.sorted { $0.partition < $1.partition }, meters: meterRows,
            retentionGaps: retentionGaps, workers: try workerStatuses())
    }
}
