import Hashing
import JSON
import Kafka
import Postgres

/// The rows of one batch go to PostgreSQL as a JSON array per table, read with
/// `json_to_recordset`: one parameter and one round trip per table. Numbers keep their
/// decimal text through JSON into `numeric`, and bytes travel as hexadecimal text.
extension LedgerStore {
    func insertLedgerRows(_ messages: [ValidatedMessage], outcomes: [MessageOutcome]) throws(PostgresError) {
        let rows = RowArray()
        let writer = rows.writer
        for (index, validated) in messages.enumerated() {
            guard case .accepted(let ledgerID) = outcomes[index], case .accepted(let event) = validated.outcome else {
                continue
            }
            rows.count += 1
            writer.beginObject()
            writer.field("id", ledgerID)
            writer.field("source", event.key.source.string)
            writer.field("event_id", event.key.id.string)
            writer.field("type", event.type)
            writer.field("subject", event.subject)
            writer.field("event_time", event.time.rfc3339)
            writer.key("data")
            if let data = event.data { writer.write(data) } else { writer.null() }
            writer.key("attributes")
            writer.write(.object(event.attributes))
            writer.key("meters")
            writer.beginObject()
            for reading in event.readings {
                writer.key(reading.meter)
                writer.beginObject()
                writer.field("quantity", number: reading.quantity.text)
                writer.key("groups")
                writeGroups(reading.groups, to: writer)
                writer.endObject()
            }
            writer.endObject()
            writer.field("sha", event.payloadSHA256.hexString)
            writeCoordinates(validated.message, to: writer)
            writer.endObject()
        }
        guard rows.finish() else { return }

        // `data` goes through a json column and a cast, so that a JSON string stays a string.
        try connection.execute(
            """
            INSERT INTO \(schema).ledger (
                id, source, event_id, type, subject, event_time, data, attributes, meters, payload_sha256,
                kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, ingested_at)
            SELECT r.id, r.source, r.event_id, r.type, r.subject, r.event_time, r.data::jsonb, r.attributes, r.meters,
                   decode(r.sha, 'hex'), r.topic, r.partition, r.kafka_offset, r.kafka_timestamp, now()
            FROM json_to_recordset($1::json) AS r(
                id bigint, source text, event_id text, type text, subject text, event_time timestamptz,
                data json, attributes jsonb, meters jsonb, sha text,
                topic text, partition integer, kafka_offset bigint, kafka_timestamp timestamptz)
            """,
            [.text(writer.text)])
    }

    /// Adds the batch's readings to the rollups: aggregated per rollup key first, so each row
    /// is updated once, and in key order, so concurrent batches do not deadlock.
    func upsertRollups(_ messages: [ValidatedMessage], outcomes: [MessageOutcome]) throws(PostgresError) {
        let rows = RowArray()
        let writer = rows.writer
        for (index, validated) in messages.enumerated() {
            guard case .accepted(let ledgerID) = outcomes[index], case .accepted(let event) = validated.outcome else {
                continue
            }
            let minute = event.time.minute.rfc3339
            let time = event.time.rfc3339
            for reading in event.readings {
                rows.count += 1
                writer.beginObject()
                writer.field("meter", reading.meter)
                writer.field("subject", event.subject)
                writer.key("groups")
                writeGroups(reading.groups, to: writer)
                writer.field("minute", minute)
                writer.field("quantity", number: reading.quantity.text)
                writer.field("event_time", time)
                writer.field("ledger_id", ledgerID)
                writer.endObject()
            }
        }
        guard rows.finish() else { return }

        try connection.execute(
            """
            INSERT INTO \(schema).rollups AS r (
                meter, subject, groups, minute, event_count, sum, min, max, latest, latest_time, latest_ledger_id, updated_at)
            SELECT v.meter, v.subject, v.groups, v.minute, count(*), sum(v.quantity), min(v.quantity), max(v.quantity),
                   (array_agg(v.quantity ORDER BY v.event_time DESC, v.ledger_id DESC))[1],
                   max(v.event_time),
                   (array_agg(v.ledger_id ORDER BY v.event_time DESC, v.ledger_id DESC))[1],
                   now()
            FROM json_to_recordset($1::json) AS v(
                meter text, subject text, groups jsonb, minute timestamptz, quantity numeric,
                event_time timestamptz, ledger_id bigint)
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
            """,
            [.text(writer.text)])
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
