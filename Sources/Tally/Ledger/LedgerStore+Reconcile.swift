import Kafka
import Postgres

/// The reconciliation of one partition: Kafka's view, the outcome rows and the batch chain.
public struct PartitionReconciliation: Sendable {
    public var partition: PartitionID
    public var firstOffset: Int64
    public var storedOffset: Int64
    /// The log start and end, when Kafka was asked.
    public var watermarks: KafkaWatermarks?
    public var accepted: Int64 = 0
    public var duplicates: Int64 = 0
    /// Unresolved dead letters; a resolved one is counted by its ledger or duplicate row.
    public var deadLetters: Int64 = 0
    /// Offsets recorded as carrying no message.
    public var gapOffsets: Int64 = 0
    /// Offset ranges below the stored offset without an outcome, inclusive.
    public var missing: [ClosedRange<Int64>] = []
    /// Offset ranges with more than one outcome, inclusive.
    public var doubled: [ClosedRange<Int64>] = []
    /// Holes and overlaps in the chain of live batch records.
    public var batchProblems: [String] = []

    public var lag: Int64? { watermarks.map { max(0, $0.high - storedOffset) } }
    public var expected: Int64 { storedOffset - firstOffset }
    public var processed: Int64 { accepted + duplicates + deadLetters + gapOffsets }
    /// The stored offset is past the log end, as after the topic was re-created.
    public var isBeyondLogEnd: Bool { watermarks.map { storedOffset > $0.high } ?? false }

    public var passes: Bool {
        missing.isEmpty && doubled.isEmpty && batchProblems.isEmpty && processed == expected && !isBeyondLogEnd
    }
}

/// A per-minute rollup that differs from the sum of its ledger rows. Nil sides are missing.
public struct RollupDifference: Sendable {
    public var meter: String
    public var subject: String
    public var groups: String
    public var minute: String
    public var stored: String?
    public var fromLedger: String?
}

public struct ReconcileReport: Sendable {
    public var partitions: [PartitionReconciliation] = []
    public var rollupFrom: EventTime
    public var rollupTo: EventTime
    public var rollupRowsChecked = 0
    /// The first differences, at most 100.
    public var rollupDifferences: [RollupDifference] = []
    public var rollupDifferenceCount = 0
    /// Unresolved dead letters duplicate_id_conflict and too_late: reported, not failures.
    public var conflicts: Int64 = 0
    public var tooLate: Int64 = 0
    /// Duplicates whose original ledger row no longer exists: their event is not counted.
    public var duplicatesWithoutOriginal: Int64 = 0
    /// Dead letters whose original or resolving ledger row no longer exists.
    public var deadLettersWithoutOriginal: Int64 = 0

    public var passes: Bool {
        partitions.allSatisfy(\.passes) && rollupDifferenceCount == 0 && duplicatesWithoutOriginal == 0
            && deadLettersWithoutOriginal == 0
    }
}

