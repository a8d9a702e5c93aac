import JSON
import Tally

/// The subcommands `tally dead-letters list|show|replay`.
enum DeadLettersCommand {
    static let help = """
        Usage: tally dead-letters list --config FILE [FILTER] [--limit N] [--resolved] [--json]
               tally dead-letters show --config FILE ID
               tally dead-letters replay --config FILE [FILTER]

        Each subcommand also takes --log-level LEVEL and prints its own help with --help.

        Filter options:
          --reason REASON    A reason code such as invalid_value; repeat it for several.
          --topic TOPIC      The Kafka topic.
          --partition N      A partition; repeat it for several.
          --from TIME        Received at or after TIME (RFC 3339).
          --to TIME          Received before TIME.
        """

    /// Takes the subcommand from the front of `options`, and turns the ID of `show ID` into `--id ID`.
    static func subcommand(_ options: inout [String]) -> (name: String, command: Command.Type)? {
        guard let name = options.first else { return nil }
        options.removeFirst()
        switch name {
        case "list":
            return (name, DeadLettersListCommand.self)
        case "show":
            if let id = options.first, !id.hasPrefix("-") {
                options[0] = "--id=" + id
            }
            return (name, DeadLettersShowCommand.self)
        case "replay":
            return (name, DeadLettersReplayCommand.self)
        default:
            return nil
        }
    }

    static let filterOptions: [String: OptionSpec.Kind] = [
        "config": .value, "reason": .repeated, "topic": .value, "partition": .repeated, "from": .value, "to": .value,
        "log-level": .value,
    ]

    static func filter(_ arguments: ParsedArguments) throws -> DeadLetterFilter {
        var filter = DeadLetterFilter()
        filter.reasons = arguments.all("reason")
        for reason in filter.reasons where RejectionReason(rawValue: reason) == nil {
            throw UsageError(
                "--reason \(reason) is not a reason code; see docs/events.md for the list")
        }
        filter.topic = arguments.value("topic")
        filter.partitions = try arguments.all("partition").map { text in
            guard let partition = Int32(text), partition >= 0 else {
                throw UsageError("--partition must be a partition number, not \(text)")
            }
            return partition
        }
        filter.receivedFrom = try timeOption(arguments, "from")
        filter.receivedTo = try timeOption(arguments, "to")
        return filter
    }
}

enum DeadLettersListCommand: Command {
    static let help = """
        Usage: tally dead-letters list --config FILE [--reason REASON]... [--topic TOPIC]
                                       [--partition N]... [--from TIME] [--to TIME]
                                       [--limit N] [--resolved] [--json]

        Prints the unresolved dead letters that match the filter, oldest first: id, reason,
        Kafka coordinates, time received, size of the value, replays so far and the detail.

        Options:
          --reason REASON    A reason code such as invalid_value; repeat it for several.
          --topic TOPIC      The Kafka topic.
          --partition N      A partition; repeat it for several.
          --from TIME        Received at or after TIME (RFC 3339).
          --to TIME          Received before TIME.
          --limit N          Print at most N rows (default 100). When more match, a notice
                             on stderr says so.
          --resolved         Include dead letters that a replay resolved.
          --json             Print a JSON array.
          --log-level LEVEL  debug, info, warning or error (default: warning).
        """

    static let options = OptionSpec(
        options: DeadLettersCommand.filterOptions.merging(["limit": .value, "resolved": .flag, "json": .flag]) { $1 })

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .warning)
        var filter = try DeadLettersCommand.filter(arguments)
        filter.includeResolved = arguments.has("resolved")
        let limitText = arguments.value("limit") ?? "100"
        guard let limit = Int(limitText), limit > 0 else {
            throw UsageError("--limit must be a positive number, not \(limitText)")
        }
        let store = try openStore(configuration, logger: logger)
        defer { store.connection.close() }
        var rows = try store.deadLetters(filter, limit: limit + 1)
        if rows.count > limit {
            rows.removeLast(rows.count - limit)
            printError(
                "tally dead-letters list: showing the first \(limit) dead letters, and more match; raise --limit or narrow the filter"
            )
        }

        if arguments.has("json") {
            let writer = JSONWriter()
            writer.beginArray()
            for row in rows {
                writer.beginObject()
                writer.field("id", row.id)
                writer.field("reason", row.reason)
                writer.field("topic", row.partition.topic)
                writer.field("partition", Int64(row.partition.partition))
                writer.field("offset", row.offset)
                writer.field("received_at", row.receivedAt)
                writer.field("value_bytes", row.valueBytes)
                writer.field("replay_count", row.replayCount)
                writer.field("resolved_ledger_id", row.resolvedLedgerID)
                writer.field("detail", row.detail)
                writer.endObject()
            }
            writer.endArray()
            print(writer.text)
            return 0
        }
        var table = [["ID", "REASON", "PARTITION", "OFFSET", "RECEIVED", "BYTES", "REPLAYS", "RESOLVED", "DETAIL"]]
        for row in rows {
            table.append([
                String(row.id), row.reason, row.partition.description, String(row.offset), row.receivedAt,
                row.valueBytes.map(String.init) ?? "null", String(row.replayCount),
                row.resolvedLedgerID.map { "ledger \($0)" } ?? "-", row.detail,
            ])
        }
        print(StatsCommand.table(table))
        return 0
    }
}

