import Postgres

/// One row of `usage(...)`, with the times in RFC 3339 UTC and the value as exact decimal text.
public struct UsageRow: Sendable, Equatable {
    public var windowStart: String
    public var windowEnd: String
    public var subject: String
    /// The group-by values as JSON text.
    public var groups: String
    public var value: String
    public var eventCount: Int64
}

/// A ledger row behind a usage figure, with its Kafka coordinates.
public struct LedgerEventRow: Sendable, Equatable {
    public var ledgerID: Int64
    public var eventTime: String
    public var source: String
    public var eventID: String
    public var type: String
    /// The meter readings as JSON text: `{"meter": {"quantity": "…", "groups": {…}}}`, with each
    /// quantity as a string of its exact decimal digits, which a JSON number parsed as a
    /// double would round.
    public var meters: String
    public var partition: PartitionID
    public var offset: Int64
}

extension LedgerStore {
    /// Returns the meters recorded in the schema, each with the group-by names of its
    /// current definition.
    public func recordedMeters() throws(PostgresError) -> [String: Set<String>] {
        let result = try connection.execute(
            """
            SELECT m.slug, g.name
            FROM \(schema).meters m LEFT JOIN LATERAL jsonb_object_keys(m.group_by) AS g(name) ON true
            """)
        var meters: [String: Set<String>] = [:]
        for row in 0..<result.rowCount {
            let slug = result.string(row: row, column: 0)!
            meters[slug, default: []].formUnion(result.string(row: row, column: 1).map { [$0] } ?? [])
        }
        return meters
    }

    /// Returns whether a stored rollup of `meter` has the group-by key `key`, as rollups
    /// written before the meter's group-by changed may have. It stops at the first match, but
    /// reads all of the meter's rollups when there is none.
    public func rollupsHaveGroupKey(meter: String, key: String) throws(PostgresError) -> Bool {
        let result = try connection.execute(
            "SELECT EXISTS (SELECT FROM \(schema).rollups WHERE meter = $1 AND groups ? $2)",
            [.text(meter), .text(key)])
        return result.string(row: 0, column: 0) == "t"
    }

    /// Returns whether `name` is a time zone of PostgreSQL's time zone database.
    public func isValidTimeZone(_ name: String) throws(PostgresError) -> Bool {
        do {
            try connection.execute("SELECT now() AT TIME ZONE $1", [.text(name)])
            return true
        } catch let error where error.sqlState == "22023" {
            return false
        }
    }

    /// Calls the schema's `usage` function. `groupKeys` nil keeps the stored groups.
    public func usage(
        meter: String, from: EventTime, to: EventTime, window: String, timeZone: String, subject: String?,
        groupKeys: [String]?
    ) throws(PostgresError) -> [UsageRow] {
        let result = try connection.execute(
            """
            SELECT to_char(window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                   to_char(window_end AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                   subject, groups::text, value::text, event_count
            FROM \(schema).usage($1, $2, $3, $4, $5, $6, $7::text[])
            """,
            [
                .text(meter), .text(from.rfc3339), .text(to.rfc3339), .text(window), .text(timeZone),
                subject.map { .text($0) }, groupKeys.map { .text(postgresArray($0)) },
            ])
        return (0..<result.rowCount).map { row in
            UsageRow(
                windowStart: result.string(row: row, column: 0)!, windowEnd: result.string(row: row, column: 1)!,
                subject: result.string(row: row, column: 2)!, groups: result.string(row: row, column: 3)!,
                value: result.string(row: row, column: 4) ?? "", eventCount: result.int(row: row, column: 5)!)
        }
    }

    /// Lists the ledger rows of one subject with an event time in `[from, to)`, oldest first,
    /// optionally only those with a reading for `meter`, at most `limit` of them.
    public func ledgerEvents(subject: String, from: EventTime, to: EventTime, meter: String?, limit: Int)
        throws(PostgresError) -> [LedgerEventRow]
    {
        let result = try connection.execute(
            """
            SELECT id, to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), source, event_id, type,
                   (SELECT coalesce(jsonb_object_agg(m.key,
                               CASE WHEN jsonb_typeof(m.value -> 'quantity') = 'number'
                                    THEN jsonb_set(m.value, '{quantity}', to_jsonb(m.value ->> 'quantity'))
                                    ELSE m.value
                               END), '{}'::jsonb)
                    FROM jsonb_each(meters) AS m)::text,
                   kafka_topic, kafka_partition, kafka_offset
            FROM \(schema).ledger
            WHERE subject = $1 AND event_time >= $2 AND event_time < $3 AND ($4::text IS NULL OR meters ? $4::text)
            ORDER BY event_time, id
            LIMIT $5
            """,
            [
                .text(subject), .text(from.rfc3339), .text(to.rfc3339), meter.map { .text($0) }, .text(String(limit)),
            ])
        return (0..<result.rowCount).map { row in
            LedgerEventRow(
                ledgerID: result.int(row: row, column: 0)!, eventTime: result.string(row: row, column: 1)!,
                source: result.string(row: row, column: 2)!, eventID: result.string(row: row, column: 3)!,
                type: result.string(row: row, column: 4)!, meters: result.string(row: row, column: 5)!,
                partition: PartitionID(
                    topic: result.string(row: row, column: 6)!, partition: Int32(result.int(row: row, column: 7)!)),
                offset: result.int(row: row, column: 8)!)
        }
    }
}