extension LedgerStore {
    /// Checks that every offset below each stored offset has exactly one outcome, that the live
    /// batch records chain from the first to the stored offset, and that the rollups of the
    /// minutes in `[from, to)` equal the ledger. Reads in one repeatable-read transaction, so
    /// the checks see one snapshot while workers write.
    public func reconcile(from: EventTime, to: EventTime) throws -> ReconcileReport {
        var report = ReconcileReport(rollupFrom: from.minute, rollupTo: to)
        try connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        defer { rollbackQuietly() }

        let stored = try connection.execute(
            "SELECT topic, partition, first_offset, next_offset FROM \(schema).partition_offsets ORDER BY topic, partition"
        )
        var index: [PartitionID: Int] = [:]
        for row in 0..<stored.rowCount {
            let partition = PartitionID(
                topic: stored.string(row: row, column: 0)!, partition: Int32(stored.int(row: row, column: 1)!))
            index[partition] = report.partitions.count
            report.partitions.append(
                PartitionReconciliation(
                    partition: partition, firstOffset: stored.int(row: row, column: 2)!,
                    storedOffset: stored.int(row: row, column: 3)!))
        }
        func at(_ result: PostgresResult, _ row: Int) -> Int? {
            index[
                PartitionID(
                    topic: result.string(row: row, column: 0)!, partition: Int32(result.int(row: row, column: 1)!))]
        }

        let counts = try connection.execute(
            """
            WITH \(outcomesCTE)
            SELECT topic, partition, kind, sum(last - first + 1) FROM outcomes GROUP BY 1, 2, 3
            """)
        for row in 0..<counts.rowCount {
            guard let item = at(counts, row) else { continue }
            let count = counts.int(row: row, column: 3)!
            switch counts.string(row: row, column: 2)! {
            case "ledger": report.partitions[item].accepted = count
            case "duplicate": report.partitions[item].duplicates = count
            case "dead_letter": report.partitions[item].deadLetters = count
            default: report.partitions[item].gapOffsets = count
            }
        }

        let problems = try connection.execute(
            """
            WITH \(outcomesCTE),
            ordered AS (
                SELECT o.*, max(o.last) OVER (
                    PARTITION BY o.topic, o.partition ORDER BY o.first, o.last
                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS previous_last
                FROM outcomes o
            ), ends AS (
                SELECT topic, partition, max(last) AS last FROM outcomes GROUP BY 1, 2
            )
            SELECT o.topic, o.partition, 'missing', coalesce(o.previous_last, p.first_offset - 1) + 1, o.first - 1
            FROM ordered o JOIN \(schema).partition_offsets p ON p.topic = o.topic AND p.partition = o.partition
            WHERE o.first > coalesce(o.previous_last, p.first_offset - 1) + 1
            UNION ALL
            SELECT o.topic, o.partition, 'doubled', o.first, least(o.last, o.previous_last)
            FROM ordered o WHERE o.first <= o.previous_last
            UNION ALL
            SELECT p.topic, p.partition, 'missing', coalesce(e.last, p.first_offset - 1) + 1, p.next_offset - 1
            FROM \(schema).partition_offsets p LEFT JOIN ends e ON e.topic = p.topic AND e.partition = p.partition
            WHERE coalesce(e.last, p.first_offset - 1) < p.next_offset - 1
            ORDER BY 1, 2, 4
            LIMIT 10000
            """)
        for row in 0..<problems.rowCount {
            guard let item = at(problems, row) else { continue }
            let range = problems.int(row: row, column: 3)!...problems.int(row: row, column: 4)!
            if problems.string(row: row, column: 2) == "missing" {
                report.partitions[item].missing.append(range)
            } else {
                report.partitions[item].doubled.append(range)
            }
        }

        try checkBatchChains(&report, index: index)
        try compareRollups(&report)

        let notes = try connection.execute(
            """
            SELECT count(*) FILTER (WHERE reason = 'duplicate_id_conflict'), count(*) FILTER (WHERE reason = 'too_late')
            FROM \(schema).dead_letters WHERE resolved_at IS NULL
            """)
        report.conflicts = notes.int(row: 0, column: 0)!
        report.tooLate = notes.int(row: 0, column: 1)!

        let dangling = try connection.execute(
            """
            SELECT (SELECT count(*) FROM \(schema).duplicates d
                    WHERE NOT EXISTS (SELECT FROM \(schema).ledger l WHERE l.id = d.original_ledger_id)),
                   (SELECT count(*) FROM \(schema).dead_letters d
                    WHERE (d.original_ledger_id IS NOT NULL
                           AND NOT EXISTS (SELECT FROM \(schema).ledger l WHERE l.id = d.original_ledger_id))
                       OR (d.resolved_ledger_id IS NOT NULL
                           AND NOT EXISTS (SELECT FROM \(schema).ledger l WHERE l.id = d.resolved_ledger_id)))
            """)
        report.duplicatesWithoutOriginal = dangling.int(row: 0, column: 0)!
        report.deadLettersWithoutOriginal = dangling.int(row: 0, column: 1)!
        return report
    }

    /// Every outcome row below its partition's stored offset as an inclusive offset range:
    /// ledger rows, duplicates, unresolved dead letters and recorded gaps.
    private var outcomesCTE: String {
        """
        outcomes AS (
            SELECT x.* FROM (
                SELECT kafka_topic AS topic, kafka_partition AS partition, kafka_offset AS first, kafka_offset AS last,
                       'ledger' AS kind
                FROM \(schema).ledger
                UNION ALL
                SELECT kafka_topic, kafka_partition, kafka_offset, kafka_offset, 'duplicate' FROM \(schema).duplicates
                UNION ALL
                SELECT kafka_topic, kafka_partition, kafka_offset, kafka_offset, 'dead_letter'
                FROM \(schema).dead_letters WHERE resolved_at IS NULL
                UNION ALL
                SELECT topic, partition, from_offset, to_offset, 'gap' FROM \(schema).offset_gaps
            ) x
            JOIN \(schema).partition_offsets p ON p.topic = x.topic AND p.partition = x.partition
            WHERE x.first >= p.first_offset AND x.last < p.next_offset
        )
        """
    }