enum DeadLettersShowCommand: Command {
    static let help = """
        Usage: tally dead-letters show --config FILE ID

        Prints one dead letter: its reason, detail and Kafka coordinates, its headers, and its
        raw key and value, as text when the bytes are valid UTF-8 and as hexadecimal otherwise.

        Options:
          --log-level LEVEL  debug, info, warning or error (default: warning).
        """

    static let options = OptionSpec(options: ["config": .value, "id": .value, "log-level": .value])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .warning)
        guard let text = arguments.value("id"), let id = Int64(text) else {
            throw UsageError("give the id of a dead letter, such as 'tally dead-letters show 42'")
        }
        let store = try openStore(configuration, logger: logger)
        defer { store.connection.close() }
        guard let letter = try store.deadLetter(id: id) else {
            throw CommandFailure("dead letter \(id) not found")
        }
        let summary = letter.summary
        var lines = [
            "id: \(summary.id)",
            "reason: \(summary.reason)",
            "detail: \(summary.detail)",
            "kafka: \(summary.partition)@\(summary.offset)",
            "kafka timestamp: \(letter.kafkaTimestamp ?? "none")",
            "received at: \(summary.receivedAt)",
            "replays: \(summary.replayCount)",
            "resolved: \(summary.resolvedLedgerID.map { "ledger row \($0)" } ?? "no")",
            "headers: \(letter.headers)",
        ]
        lines.append(rendered("key", letter.key))
        lines.append(rendered("value", letter.value))
        print(lines.joined(separator: "\n"))
        return 0
    }

    /// Formats bytes as `name (N bytes, text):` and the text, or as `name (N bytes, hex):` and
    /// the hexadecimal digits when they are not valid UTF-8.
    static func rendered(_ name: String, _ bytes: [UInt8]?) -> String {
        guard let bytes else { return "\(name): null" }
        if let text = String(validating: bytes, as: UTF8.self) {
            return "\(name) (\(bytes.count) bytes, text):\n\(text)"
        }
        let hex = bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        return "\(name) (\(bytes.count) bytes, hex):\n\(hex)"
    }
}

enum DeadLettersReplayCommand: Command {
    static let help = """
        Usage: tally dead-letters replay --config FILE [--reason REASON]... [--topic TOPIC]
                                         [--partition N]... [--from TIME] [--to TIME]

        Re-drives the unresolved dead letters that match the filter through the current
        validation and meters of the configuration, as after a producer or a meter was fixed.
        An event that passes now is accepted once, at its original Kafka coordinates, and its
        dead letter is marked resolved with a link to the ledger row; when its idempotency key
        was accepted before, it is recorded as a duplicate of that row instead. An event that
        still fails keeps its dead letter with the new reason. Resolved dead letters are never
        replayed again, so a second replay adds nothing. The meters of the configuration are
        recorded first, as the worker does at start.

        Events are validated with the current clock, so events older than the dedupe window
        stay dead letters too_late. A dead letter whose event id was accepted before, but whose
        original ledger row no longer exists, stays a dead letter duplicate_id_conflict: run
        tally backfill over the original event's offsets first, then replay it.

        Options:
          --reason REASON    A reason code such as invalid_value; repeat it for several.
          --topic TOPIC      The Kafka topic.
          --partition N      A partition; repeat it for several.
          --from TIME        Received at or after TIME (RFC 3339).
          --to TIME          Received before TIME.
          --log-level LEVEL  debug, info, warning or error (default: info).
        """

    static let options = OptionSpec(options: DeadLettersCommand.filterOptions)

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .info)
        let filter = try DeadLettersCommand.filter(arguments)
        let store = try openStore(configuration, logger: logger)
        defer { store.connection.close() }
        try store.recordMeters(configuration.meters)
        let limits = ValidationLimits(
            maxPayloadBytes: configuration.ingest.maxPayloadBytes,
            dedupeWindowMicroseconds: configuration.ingest.dedupeWindowMicroseconds,
            maxFutureSkewMicroseconds: configuration.ingest.maxFutureSkewMicroseconds)
        let validator = EventValidator(meters: MeterSet(configuration.meters), limits: limits)
        let summary = try store.replayDeadLetters(filter, validator: validator, now: EventTime.systemNow())
        let failing = summary.stillFailing.keys.sorted().map { "\($0)=\(summary.stillFailing[$0]!)" }
        let failingCount = summary.stillFailing.values.reduce(0, +)
        print(
            "accepted=\(summary.accepted) duplicates=\(summary.duplicates) still_failing=\(failingCount)"
                + (failing.isEmpty ? "" : " (\(failing.joined(separator: " ")))"))
        if failing.isEmpty {
            logger.info(
                "dead letters replayed",
                ["accepted": summary.accepted, "duplicates": summary.duplicates, "still_failing": failingCount])
        } else {
            logger.info(
                "dead letters replayed",
                [
                    "accepted": summary.accepted, "duplicates": summary.duplicates, "still_failing": failingCount,
                    "still_failing.reasons": failing.joined(separator: ","),
                ])
        }
        return 0
    }
}
