import Hashing
import JSON
import Kafka
import Postgres

/// The rows of one batch go to PostgreSQL as one `COPY` (the ledger) or as a JSON array per
/// table, read with `json_to_recordset`: one parameter and one round trip per table. Numbers keep their
/// decimal text through JSON into `numeric`, and bytes travel as hexadecimal text.
extension LedgerStore {
    /// Inserts the accepted events with `COPY`, which PostgreSQL parses faster than a JSON
    /// array. Each row's `ingested_at` is the transaction's `now()`, as in the other tables.
    func insertLedgerRows(_ messages: [ValidatedMessage], outcomes: [MessageOutcome]) throws(PostgresError) {
        guard outcomes.contains(where: { if case .accepted = $0 { true } else { false } }) else { return }
        // COPY takes no expressions, so the transaction's time goes in as a value. The session
        // reads its own output back as the same instant.
        let transactionTime = try connection.execute("SELECT now()").string(row: 0, column: 0)!
        var rows = CopyTextRows(reservingBytes: messages.count * 640)
        let writer = JSONWriter()
        for (index, validated) in messages.enumerated() {
            guard case .accepted(let ledgerID) = outcomes[index], case .accepted(let event) = validated.outcome else {
                continue
            }
            let message = validated.message
            rows.append(ledgerID)
            rows.append(event.key.source.string)
            rows.append(event.key.id.string)
            rows.append(event.type)
            rows.append(event.subject)
            rows.append(event.time.rfc3339)
            if let data = event.data {
                writer.reset()
                writer.write(data)
                writer.withBuffer { rows.append(utf8: $0) }
            } else {
                rows.append(nil as String?)
            }
            writer.reset()
            writer.write(.object(event.attributes))
            writer.withBuffer { rows.append(utf8: $0) }
            writer.reset()
            writeMeters(event.readings, to: writer)
            writer.withBuffer { rows.append(utf8: $0) }
            rows.append(bytea: event.payloadSHA256)
            rows.append(message.topic)
            rows.append(Int64(message.partition))
            rows.append(message.offset)
            rows.append(kafkaTimestampText(message.timestampMilliseconds))
            rows.append(transactionTime)
            rows.endRow()
        }
        guard rows.rowCount > 0 else { return }

        try connection.copyIn(
            """
            COPY \(schema).ledger (
                id, source, event_id, type, subject, event_time, data, attributes, meters, payload_sha256,
                kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, ingested_at)
            FROM STDIN
            """,
            data: rows.bytes)
    }

    private func writeMeters(_ readings: [MeterReading], to writer: JSONWriter) {
        writer.beginObject()
        for reading in readings {
            writer.key(reading.meter)
            writer.beginObject()
            writer.field("quantity", number: reading.quantity.text)
            writer.key("groups")
            writeGroups(reading.groups, to: writer)
            writer.endObject()
        }
        writer.endObject()
    }

    /// Adds the batch's readings to the rollups: aggregated per rollup key first, so each row
    /// is updated once, and in key order, so concurrent batches do not deadlock.
    ///
    /// The latest reading of each key, by event time and then ledger id, is marked here, so
    /// that the aggregation in SQL needs no sort per key.
    func upsertRollups(_ messages: [ValidatedMessage], outcomes: [MessageOutcome]) throws(PostgresError) {
        var latest: [RollupKey: (time: Int64, ledgerID: Int64)] = [:]
        for (index, validated) in messages.enumerated() {
            guard case .accepted(let ledgerID) = outcomes[index], case .accepted(let event) = validated.outcome else {
                continue
            }
            let order = (time: event.time.microseconds, ledgerID: ledgerID)
            for reading in event.readings {
                let key = RollupKey(event: event, reading: reading)
                if let current = latest[key], (current.time, current.ledgerID) >= (order.time, order.ledgerID) {
                    continue
                }
                latest[key] = order
            }
        }
        guard !latest.isEmpty else { return }

        var rows = CopyTextRows(reservingBytes: latest.count * 200)
        let writer = JSONWriter()
        for (index, validated) in messages.enumerated() {
            guard case .accepted(let ledgerID) = outcomes[index], case .accepted(let event) = validated.outcome else {
                continue
            }
            let minute = event.time.minute.rfc3339
            let time = event.time.rfc3339
            for reading in event.readings {
                let isLatest = latest[RollupKey(event: event, reading: reading)]! == (event.time.microseconds, ledgerID)
                rows.append(reading.meter)
                rows.append(event.subject)
                writer.reset()
                writeGroups(reading.groups, to: writer)
                writer.withBuffer { rows.append(utf8: $0) }
                rows.append(minute)
                rows.append(reading.quantity.text)
                rows.append(time)
                rows.append(ledgerID)
                rows.append(isLatest ? "t" : "f")
                rows.endRow()
            }
        }

        // The staging table is emptied at the end of the transaction, by commit or rollback.
        try ensureRollupStagingTable()
        try connection.copyIn(
            """
            COPY pg_temp.tally_rollup_deltas (meter, subject, groups, minute, quantity, event_time, ledger_id, is_latest)
            FROM STDIN
            """,
            data: rows.bytes)
        try connection.execute(
            """
            INSERT INTO \(schema).rollups AS r (
                meter, subject, groups, minute, event_count, sum, min, max, latest, latest_time, latest_ledger_id, updated_at)
            SELECT v.meter, v.subject, v.groups, v.minute, count(*), sum(v.quantity), min(v.quantity), max(v.quantity),
                   max(v.quantity) FILTER (WHERE v.is_latest),
                   max(v.event_time),
                   max(v.ledger_id) FILTER (WHERE v.is_latest),
                   now()
            FROM pg_temp.tally_rollup_deltas v
            GROUP BY v.meter, v.subject, v.groups, v.minute
            ORDER BY v.meter COLLATE "C", v.subject COLLATE "C", v.groups, v.minute
            ON CONFLICT (meter, subject, groups, minute) DO UPDATE SET
                event_count = r.event_count + excluded.event_count,
                sum = r.sum + excluded.sum,
                min = least(r.min, excluded.min),
                max = greatest(r.max, excluded.max),
                latest = CASE WHEN (excluded.latest_time, excluded.latest_ledger_id) > (r.latest_time, r.latest_ledger_id)
                              THEN excluded.latest ELSE r.latest END,
                latest_ledger_id = CASE WHEN (excluded.latest_time, excluded.latest_ledger_id) > (r.latest_time, r.latest_ledger_id)
                              THEN excluded.latest_ledger_id ELSE r.latest_ledger_id END,
                latest_time = greatest(r.latest_time, excluded.latest_time),
                updated_at = excluded.updated_at
            """)
    }

