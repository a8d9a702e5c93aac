import Foundation
import JSON
import Kafka
import Postgres

/// A selection of dead letters for a list or a replay.
public struct DeadLetterFilter: Sendable {
    public var reasons: [String] = []
    public var topic: String?
    public var partitions: [Int32] = []
    /// Dead letters received at or after this time.
    public var receivedFrom: EventTime?
    /// Dead letters received before this time.
    public var receivedTo: EventTime?
    /// Lists resolved dead letters too. Replay always skips them.
    public var includeResolved = false

    public init() {}
}

/// A dead letter as `tally dead-letters list` shows it.
public struct DeadLetterSummary: Sendable {
    public var id: Int64
    public var reason: String
    public var detail: String
    public var partition: PartitionID
    public var offset: Int64
    public var receivedAt: String
    public var valueBytes: Int64?
    public var resolvedLedgerID: Int64?
    public var replayCount: Int64
}

/// A dead letter with its raw bytes.
public struct DeadLetterDetail: Sendable {
    public var summary: DeadLetterSummary
    public var key: [UInt8]?
    /// Nil for a tombstone.
    public var value: [UInt8]?
    public var headers: String
    public var kafkaTimestamp: String?
}

/// The counts of one replay.
public struct ReplaySummary: Sendable, Equatable {
    /// Dead letters whose event is now in the ledger as a new row.
    public var accepted = 0
    /// Dead letters whose event was accepted before at another offset.
    public var duplicates = 0
    /// Dead letters that still fail, by their new reason.
    public var stillFailing: [String: Int] = [:]

    public init() {}

    public var resolved: Int { accepted + duplicates }
}

extension LedgerStore {
    public func deadLetters(_ filter: DeadLetterFilter, limit: Int) throws(PostgresError) -> [DeadLetterSummary] {
        let result = try connection.execute(
            """
            SELECT id, reason, detail, kafka_topic, kafka_partition, kafka_offset,
                   to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   length(message_value), resolved_ledger_id, replay_count
            FROM \(schema).dead_letters
            WHERE \(Self.filterCondition)
            ORDER BY id
            LIMIT $7
            """,
            filterParameters(filter) + [.text(String(limit))])
        return (0..<result.rowCount).map { summary(result, row: $0) }
    }

    public func deadLetter(id: Int64) throws(PostgresError) -> DeadLetterDetail? {
        let result = try connection.execute(
            """
            SELECT id, reason, detail, kafka_topic, kafka_partition, kafka_offset,
                   to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                   length(message_value), resolved_ledger_id, replay_count,
                   encode(message_key, 'hex'), encode(message_value, 'hex'), headers::text,
                   to_char(kafka_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
            FROM \(schema).dead_letters WHERE id = $1
            """,
            [.text(String(id))])
        guard result.rowCount == 1 else { return nil }
        return DeadLetterDetail(
            summary: summary(result, row: 0), key: result.string(row: 0, column: 10).map(bytes(fromHex:)),
            value: result.string(row: 0, column: 11).map(bytes(fromHex:)), headers: result.string(row: 0, column: 12)!,
            kafkaTimestamp: result.string(row: 0, column: 13))
    }

    /// Re-drives the unresolved dead letters that match `filter` through `validator` and the
    /// worker's outcome step, `batchSize` at a time, each batch in one transaction.
    ///
    /// An event that passes now gets its ledger row (or, when its key was accepted before, a
    /// row in `duplicates`) at the dead letter's Kafka coordinates, and the dead letter is
    /// marked resolved with a link to that ledger row. An event that still fails keeps its
    /// dead letter with the new reason. Resolved dead letters are never taken again, so a
    /// second replay adds nothing.
    ///
    /// Replay never claims an idempotency key again whose ledger row was deleted. Such a dead
    /// letter stays unresolved: as `duplicate_id_conflict` when its payload differs from the
    /// original's, and with its old reason when it is an exact copy. Its detail names the
    /// missing row and the fix: `tally backfill` over the original's offsets, then a replay.
    ///
    /// NOTE: an event that PostgreSQL rejects again (SQLSTATE class 22 or 54, the dead letters
    /// `storage_rejected`) fails its whole replay batch, and the replay stops with that error.
    /// Exclude that reason from the filter. It is not isolated one message at a time as in
    /// the worker and in backfill.
    ///
    /// NOTE: a replay does not change the per-partition counters in `partition_offsets` and
    /// `dead_letter_counts`, which count what the live workers decided. `tally reconcile`
    /// counts from the rows instead.
    public func replayDeadLetters(
        _ filter: DeadLetterFilter, validator: EventValidator, now: EventTime, batchSize: Int = 500
    ) throws -> ReplaySummary {
        try ensureDedupePartitions(now: now, limits: validator.limits)
        var summary = ReplaySummary()
        var afterID: Int64 = 0
        while true {
            try connection.execute("BEGIN")
            do {
                let (lastID, batch) = try replayBatch(
                    filter, afterID: afterID, validator: validator, now: now, batchSize: batchSize)
                try connection.execute("COMMIT")
                guard let lastID else { return summary }
                afterID = lastID
                summary.accepted += batch.accepted
                summary.duplicates += batch.duplicates
                summary.stillFailing.merge(batch.stillFailing, uniquingKeysWith: +)
            } catch {
                rollbackQuietly()
                throw error
            }
        }
    }