    private func checkBatchChains(_ report: inout ReconcileReport, index: [PartitionID: Int]) throws(PostgresError) {
        let chain = try connection.execute(
            """
            WITH live AS (
                SELECT topic, partition, from_offset, next_offset,
                       lag(next_offset) OVER (PARTITION BY topic, partition ORDER BY from_offset, id) AS previous_next
                FROM \(schema).batches WHERE backfill_run IS NULL
            )
            SELECT topic, partition, from_offset, next_offset, previous_next FROM live
            WHERE previous_next IS NOT NULL AND previous_next <> from_offset
            ORDER BY 1, 2, 3
            LIMIT 1000
            """)
        for row in 0..<chain.rowCount {
            let partition = PartitionID(
                topic: chain.string(row: row, column: 0)!, partition: Int32(chain.int(row: row, column: 1)!))
            guard let item = index[partition] else { continue }
            let from = chain.int(row: row, column: 2)!
            let previous = chain.int(row: row, column: 4)!
            report.partitions[item].batchProblems.append(
                from > previous
                    ? "no batch record covers offsets \(previous)-\(from - 1)"
                    : "batch records overlap at offsets \(from)-\(previous - 1)")
        }

        let ends = try connection.execute(
            """
            SELECT p.topic, p.partition, min(b.from_offset), max(b.next_offset)
            FROM \(schema).partition_offsets p
            LEFT JOIN \(schema).batches b
              ON b.topic = p.topic AND b.partition = p.partition AND b.backfill_run IS NULL
            GROUP BY 1, 2
            """)
        for row in 0..<ends.rowCount {
            let partition = PartitionID(
                topic: ends.string(row: row, column: 0)!, partition: Int32(ends.int(row: row, column: 1)!))
            guard let item = index[partition] else { continue }
            let range = report.partitions[item]
            let first = ends.int(row: row, column: 2)
            let last = ends.int(row: row, column: 3)
            if range.storedOffset > range.firstOffset, first == nil {
                report.partitions[item].batchProblems.append(
                    "no batch records for offsets \(range.firstOffset)-\(range.storedOffset - 1)")
                continue
            }
            if let first, first != range.firstOffset {
                report.partitions[item].batchProblems.append(
                    "the first batch record starts at \(first), not at the first offset \(range.firstOffset)")
            }
            if let last, last != range.storedOffset {
                report.partitions[item].batchProblems.append(
                    "the last batch record ends at \(last), not at the stored offset \(range.storedOffset)")
            }
        }
    }

    private func compareRollups(_ report: inout ReconcileReport) throws(PostgresError) {
        let result = try connection.execute(
            """
            WITH from_ledger AS (
                SELECT m.key AS meter, l.subject, m.value -> 'groups' AS groups,
                       date_trunc('minute', l.event_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS minute,
                       count(*) AS event_count, sum((m.value ->> 'quantity')::numeric) AS sum,
                       min((m.value ->> 'quantity')::numeric) AS min, max((m.value ->> 'quantity')::numeric) AS max,
                       (array_agg((m.value ->> 'quantity')::numeric ORDER BY l.event_time DESC, l.id DESC))[1] AS latest
                FROM \(schema).ledger l CROSS JOIN LATERAL jsonb_each(l.meters) AS m
                WHERE l.event_time >= $1 AND l.event_time < $2
                GROUP BY 1, 2, 3, 4
            ), stored AS (
                SELECT * FROM \(schema).rollups WHERE minute >= $1 AND minute < $2
            ), compared AS (
                SELECT coalesce(r.meter, f.meter) AS meter, coalesce(r.subject, f.subject) AS subject,
                       coalesce(r.groups, f.groups) AS groups, coalesce(r.minute, f.minute) AS minute,
                       CASE WHEN r.meter IS NOT NULL
                            THEN format('count=%s sum=%s min=%s max=%s latest=%s', r.event_count, r.sum, r.min, r.max, r.latest)
                       END AS stored,
                       CASE WHEN f.meter IS NOT NULL
                            THEN format('count=%s sum=%s min=%s max=%s latest=%s', f.event_count, f.sum, f.min, f.max, f.latest)
                       END AS from_ledger,
                       (r.meter IS NULL OR f.meter IS NULL OR r.event_count <> f.event_count OR r.sum <> f.sum
                        OR r.min <> f.min OR r.max <> f.max OR r.latest <> f.latest) AS differs
                FROM stored r
                FULL JOIN from_ledger f
                  ON f.meter = r.meter AND f.subject = r.subject AND f.groups = r.groups AND f.minute = r.minute
            )
            SELECT meter, subject, groups::text,
                   to_char(minute AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI"Z"'), stored, from_ledger,
                   count(*) OVER (), (SELECT count(*) FROM compared)
            FROM compared WHERE differs
            ORDER BY minute, meter, subject, groups
            LIMIT 100
            """,
            [.text(report.rollupFrom.rfc3339), .text(report.rollupTo.rfc3339)])
        for row in 0..<result.rowCount {
            report.rollupDifferences.append(
                RollupDifference(
                    meter: result.string(row: row, column: 0)!, subject: result.string(row: row, column: 1)!,
                    groups: result.string(row: row, column: 2)!, minute: result.string(row: row, column: 3)!,
                    stored: result.string(row: row, column: 4), fromLedger: result.string(row: row, column: 5)))
        }
        report.rollupDifferenceCount = result.rowCount > 0 ? Int(result.int(row: 0, column: 6)!) : 0
        if result.rowCount > 0 {
            report.rollupRowsChecked = Int(result.int(row: 0, column: 7)!)
        } else {
            let total = try connection.execute(
                "SELECT count(*) FROM \(schema).rollups WHERE minute >= $1 AND minute < $2",
                [.text(report.rollupFrom.rfc3339), .text(report.rollupTo.rfc3339)])
            report.rollupRowsChecked = Int(total.int(row: 0, column: 0)!)
        }
    }
}