    /// Creates this session's staging table for rollup deltas when it does not exist. It is
    /// looked up on every call, because a rollback removes it again when it was created in the
    /// rolled-back transaction. A temporary table is not written to the WAL, and `COPY` fills
    /// it faster than PostgreSQL parses a JSON array.
    private func ensureRollupStagingTable() throws(PostgresError) {
        let found = try connection.execute("SELECT to_regclass('pg_temp.tally_rollup_deltas') IS NOT NULL")
        guard found.string(row: 0, column: 0) != "t" else { return }
        try connection.execute(
            """
            CREATE TEMPORARY TABLE tally_rollup_deltas (
                meter text COLLATE "C" NOT NULL,
                subject text COLLATE "C" NOT NULL,
                groups jsonb NOT NULL,
                minute timestamptz NOT NULL,
                quantity numeric NOT NULL,
                event_time timestamptz NOT NULL,
                ledger_id bigint NOT NULL,
                is_latest boolean NOT NULL
            ) ON COMMIT DELETE ROWS
            """)
    }

    func insertDuplicates(_ messages: [ValidatedMessage], outcomes: [MessageOutcome]) throws(PostgresError) {
        let rows = RowArray()
        let writer = rows.writer
        for (index, validated) in messages.enumerated() {
            guard case .duplicate(let originalID) = outcomes[index], case .accepted(let event) = validated.outcome
            else {
                continue
            }
            rows.count += 1
            writer.beginObject()
            writer.field("source", event.key.source.string)
            writer.field("event_id", event.key.id.string)
            writer.field("original_ledger_id", originalID)
            writeCoordinates(validated.message, to: writer)
            writer.endObject()
        }
        guard rows.finish() else { return }

        try connection.execute(
            """
            INSERT INTO \(schema).duplicates (
                source, event_id, original_ledger_id, kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, received_at)
            SELECT d.source, d.event_id, d.original_ledger_id, d.topic, d.partition, d.kafka_offset, d.kafka_timestamp, now()
            FROM json_to_recordset($1::json) AS d(
                source text, event_id text, original_ledger_id bigint,
                topic text, partition integer, kafka_offset bigint, kafka_timestamp timestamptz)
            """,
            [.text(writer.text)])
    }

