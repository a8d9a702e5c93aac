import Hashing
import JSON
import Postgres

/// An idempotency key already accepted: its payload hash and ledger row.
struct StoredKey {
    var payloadSHA256: [UInt8]
    var ledgerID: Int64
}

extension LedgerStore {
    /// Decides the outcome of every message of the batch, inside its transaction.
    ///
    /// Valid events are grouped by idempotency key in batch order. A key already stored makes
    /// every event of its group a duplicate (same payload hash) or a conflict (another hash).
    /// Otherwise the group's first event is accepted and claims the key, and the rest compare
    /// against it. A claim that loses to a concurrent transaction turns into a stored key.
    ///
    /// With `reclaimOrphanedKeys`, a stored key whose ledger row was deleted is released first
    /// and then claimed again like a new key. When the event that claims it again has the
    /// same payload, the duplicates and dead letters that referred to the deleted row are
    /// moved over to the new one.
    func classify(
        _ messages: [ValidatedMessage], now: EventTime, limits: ValidationLimits, reclaimOrphanedKeys: Bool = false
    ) throws -> [MessageOutcome] {
        var outcomes = [MessageOutcome?](repeating: nil, count: messages.count)
        var groups: [EventKey: [Int]] = [:]
        var keyOrder: [EventKey] = []
        var events: [Int: AcceptedEvent] = [:]

        for (index, validated) in messages.enumerated() {
            switch validated.outcome {
            case .rejected(let rejection):
                outcomes[index] = .deadLetter(rejection)
            case .accepted(let event):
                events[index] = event
                if groups[event.key] == nil { keyOrder.append(event.key) }
                groups[event.key, default: []].append(index)
            }
        }
        guard !keyOrder.isEmpty else { return outcomes.map { $0! } }

        let lookup = dedupePeriods.lookupRange(now: now, limits: limits)
        var stored = try storedKeys(keyOrder, periods: lookup)
        var released: [EventKey: StoredKey] = [:]
        if reclaimOrphanedKeys {
            for key in try releaseOrphanedKeys(stored) {
                released[key] = stored[key]
                stored[key] = nil
            }
        }

        let newKeys = keyOrder.filter { stored[$0] == nil }.sorted()
        var newLedgerIDs: [EventKey: Int64] = [:]
        if !newKeys.isEmpty {
            let ids = try allocateLedgerIDs(newKeys.count)
            for (key, id) in zip(newKeys, ids) { newLedgerIDs[key] = id }

            let claimPeriods = dedupePeriods.claimPeriods(now: now)
            let lost = try claim(newKeys, periods: claimPeriods, ledgerIDs: newLedgerIDs) { key in
                events[groups[key]![0]]!.payloadSHA256
            }
            if !lost.isEmpty {
                for key in lost { newLedgerIDs[key] = nil }
                let winners = try storedKeys(lost, periods: lookup)
                guard winners.count == lost.count else {
                    // The competing claim was rolled back after ours waited on it; a retry settles it.
                    throw PostgresError(
                        kind: .statementFailed, sqlState: "40001",
                        message: "an idempotency key claim lost to a transaction that did not commit",
                        operation: "claim keys")
                }
                stored.merge(winners) { first, _ in first }
            }
        }

        for key in keyOrder {
            let indices = groups[key]!
            let original: StoredKey
            var remaining = indices[...]
            if let existing = stored[key] {
                original = existing
            } else {
                let first = indices[0]
                let ledgerID = newLedgerIDs[key]!
                outcomes[first] = .accepted(ledgerID: ledgerID)
                original = StoredKey(payloadSHA256: events[first]!.payloadSHA256, ledgerID: ledgerID)
                remaining = remaining.dropFirst()
            }
            for index in remaining {
                if events[index]!.payloadSHA256 == original.payloadSHA256 {
                    outcomes[index] = .duplicate(originalLedgerID: original.ledgerID)
                } else {
                    let detail =
                        "event \(key) was accepted before as ledger row \(original.ledgerID) with another payload (sha256 \(original.payloadSHA256.hexString))"
                    outcomes[index] = .deadLetter(
                        Rejection(.duplicateIDConflict, detail, eventKey: key, originalLedgerID: original.ledgerID))
                }
            }
        }
        if !released.isEmpty {
            try repointReferences(released: released, newLedgerIDs: newLedgerIDs, events: events, groups: groups)
        }
        return outcomes.map { $0! }
    }