    private func replayBatch(
        _ filter: DeadLetterFilter, afterID: Int64, validator: EventValidator, now: EventTime, batchSize: Int
    ) throws -> (Int64?, ReplaySummary) {
        let rows = try connection.execute(
            """
            SELECT id, kafka_topic, kafka_partition, kafka_offset,
                   (extract(epoch FROM kafka_timestamp) * 1000)::bigint,
                   encode(message_key, 'hex'), encode(message_value, 'hex'), reason
            FROM \(schema).dead_letters
            WHERE \(Self.filterCondition) AND resolved_at IS NULL AND id > $8
            ORDER BY id
            LIMIT $7
            FOR UPDATE
            """,
            filterParameters(filter) + [.text(String(batchSize)), .text(String(afterID))])
        guard rows.rowCount > 0 else { return (nil, ReplaySummary()) }

        var ids: [Int64] = []
        var reasons: [String] = []
        var messages: [ValidatedMessage] = []
        for row in 0..<rows.rowCount {
            ids.append(rows.int(row: row, column: 0)!)
            reasons.append(rows.string(row: row, column: 7)!)
            let message = KafkaMessage(
                topic: rows.string(row: row, column: 1)!, partition: Int32(rows.int(row: row, column: 2)!),
                offset: rows.int(row: row, column: 3)!, key: rows.string(row: row, column: 5).map(bytes(fromHex:)),
                value: rows.string(row: row, column: 6).map(bytes(fromHex:)),
                timestampMilliseconds: rows.int(row: row, column: 4))
            messages.append(ValidatedMessage(message: message, outcome: validator.validate(message.value, now: now)))
        }
        // A dead letter whose idempotency key was accepted before, but whose original ledger
        // row is gone, stays a dead letter: accepting it would put a later event (such as a
        // resend with another payload) in the place of the original. A backfill over the
        // original's offsets restores that row first.
        let keys = messages.compactMap { validated -> EventKey? in
            if case .accepted(let event) = validated.outcome { return event.key }
            return nil
        }
        let orphaned = try orphanedKeys(keys, now: now, limits: validator.limits)
        var outcomes = [MessageOutcome?](repeating: nil, count: messages.count)
        var writable: [Int] = []
        for (index, validated) in messages.enumerated() {
            guard case .accepted(let event) = validated.outcome, let original = orphaned[event.key] else {
                writable.append(index)
                continue
            }
            // A conflict stays duplicate_id_conflict. An exact copy of the original keeps its
            // reason, because it conflicts with nothing.
            let isSamePayload = event.payloadSHA256 == original.payloadSHA256
            let reason =
                isSamePayload ? RejectionReason(rawValue: reasons[index]) ?? .duplicateIDConflict : .duplicateIDConflict
            let relation =
                isSamePayload
                ? "with the same payload" : "with another payload (sha256 \(original.payloadSHA256.hexString))"
            let detail =
                "event \(event.key) was accepted before \(relation) as ledger row \(original.ledgerID), which no longer exists; run tally backfill over the original event's offsets first, then replay this dead letter"
            outcomes[index] = .deadLetter(
                Rejection(reason, detail, eventKey: event.key, originalLedgerID: original.ledgerID))
        }
        let written = try writeOutcomes(
            writable.map { messages[$0] }, now: now, limits: validator.limits,
            options: OutcomeOptions(insertsDeadLetters: false))
        for (index, outcome) in zip(writable, written) { outcomes[index] = outcome }

        var summary = ReplaySummary()
        let writer = JSONWriter()
        writer.beginArray()
        for (index, outcome) in outcomes.map({ $0! }).enumerated() {
            writer.beginObject()
            writer.field("id", ids[index])
            switch outcome {
            case .accepted(let ledgerID):
                summary.accepted += 1
                writer.field("resolved_ledger_id", ledgerID)
            case .duplicate(let originalID):
                summary.duplicates += 1
                writer.field("resolved_ledger_id", originalID)
            case .deadLetter(let rejection):
                summary.stillFailing[rejection.reason.rawValue, default: 0] += 1
                writer.field("reason", rejection.reason.rawValue)
                writer.field("detail", rejection.detail.replacingNULCharacters())
                writer.field("event_source", rejection.eventKey?.source.string)
                writer.field("event_id", rejection.eventKey?.id.string)
                writer.field("original_ledger_id", rejection.originalLedgerID)
            }
            writer.endObject()
        }
        writer.endArray()
        try connection.execute(
            """
            UPDATE \(schema).dead_letters d SET
                resolved_ledger_id = r.resolved_ledger_id,
                resolved_at = CASE WHEN r.resolved_ledger_id IS NOT NULL THEN now() END,
                reason = coalesce(r.reason, d.reason),
                detail = coalesce(r.detail, d.detail),
                event_source = CASE WHEN r.reason IS NOT NULL THEN r.event_source ELSE d.event_source END,
                event_id = CASE WHEN r.reason IS NOT NULL THEN r.event_id ELSE d.event_id END,
                original_ledger_id = CASE WHEN r.reason IS NOT NULL THEN r.original_ledger_id ELSE d.original_ledger_id END,
                replay_count = d.replay_count + 1,
                last_replayed_at = now()
            FROM json_to_recordset($1::json) AS r(
                id bigint, resolved_ledger_id bigint, reason text, detail text, event_source text, event_id text,
                original_ledger_id bigint)
            WHERE d.id = r.id
            """,
            [.text(writer.text)])
        return (ids.max(), summary)
    }