    /// Stores rejected messages with their raw key, value and headers. Everything taken from
    /// the message is written as bytes, so no content can make this insert fail.
    func insertDeadLetters(_ messages: [ValidatedMessage], outcomes: [MessageOutcome]) throws(PostgresError) {
        let rows = RowArray()
        let writer = rows.writer
        for (index, validated) in messages.enumerated() {
            guard case .deadLetter(let rejection) = outcomes[index] else { continue }
            let message = validated.message
            rows.count += 1
            writer.beginObject()
            writer.field("reason", rejection.reason.rawValue)
            writer.field("detail", sanitizedDetail(rejection.detail))
            writer.field("key_hex", message.key?.hexString)
            writer.field("value_hex", message.value?.hexString)
            writer.key("headers")
            writeHeaders(message.headers, to: writer)
            writer.field("event_source", rejection.eventKey?.source.string)
            writer.field("event_id", rejection.eventKey?.id.string)
            writer.field("original_ledger_id", rejection.originalLedgerID)
            writeCoordinates(message, to: writer)
            writer.endObject()
        }
        guard rows.finish() else { return }

        try connection.execute(
            """
            INSERT INTO \(schema).dead_letters (
                reason, detail, kafka_topic, kafka_partition, kafka_offset, kafka_timestamp,
                message_key, message_value, headers, event_source, event_id, original_ledger_id, received_at)
            SELECT d.reason, d.detail, d.topic, d.partition, d.kafka_offset, d.kafka_timestamp,
                   decode(d.key_hex, 'hex'), decode(d.value_hex, 'hex'), d.headers, d.event_source, d.event_id,
                   d.original_ledger_id, now()
            FROM json_to_recordset($1::json) AS d(
                reason text, detail text, key_hex text, value_hex text, headers jsonb, event_source text, event_id text,
                original_ledger_id bigint, topic text, partition integer, kafka_offset bigint, kafka_timestamp timestamptz)
            """,
            [.text(writer.text)])
    }

    private func writeCoordinates(_ message: KafkaMessage, to writer: JSONWriter) {
        writer.field("topic", message.topic)
        writer.field("partition", Int64(message.partition))
        writer.field("kafka_offset", message.offset)
        writer.field("kafka_timestamp", kafkaTimestampText(message.timestampMilliseconds))
    }

    private func writeGroups(_ groups: [(name: String, value: String?)], to writer: JSONWriter) {
        writer.beginObject()
        for group in groups {
            writer.key(group.name)
            if let value = group.value { writer.string(value) } else { writer.null() }
        }
        writer.endObject()
    }

    /// Headers as `[{"name": …, "value": …}]`. A name or value that is not UTF-8 text without
    /// U+0000 is written as `name_hex` or `value_hex` instead; a null value stays null.
    private func writeHeaders(_ headers: [KafkaHeader], to writer: JSONWriter) {
        writer.beginArray()
        for header in headers {
            writer.beginObject()
            if let name = storableText(header.name) {
                writer.field("name", name)
            } else {
                writer.field("name_hex", header.name.hexString)
            }
            if let value = header.value {
                if let text = storableText(value) {
                    writer.field("value", text)
                } else {
                    writer.field("value_hex", value.hexString)
                }
            } else {
                writer.key("value")
                writer.null()
            }
            writer.endObject()
        }
        writer.endArray()
    }
}

/// The primary key of a rollup row. Group values are in the meter's order, which is the same
/// for every reading of one meter, so comparing the values compares the `groups` objects.
private struct RollupKey: Hashable {
    var meter: String
    var subject: String
    var groupValues: [String?]
    var minuteMicroseconds: Int64

    init(event: AcceptedEvent, reading: MeterReading) {
        meter = reading.meter
        subject = event.subject
        groupValues = reading.groups.map(\.value)
        minuteMicroseconds = event.time.minute.microseconds
    }
}

/// A JSON array of table rows under construction, one object per row.
private final class RowArray {
    let writer = JSONWriter()
    /// The number of rows written; the caller counts each one.
    var count = 0

    init() {
        writer.beginArray()
    }

    /// Closes the array, and returns whether it has any row to insert.
    func finish() -> Bool {
        writer.endArray()
        return count > 0
    }
}

/// The latest Kafka timestamp that is stored: 9999-12-31T23:59:59.999Z, in milliseconds. A
/// producer may set any 64-bit CreateTime, and PostgreSQL's `timestamptz` ends in year 294276.
let latestStoredKafkaTimestamp: Int64 = 253_402_300_799_999

/// Formats a Kafka message timestamp for `timestamptz`, or returns nil when there is none or it
/// lies outside years 1970 to 9999.
func kafkaTimestampText(_ milliseconds: Int64?) -> String? {
    guard let milliseconds, (0...latestStoredKafkaTimestamp).contains(milliseconds) else { return nil }
    return EventTime(microseconds: milliseconds * 1000).rfc3339
}

/// Returns the bytes as a string when they are valid UTF-8 without U+0000, which `jsonb` can store.
func storableText(_ bytes: [UInt8]) -> String? {
    guard !bytes.contains(0), let text = String(validating: bytes, as: UTF8.self) else { return nil }
    return text
}

/// Replaces any U+0000 in a detail, because PostgreSQL text cannot store it.
private func sanitizedDetail(_ detail: String) -> String {
    detail.utf8.contains(0) ? detail.replacingNUL() : detail
}

extension String {
    fileprivate func replacingNUL() -> String {
        String(String.UnicodeScalarView(unicodeScalars.map { $0 == "\u{0}" ? "\u{FFFD}" : $0 }))
    }
}