    /// Moves the duplicates and dead letters that referred to the deleted ledger row of a
    /// released key over to the row that now holds the same payload under that key. A key
    /// re-accepted with another payload keeps the old references, which `tally reconcile`
    /// then reports as pointing at a missing ledger row.
    private func repointReferences(
        released: [EventKey: StoredKey], newLedgerIDs: [EventKey: Int64], events: [Int: AcceptedEvent],
        groups: [EventKey: [Int]]
    ) throws(PostgresError) {
        let writer = JSONWriter()
        writer.beginArray()
        var count = 0
        for (key, old) in released.sorted(by: { $0.key < $1.key }) {
            guard let newID = newLedgerIDs[key], let first = groups[key]?.first,
                events[first]?.payloadSHA256 == old.payloadSHA256
            else { continue }
            writer.beginObject()
            writer.field("old_id", old.ledgerID)
            writer.field("new_id", newID)
            writer.endObject()
            count += 1
        }
        writer.endArray()
        guard count > 0 else { return }
        try connection.execute(
            """
            UPDATE \(schema).duplicates d SET original_ledger_id = m.new_id
            FROM json_to_recordset($1::json) AS m(old_id bigint, new_id bigint)
            WHERE d.original_ledger_id = m.old_id
            """,
            [.text(writer.text)])
        try connection.execute(
            """
            UPDATE \(schema).dead_letters d SET
                original_ledger_id = CASE WHEN d.original_ledger_id = m.old_id THEN m.new_id ELSE d.original_ledger_id END,
                resolved_ledger_id = CASE WHEN d.resolved_ledger_id = m.old_id THEN m.new_id ELSE d.resolved_ledger_id END
            FROM json_to_recordset($1::json) AS m(old_id bigint, new_id bigint)
            WHERE d.original_ledger_id = m.old_id OR d.resolved_ledger_id = m.old_id
            """,
            [.text(writer.text)])
    }

    /// Returns the stored keys among `keys` whose ledger row no longer exists.
    func orphanedKeys(_ keys: [EventKey], now: EventTime, limits: ValidationLimits) throws(PostgresError) -> [EventKey:
        StoredKey]
    {
        guard !keys.isEmpty else { return [:] }
        let stored = try storedKeys(keys, periods: dedupePeriods.lookupRange(now: now, limits: limits))
        guard !stored.isEmpty else { return [:] }
        let ids = Set(stored.values.map(\.ledgerID))
        let existing = try connection.execute(
            "SELECT id FROM \(schema).ledger WHERE id = ANY($1::bigint[])",
            [.text("{" + ids.sorted().map(String.init).joined(separator: ",") + "}")])
        let found = Set((0..<existing.rowCount).map { existing.int(row: $0, column: 0)! })
        return stored.filter { !found.contains($0.value.ledgerID) }
    }

    /// Looks up which of `keys` are stored in the partitions of `periods`.
    private func storedKeys(_ keys: [EventKey], periods: ClosedRange<Int64>) throws(PostgresError) -> [EventKey:
        StoredKey]
    {
        let writer = JSONWriter()
        writer.beginArray()
        for key in keys {
            writer.beginObject()
            writer.field("source", key.source.string)
            writer.field("event_id", key.id.string)
            writer.endObject()
        }
        writer.endArray()
        let result = try connection.execute(
            """
            SELECT DISTINCT ON (k.source, k.event_id) k.source, k.event_id, encode(k.payload_sha256, 'hex'), k.ledger_id
            FROM json_to_recordset($1::json) AS b(source text, event_id text)
            JOIN \(schema).dedupe_keys k
              ON k.source = b.source COLLATE "C" AND k.event_id = b.event_id COLLATE "C"
            WHERE k.period BETWEEN $2 AND $3
            ORDER BY k.source, k.event_id, k.period
            """,
            [.text(writer.text), .text(String(periods.lowerBound)), .text(String(periods.upperBound))])
        var stored: [EventKey: StoredKey] = [:]
        for row in 0..<result.rowCount {
            let key = EventKey(source: result.string(row: row, column: 0)!, id: result.string(row: row, column: 1)!)
            stored[key] = StoredKey(
                payloadSHA256: bytes(fromHex: result.string(row: row, column: 2)!),
                ledgerID: result.int(row: row, column: 3)!)
        }
        return stored
    }

