import Glibc
import Kafka
import Postgres

/// The worker's identity in the `workers` table and its logs.
struct WorkerIdentity {
    let host: String
    let pid: Int32
    /// `host/pid/random`, unique even when two containers share a host name and a pid.
    let id: String

    init() {
        var buffer = [CChar](repeating: 0, count: 256)
        let host =
            gethostname(&buffer, buffer.count) == 0
            ? String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "unknown"
        self.host = host
        self.pid = getpid()
        self.id = "\(host)/\(pid)/\(String(UInt32.random(in: 0..<UInt32.max), radix: 16))"
    }
}

/// The worker's record of its own progress.
struct ProgressTracker {
    /// The last commit of a batch, or the last time the assigned partitions had no lag.
    var lastProgress = MonotonicTime.now()
    var lastCheck = MonotonicTime.now()
    var lastReport = MonotonicTime(nanoseconds: 0)
    var state = WorkerStatus.State.idle
    var detail = ""
    var lag: Int64?
}

extension Worker {
    /// Decides whether the worker makes progress. With partitions assigned and lag, it must
    /// commit a batch at least every `ingest.no_progress_timeout`. Logs a warning when it does
    /// not, at most once a minute, and returns the state for the `workers` table.
    @discardableResult
    func checkProgress(now: MonotonicTime) -> (state: WorkerStatus.State, detail: String) {
        progress.lastCheck = now
        let assigned = Set(positions.keys).union(awaitingStart)
        guard !assigned.isEmpty else {
            progress.lastProgress = now
            progress.state = .idle
            progress.detail = ""
            progress.lag = nil
            return (.idle, "")
        }

        let lag = assignedLag(assigned)
        progress.lag = lag
        if lag == 0 {
            progress.lastProgress = now
        }
        let stalledFor = now.milliseconds(since: progress.lastProgress)
        guard stalledFor >= Int64(configuration.ingest.noProgressTimeoutMilliseconds), lag != 0 else {
            progress.state = .consuming
            progress.detail = ""
            return (.consuming, "")
        }

        let reason: String
        if !awaitingStart.isEmpty {
            reason = "waiting for PostgreSQL to read the stored offsets of assigned partitions"
        } else if isWriting || !pausedForRestart.isEmpty {
            reason = "waiting to write a batch to PostgreSQL"
        } else {
            reason = "no messages fetched from Kafka"
        }
        logger.rateLimited(
            .warning, "no progress while lag exists", intervalSeconds: 60,
            [
                "kafka.partitions": describe(Array(assigned)), "lag": lag.map(String.init) ?? "unknown",
                "no_progress.seconds": stalledFor / 1000, "reason": reason,
            ])
        progress.state = .noProgress
        progress.detail = reason
        return (.noProgress, reason)
    }

    /// Returns the messages of the assigned partitions beyond their stored offsets, from the
    /// log ends of the last fetch responses. For a few partitions never fetched (assigned
    /// paused), it requests the log ends with a short timeout, so polling is not held up. Returns
    /// nil when a log end is unknown.
    private func assignedLag(_ assigned: Set<PartitionID>) -> Int64? {
        guard let consumer else { return nil }
        var lag: Int64 = 0
        var queries = 0
        for partition in assigned.sorted() {
            var marks = consumer.cachedWatermarks(topic: partition.topic, partition: partition.partition)
            if marks == nil, queries < 4 {
                queries += 1
                marks = try? consumer.watermarks(
                    topic: partition.topic, partition: partition.partition, timeoutMilliseconds: 200)
            }
            guard let marks else { return nil }
            let stored = positions[partition]?.storedOffset ?? marks.low
            lag += max(0, marks.high - max(stored, marks.low))
        }
        return lag
    }

    /// Writes the worker's row of the `workers` table, when PostgreSQL is connected. It is a
    /// report only: a failure is logged at debug level and changes nothing else.
    func reportStatus(_ state: WorkerStatus.State, detail: String) {
        progress.lastReport = MonotonicTime.now()
        guard let store, store.connection.isOpen, !store.connection.isInTransaction else { return }
        let assigned = Set(positions.keys).union(awaitingStart)
        let status = WorkerStatus(
            workerID: identity.id, consumerGroup: configuration.kafka.groupID, host: identity.host,
            pid: identity.pid, state: state, detail: detail, partitions: describe(Array(assigned)),
            lag: progress.lag,
            secondsSinceProgress: MonotonicTime.now().milliseconds(since: progress.lastProgress) / 1000)
        do {
            try store.recordWorkerStatus(status)
        } catch {
            logger.debug("writing the worker status failed", ["error": error])
            if error.isConnectionProblem {
                store.connection.close()
                self.store = nil
            }
        }
    }
}
