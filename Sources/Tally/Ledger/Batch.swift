import Kafka
import Postgres

/// One consumed message and what validation decided about it.
public struct ValidatedMessage: Sendable {
    public var message: KafkaMessage
    public var outcome: ValidationOutcome

    public init(message: KafkaMessage, outcome: ValidationOutcome) {
        self.message = message
        self.outcome = outcome
    }

    var partitionID: PartitionID { PartitionID(topic: message.topic, partition: message.partition) }
}

/// The one outcome a committed message has.
public enum MessageOutcome: Sendable {
    case accepted(ledgerID: Int64)
    /// The same key and payload was accepted before, as this ledger row.
    case duplicate(originalLedgerID: Int64)
    case deadLetter(Rejection)
}

/// A range of offsets below a stored offset that carried no message.
public struct OffsetGap: Sendable, Equatable {
    public var partition: PartitionID
    public var fromOffset: Int64
    /// The last offset of the gap, inclusive.
    public var toOffset: Int64
    public var reason: String

    /// Offsets skipped inside or before a batch: transaction markers, compacted records, or
    /// records removed by retention while the partition was not read.
    public static let skippedReason = "offsets_skipped"
    /// Offsets below the partition's log start when Tally read it: retention (or a deletion of
    /// records) removed them before Tally read them, so their events are lost to Tally.
    public static let retentionReason = "retention"
}

/// The changes of a committed batch.
public struct BatchSummary: Sendable {
    /// The new stored offset of each partition in the batch.
    public var nextOffsets: [PartitionID: Int64] = [:]
    public var accepted = 0
    /// Accepted events whose type no meter reads.
    public var unmetered = 0
    public var duplicates = 0
    public var deadLetters: [RejectionReason: Int] = [:]
    public var gaps: [OffsetGap] = []
    /// The outcome of each message, in the order of the batch.
    public var outcomes: [MessageOutcome] = []
    /// The duration of each stage of the transaction, for the debug log.
    public var timings = BatchTimings()

    public var deadLetterCount: Int { deadLetters.values.reduce(0, +) }
}

/// The time each stage of a committed batch's transaction took, in microseconds of the
/// monotonic clock, measured on the calling thread. Each includes PostgreSQL's time.
public struct BatchTimings: Sendable {
    /// BEGIN, locking the stored offsets, dedupe lookups, ledger id allocation and key claims.
    public var classify: Int64 = 0
    public var ledger: Int64 = 0
    public var rollups: Int64 = 0
    /// Duplicates, dead letters, offset gaps and the stored offsets.
    public var other: Int64 = 0
    public var commit: Int64 = 0
}

/// The reason a batch was not committed.
public enum BatchWriteError: Error, CustomStringConvertible {
    /// A stored offset differs from the one the batch started from: another consumer has
    /// written these offsets since. Nothing was written. Holds the stored offsets found, nil
    /// for a partition that has none.
    case staleOffsets([PartitionID: Int64?])
    /// PostgreSQL failed; the transaction was rolled back or its outcome is unknown.
    case database(PostgresError)

    public var description: String {
        switch self {
        case .staleOffsets(let stored):
            let list = stored.keys.sorted().map { "\($0)=\(stored[$0]!.map(String.init) ?? "none")" }
            return "stored offsets moved since the batch started (\(list.joined(separator: ", ")))"
        case .database(let error):
            return error.description
        }
    }
}

/// The offsets of one partition's messages in a batch.
struct PartitionSpan {
    var partition: PartitionID
    /// The stored offset the batch starts from, or nil when the partition has none yet.
    var expectedStoredOffset: Int64?
    var firstOffset: Int64
    var lastOffset: Int64
    var accepted = 0
    var unmetered = 0
    var duplicates = 0
    var deadLetters: [RejectionReason: Int] = [:]

    /// The stored offset the batch starts from, after inserting a missing row at the first offset.
    var startOffset: Int64 { expectedStoredOffset ?? firstOffset }
}

/// The options of `writeOutcomes` for a batch that does not come from the live consumer group.
struct OutcomeOptions {
    /// Treats an idempotency key whose ledger row no longer exists as not accepted: its claims
    /// are deleted and the event is accepted again. Only backfill sets it, so that events whose
    /// ledger rows were removed can be restored: it rereads offsets in order, so the event
    /// that claims the key again is the first one with that key in the range. Replay leaves it
    /// off, because a dead letter is a later event (such as a conflicting resend) and must not
    /// take the place of the original. The live path leaves it off, so a key claimed by a
    /// batch is always decided by the claim alone.
    var reclaimOrphanedKeys = false
    /// Inserts a row into `dead_letters` for each rejected message. Replay leaves it off,
    /// because the message has its dead letter already.
    var insertsDeadLetters = true
}