    /// Deletes the claims of stored keys whose ledger row no longer exists, and returns those
    /// keys. Locks the claims first, so that a concurrent claim of the same key waits.
    private func releaseOrphanedKeys(_ stored: [EventKey: StoredKey]) throws(PostgresError) -> [EventKey] {
        guard !stored.isEmpty else { return [] }
        let writer = JSONWriter()
        writer.beginArray()
        for (key, value) in stored.sorted(by: { $0.key < $1.key }) {
            writer.beginObject()
            writer.field("source", key.source.string)
            writer.field("event_id", key.id.string)
            writer.field("ledger_id", value.ledgerID)
            writer.endObject()
        }
        writer.endArray()
        let result = try connection.execute(
            """
            DELETE FROM \(schema).dedupe_keys k
            USING json_to_recordset($1::json) AS d(source text, event_id text, ledger_id bigint)
            WHERE k.source = d.source COLLATE "C" AND k.event_id = d.event_id COLLATE "C" AND k.ledger_id = d.ledger_id
              AND NOT EXISTS (SELECT FROM \(schema).ledger l WHERE l.id = d.ledger_id)
            RETURNING k.source, k.event_id
            """,
            [.text(writer.text)])
        var released = Set<EventKey>()
        for row in 0..<result.rowCount {
            released.insert(
                EventKey(source: result.string(row: row, column: 0)!, id: result.string(row: row, column: 1)!))
        }
        return released.sorted()
    }

    private func allocateLedgerIDs(_ count: Int) throws(PostgresError) -> [Int64] {
        let result = try connection.execute(
            "SELECT nextval($1::regclass) FROM generate_series(1, $2)",
            [.text("\(schema).ledger_id_seq"), .text(String(count))])
        return (0..<result.rowCount).map { result.int(row: $0, column: 0)! }
    }

    /// Inserts a claim row for each key in each period, in key order so that concurrent batches
    /// wait on each other instead of deadlocking. Returns the keys that another transaction
    /// claimed first; their rows from this batch are removed again.
    private func claim(
        _ keys: [EventKey], periods: [Int64], ledgerIDs: [EventKey: Int64], payloadHash: (EventKey) -> [UInt8]
    ) throws(PostgresError) -> [EventKey] {
        let writer = JSONWriter()
        writer.beginArray()
        for key in keys {
            let hash = payloadHash(key).hexString
            for period in periods {
                writer.beginObject()
                writer.field("period", period)
                writer.field("source", key.source.string)
                writer.field("event_id", key.id.string)
                writer.field("sha", hash)
                writer.field("ledger_id", ledgerIDs[key]!)
                writer.endObject()
            }
        }
        writer.endArray()
        let result = try connection.execute(
            """
            INSERT INTO \(schema).dedupe_keys (period, source, event_id, payload_sha256, ledger_id)
            SELECT c.period, c.source, c.event_id, decode(c.sha, 'hex'), c.ledger_id
            FROM json_to_recordset($1::json) AS c(period integer, source text, event_id text, sha text, ledger_id bigint)
            ORDER BY c.source COLLATE "C", c.event_id COLLATE "C", c.period
            ON CONFLICT DO NOTHING
            RETURNING source, event_id
            """,
            [.text(writer.text)])

        var claimedRows: [EventKey: Int] = [:]
        for row in 0..<result.rowCount {
            let key = EventKey(source: result.string(row: row, column: 0)!, id: result.string(row: row, column: 1)!)
            claimedRows[key, default: 0] += 1
        }
        let lost = keys.filter { claimedRows[$0, default: 0] < periods.count }
        let partial = lost.filter { claimedRows[$0] != nil }
        if !partial.isEmpty {
            writer.reset()
            writer.beginArray()
            for key in partial {
                writer.beginObject()
                writer.field("source", key.source.string)
                writer.field("event_id", key.id.string)
                writer.field("ledger_id", ledgerIDs[key]!)
                writer.endObject()
            }
            writer.endArray()
            try connection.execute(
                """
                DELETE FROM \(schema).dedupe_keys k
                USING json_to_recordset($1::json) AS d(source text, event_id text, ledger_id bigint)
                WHERE k.source = d.source COLLATE "C" AND k.event_id = d.event_id COLLATE "C" AND k.ledger_id = d.ledger_id
                """,
                [.text(writer.text)])
        }
        return lost
    }
}

/// Decodes lowercase or uppercase hexadecimal text.
func bytes(fromHex text: String) -> [UInt8] {
    var result: [UInt8] = []
    result.reserveCapacity(text.utf8.count / 2)
    var high: UInt8?
    for character in text.utf8 {
        let value: UInt8
        switch character {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): value = character - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): value = character - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): value = character - UInt8(ascii: "A") + 10
        default: preconditionFailure("not hexadecimal: \(text)")
        }
        if let first = high {
            result.append(first << 4 | value)
            high = nil
        } else {
            high = value
        }
    }
    return result
}
