import JSON
import Postgres

/// The changes of one rebuild.
public struct RebuildSummary: Sendable, Equatable {
    /// Ledger rows of the meter's event type in the range.
    public var events = 0
    /// Ledger rows whose reading for the meter was added, changed or removed.
    public var changedReadings = 0
    /// Events on which the meter cannot read a value or group: they keep no reading for it.
    /// The worker would have made them dead letters invalid_value had the meter existed.
    public var unreadable = 0
    /// The ledger ids of the first unreadable events, for the report.
    public var unreadableExamples: [Int64] = []
    public var rollupRowsDeleted = 0
    public var rollupRowsWritten = 0
}

extension LedgerStore {
    /// Recomputes one meter's readings and per-minute rollups for the events of `[from, to)`
    /// from the ledger rows, in one transaction.
    ///
    /// The reading of each event is derived again from its stored `data` and attributes, so a
    /// meter added or changed after ingest gets the readings it would have had. The `meters`
    /// column of those ledger rows is updated (the only ledger column that changes after
    /// insert), and the meter's rollup rows of the range are replaced by sums of the ledger.
    ///
    /// The transaction locks `rollups` against writes (SHARE ROW EXCLUSIVE) before it reads the
    /// ledger. Readers keep reading the old rows until the commit. A live batch that writes its
    /// rollups waits for the commit, and its ledger rows, which the rebuild did not see, add
    /// their readings afterwards, so every event is counted once.
    ///
    /// `from` and `to` must be whole UTC minutes.
    public func rebuildRollups(meter: Meter, from: EventTime, to: EventTime, pageSize: Int = 5000) throws
        -> RebuildSummary
    {
        precondition(from.minute == from && to.minute == to, "rebuild ranges are whole minutes")
        let meterSet = MeterSet([meter])
        let parser = JSONParser(maxDepth: 64)
        var summary = RebuildSummary()
        let range: [PostgresParameter?] = [.text(meter.slug), .text(from.rfc3339), .text(to.rfc3339)]

        try connection.execute("BEGIN")
        do {
            try connection.execute("LOCK TABLE \(schema).rollups IN SHARE ROW EXCLUSIVE MODE")

            // Events of another type lose a reading the meter no longer takes from them.
            let dropped = try connection.execute(
                """
                UPDATE \(schema).ledger SET meters = meters - $1::text
                WHERE meters ? $1::text AND type <> $4 AND event_time >= $2 AND event_time < $3
                """,
                range + [.text(meter.eventType)])
            summary.changedReadings += dropped.affectedRows

            var afterID: Int64 = 0
            while true {
                let page = try connection.execute(
                    """
                    SELECT id, meters -> $1::text,
                           (jsonb_build_object(
                                'specversion', '1.0', 'id', event_id, 'source', source, 'type', type, 'subject', subject,
                                'time', to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
                            || attributes
                            || CASE WHEN data IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('data', data) END)::text
                    FROM \(schema).ledger
                    WHERE type = $4 AND event_time >= $2 AND event_time < $3 AND id > $5
                    ORDER BY id
                    LIMIT $6
                    """,
                    range + [.text(meter.eventType), .text(String(afterID)), .text(String(pageSize))])
                guard page.rowCount > 0 else { break }
                summary.events += page.rowCount
                afterID = page.int(row: page.rowCount - 1, column: 0)!
                summary.changedReadings += try updateReadings(
                    page, meter: meter, meterSet: meterSet, parser: parser, summary: &summary)
            }

            let deleted = try connection.execute(
                "DELETE FROM \(schema).rollups WHERE meter = $1 AND minute >= $2 AND minute < $3", range)
            summary.rollupRowsDeleted = deleted.affectedRows
            let written = try connection.execute(
                """
                INSERT INTO \(schema).rollups (
                    meter, subject, groups, minute, event_count, sum, min, max, latest, latest_time, latest_ledger_id, updated_at)
                SELECT $1, l.subject, l.meters -> $1::text -> 'groups',
                       date_trunc('minute', l.event_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                       count(*), sum((l.meters -> $1::text ->> 'quantity')::numeric),
                       min((l.meters -> $1::text ->> 'quantity')::numeric),
                       max((l.meters -> $1::text ->> 'quantity')::numeric),
                       (array_agg((l.meters -> $1::text ->> 'quantity')::numeric ORDER BY l.event_time DESC, l.id DESC))[1],
                       max(l.event_time),
                       (array_agg(l.id ORDER BY l.event_time DESC, l.id DESC))[1],
                       now()
                FROM \(schema).ledger l
                WHERE l.meters ? $1::text AND l.event_time >= $2 AND l.event_time < $3
                GROUP BY 2, 3, 4
                """,
                range)
            summary.rollupRowsWritten = written.affectedRows
            try connection.execute("COMMIT")
            return summary
        } catch {
            rollbackQuietly()
            throw error
        }
    }

    /// Derives the meter's reading of each event of a page and writes those that differ.
    private func updateReadings(
        _ page: PostgresResult, meter: Meter, meterSet: MeterSet, parser: JSONParser, summary: inout RebuildSummary
    ) throws -> Int {
        let writer = JSONWriter()
        writer.beginArray()
        var count = 0
        for row in 0..<page.rowCount {
            let id = page.int(row: row, column: 0)!
            let event = try parser.parse(Array(page.string(row: row, column: 2)!.utf8))
            writer.beginObject()
            writer.field("id", id)
            writer.key("reading")
            switch meterSet.readings(type: meter.eventType, event: event) {
            case .success(let readings) where readings.count == 1:
                let reading = readings[0]
                writer.beginObject()
                writer.field("quantity", number: reading.quantity.text)
                writer.key("groups")
                writer.beginObject()
                for group in reading.groups {
                    writer.key(group.name)
                    if let value = group.value { writer.string(value) } else { writer.null() }
                }
                writer.endObject()
                writer.endObject()
            default:
                summary.unreadable += 1
                if summary.unreadableExamples.count < 10 { summary.unreadableExamples.append(id) }
                writer.null()
            }
            writer.endObject()
            count += 1
        }
        writer.endArray()
        guard count > 0 else { return 0 }
        let updated = try connection.execute(
            """
            UPDATE \(schema).ledger l SET meters = CASE WHEN r.reading IS NULL THEN l.meters - $1::text
                                                      ELSE jsonb_set(l.meters, ARRAY[$1::text], r.reading) END
            FROM json_to_recordset($2::json) AS r(id bigint, reading jsonb)
            WHERE l.id = r.id AND (l.meters -> $1::text) IS DISTINCT FROM r.reading
            """,
            [.text(meter.slug), .text(writer.text)])
        return updated.affectedRows
    }
}
