import Postgres

/// The status a worker reports about itself in the `workers` table.
public struct WorkerStatus: Sendable, Equatable {
    public enum State: String, Sendable {
        /// Joined the group, no partition assigned.
        case idle
        /// Partitions assigned, and either caught up or committing batches.
        case consuming
        /// Partitions assigned with lag, and no batch committed for longer than
        /// `ingest.no_progress_timeout`.
        case noProgress = "no_progress"
        /// Stopped by a signal, or by a fatal error.
        case stopped
    }

    public var workerID: String
    public var consumerGroup: String
    public var host: String
    public var pid: Int32
    public var state: State
    /// The reason for the state, such as `PostgreSQL unreachable`; empty when nothing is wrong.
    public var detail: String
    /// The partitions assigned to the worker, such as `usage[0],usage[3]`.
    public var partitions: String
    /// Messages in the assigned partitions not yet written, when known.
    public var lag: Int64?
    /// Seconds since the worker last made progress (committed a batch, or had no lag).
    public var secondsSinceProgress: Int64

    public init(
        workerID: String, consumerGroup: String, host: String, pid: Int32, state: State, detail: String = "",
        partitions: String = "", lag: Int64? = nil, secondsSinceProgress: Int64 = 0
    ) {
        self.workerID = workerID
        self.consumerGroup = consumerGroup
        self.host = host
        self.pid = pid
        self.state = state
        self.detail = detail
        self.partitions = partitions
        self.lag = lag
        self.secondsSinceProgress = secondsSinceProgress
    }
}

/// A row of the `workers` table as `tally stats` shows it.
public struct WorkerStatusRow: Sendable {
    public var workerID: String
    public var consumerGroup: String
    public var host: String
    public var pid: Int64
    /// The state the worker reported last, as text.
    public var status: String
    public var detail: String
    public var partitions: String
    public var lag: Int64?
    /// Seconds since the worker last made progress, as of now.
    public var secondsSinceProgress: Int64?
    /// Seconds since the worker last wrote its row. A live worker writes it every 5 seconds.
    public var secondsSinceHeartbeat: Int64

    /// Seconds without a row update after which a worker that did not report `stopped` is
    /// taken as silent: killed, or blocked in a call that does not return.
    public static let silentAfterSeconds: Int64 = 30

    /// True when the worker did not report `stopped` and has not written its row for
    /// `silentAfterSeconds`.
    public var isSilent: Bool {
        status != WorkerStatus.State.stopped.rawValue && secondsSinceHeartbeat >= Self.silentAfterSeconds
    }

    /// The status to show: the one the worker reported, or `silent`.
    public var shownStatus: String { isSilent ? "silent" : status }

    /// The partitions the worker reported, one by one.
    public var partitionList: [String] {
        partitions.split(separator: ",").map(String.init)
    }
}

extension LedgerStore {
    /// Writes the worker's row of the `workers` table. Times come from the server's clock.
    public func recordWorkerStatus(_ status: WorkerStatus) throws(PostgresError) {
        try connection.execute(
            """
            INSERT INTO \(schema).workers AS w (worker_id, consumer_group, host, pid, status, detail, partitions, lag,
                                                started_at, last_progress_at, heartbeat_at)
            VALUES ($1, $2, $3, $4::integer, $5, $6, $7, $8::bigint, now(),
                    now() - make_interval(secs => $9::bigint), now())
            ON CONFLICT (worker_id) DO UPDATE SET
                status = excluded.status, detail = excluded.detail, partitions = excluded.partitions,
                lag = excluded.lag, last_progress_at = excluded.last_progress_at, heartbeat_at = excluded.heartbeat_at
            """,
            [
                .text(status.workerID), .text(status.consumerGroup), .text(status.host), .text(String(status.pid)),
                .text(status.state.rawValue), .text(status.detail), .text(status.partitions),
                status.lag.map { .text(String($0)) }, .text(String(status.secondsSinceProgress)),
            ])
    }

    /// Reads the workers that wrote their row within `maxAgeSeconds`, by group and id.
    public func workerStatuses(maxAgeSeconds: Int64 = 86_400) throws(PostgresError) -> [WorkerStatusRow] {
        let result = try connection.execute(
            """
            SELECT worker_id, consumer_group, host, pid, status, detail, partitions, lag,
                   floor(extract(epoch FROM now() - last_progress_at))::bigint,
                   floor(extract(epoch FROM now() - heartbeat_at))::bigint
            FROM \(schema).workers
            WHERE heartbeat_at > now() - make_interval(secs => $1::bigint)
            ORDER BY consumer_group, worker_id
            """,
            [.text(String(maxAgeSeconds))])
        return (0..<result.rowCount).map { row in
            WorkerStatusRow(
                workerID: result.string(row: row, column: 0) ?? "",
                consumerGroup: result.string(row: row, column: 1) ?? "",
                host: result.string(row: row, column: 2) ?? "",
                pid: result.int(row: row, column: 3) ?? 0,
                status: result.string(row: row, column: 4) ?? "",
                detail: result.string(row: row, column: 5) ?? "",
                partitions: result.string(row: row, column: 6) ?? "",
                lag: result.int(row: row, column: 7),
                secondsSinceProgress: result.int(row: row, column: 8),
                secondsSinceHeartbeat: result.int(row: row, column: 9) ?? 0)
        }
    }

    /// Deletes the rows of workers that have not written for `olderThanSeconds`.
    public func deleteStaleWorkerStatuses(olderThanSeconds: Int64) throws(PostgresError) {
        try connection.execute(
            "DELETE FROM \(schema).workers WHERE heartbeat_at < now() - make_interval(secs => $1::bigint)",
            [.text(String(olderThanSeconds))])
    }
}
