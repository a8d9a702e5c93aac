import Postgres

extension LedgerStore {
    var dedupePeriods: DedupePeriods { DedupePeriods(periodSeconds: dedupePeriodSeconds) }

    /// Creates the `dedupe_keys` partitions that lookups and claims at `now` need, and drops
    /// partitions that no lookup can read any more.
    ///
    /// Dropping uses the earlier of `now` and the server's clock, so a worker whose clock runs
    /// ahead never drops keys that are still inside the window. A DROP briefly takes an
    /// exclusive lock on `dedupe_keys`, which waits for batches in flight; it happens about once
    /// a period. Runs outside any batch transaction.
    public func maintainDedupePartitions(now: EventTime, limits: ValidationLimits) throws(PostgresError) {
        let periods = dedupePeriods
        let required = periods.requiredRange(now: now, limits: limits)
        var existing = try existingDedupePartitions()

        let missing = required.filter { !existing.contains($0) }
        if !missing.isEmpty {
            try inTransaction { () throws(PostgresError) in
                try connection.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    [.text("tally.dedupe_partitions:\(schemaName)")])
                for period in missing {
                    try connection.execute(
                        """
                        CREATE TABLE IF NOT EXISTS \(schema).\(partitionTableName(period))
                            PARTITION OF \(schema).dedupe_keys FOR VALUES FROM (\(period)) TO (\(period + 1))
                        """)
                }
            }
            existing.formUnion(missing)
            logger.info(
                "created dedupe key partitions",
                ["pg.schema": schemaName, "dedupe.periods": missing.map(String.init).joined(separator: ",")])
        }

        let serverNow = try connection.execute("SELECT (extract(epoch FROM now()) * 1000000)::bigint")
        let serverTime = EventTime(microseconds: serverNow.int(row: 0, column: 0) ?? now.microseconds)
        // Keys are kept for the longest window any worker has used, so that a worker with a
        // shorter window never drops keys that another one still looks up.
        var keptLimits = limits
        keptLimits.dedupeWindowMicroseconds = try longestDedupeHorizon(limits) - limits.maxFutureSkewMicroseconds
        let oldestNeeded = periods.lookupRange(now: min(now, serverTime), limits: keptLimits).lowerBound - 1
        let obsolete = existing.filter { $0 < oldestNeeded }.sorted()
        for period in obsolete {
            try inTransaction { () throws(PostgresError) in
                try connection.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    [.text("tally.dedupe_partitions:\(schemaName)")])
                try connection.execute("DROP TABLE IF EXISTS \(schema).\(partitionTableName(period))")
            }
            logger.info("dropped dedupe key partition", ["pg.schema": schemaName, "dedupe.period": period])
        }
        knownDedupePartitions = existing.subtracting(obsolete)
    }

    /// Records this worker's dedupe horizon (window plus future skew) in `settings` and returns
    /// the longest one recorded, in microseconds.
    private func longestDedupeHorizon(_ limits: ValidationLimits) throws(PostgresError) -> Int64 {
        let horizon = limits.dedupeWindowMicroseconds + limits.maxFutureSkewMicroseconds
        let result = try connection.execute(
            """
            INSERT INTO \(schema).settings AS s (name, value) VALUES ('dedupe_horizon_microseconds', $1)
            ON CONFLICT (name) DO UPDATE SET value = greatest(s.value::bigint, excluded.value::bigint)::text
            RETURNING value
            """,
            [.text(String(horizon))])
        let longest = result.int(row: 0, column: 0) ?? horizon
        if longest > horizon {
            logger.rateLimited(
                .warning, "another worker used a longer dedupe window; keys are kept for the longest one",
                intervalSeconds: 3600,
                ["dedupe.horizon_us": horizon, "dedupe.longest_horizon_us": longest])
        }
        return longest
    }

    /// Makes sure that the partitions for claims at `now` exist, asking the database only when
    /// this connection has not seen them yet.
    func ensureDedupePartitions(now: EventTime, limits: ValidationLimits) throws(PostgresError) {
        let needed = dedupePeriods.claimPeriods(now: now)
        if needed.allSatisfy({ knownDedupePartitions.contains($0) }) { return }
        try maintainDedupePartitions(now: now, limits: limits)
    }

    private func existingDedupePartitions() throws(PostgresError) -> Set<Int64> {
        let result = try connection.execute(
            """
            SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = $1::regclass
            """,
            [.text("\(schema).dedupe_keys")])
        var periods = Set<Int64>()
        for row in 0..<result.rowCount {
            guard let name = result.string(row: row, column: 0), name.hasPrefix("dedupe_keys_p") else { continue }
            let suffix = name.dropFirst("dedupe_keys_p".count)
            let value = suffix.hasPrefix("m") ? Int64(suffix.dropFirst()).map { -$0 } : Int64(suffix)
            if let value { periods.insert(value) }
        }
        return periods
    }

    /// `dedupe_keys_p2925` for period 2925; `dedupe_keys_pm3` for period -3, before 1970.
    private func partitionTableName(_ period: Int64) -> String {
        period < 0 ? "dedupe_keys_pm\(-period)" : "dedupe_keys_p\(period)"
    }

    /// Runs `body` between BEGIN and COMMIT, rolling back if it throws.
    func inTransaction(_ body: () throws(PostgresError) -> Void) throws(PostgresError) {
        try connection.execute("BEGIN")
        do {
            try body()
            try connection.execute("COMMIT")
        } catch {
            rollbackQuietly()
            throw error
        }
    }

    /// Rolls back the open transaction, if any. A failure here means the connection is gone,
    /// which the caller finds out on its next statement.
    func rollbackQuietly() {
        if connection.isInTransaction {
            _ = try? connection.execute("ROLLBACK")
        }
    }
}