    /// The `WHERE` condition of a filter, over parameters $1 to $6.
    private static let filterCondition = """
        (cardinality($1::text[]) = 0 OR reason = ANY($1::text[]))
        AND ($2::text IS NULL OR kafka_topic = $2::text COLLATE "C")
        AND (cardinality($3::int[]) = 0 OR kafka_partition = ANY($3::int[]))
        AND ($4::timestamptz IS NULL OR received_at >= $4::timestamptz)
        AND ($5::timestamptz IS NULL OR received_at < $5::timestamptz)
        AND ($6::boolean OR resolved_at IS NULL)
        """

    private func filterParameters(_ filter: DeadLetterFilter) -> [PostgresParameter?] {
        [
            .text(postgresArray(filter.reasons)), filter.topic.map { .text($0) },
            .text("{" + filter.partitions.map(String.init).joined(separator: ",") + "}"),
            filter.receivedFrom.map { .text($0.rfc3339) }, filter.receivedTo.map { .text($0.rfc3339) },
            .text(filter.includeResolved ? "true" : "false"),
        ]
    }

    private func summary(_ result: PostgresResult, row: Int) -> DeadLetterSummary {
        DeadLetterSummary(
            id: result.int(row: row, column: 0)!, reason: result.string(row: row, column: 1)!,
            detail: result.string(row: row, column: 2)!,
            partition: PartitionID(
                topic: result.string(row: row, column: 3)!, partition: Int32(result.int(row: row, column: 4)!)),
            offset: result.int(row: row, column: 5)!, receivedAt: result.string(row: row, column: 6)!,
            valueBytes: result.int(row: row, column: 7), resolvedLedgerID: result.int(row: row, column: 8),
            replayCount: result.int(row: row, column: 9)!)
    }
}

/// Formats text values as a PostgreSQL array literal, each value quoted and escaped.
func postgresArray(_ values: [String]) -> String {
    let quoted = values.map { value in
        "\"" + value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
    }
    return "{" + quoted.joined(separator: ",") + "}"
}

extension String {
    /// Replaces U+0000, which PostgreSQL text cannot store.
    func replacingNULCharacters() -> String {
        String(String.UnicodeScalarView(unicodeScalars.map { $0 == "\u{0}" ? "\u{FFFD}" : $0 }))
    }
}
