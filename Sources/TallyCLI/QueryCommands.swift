import JSON
import Tally

enum UsageCommand: Command {
    static let help = """
        Usage: tally usage --config FILE --meter SLUG --from TIME --to TIME
                           [--window minute|hour|day|month] [--time-zone ZONE] [--subject S]
                           [--group-by NAME]... [--no-groups] [--format table|csv|json]
                           [--log-level LEVEL]

        Prints a meter's usage per window and group, as the SQL function usage(...) of the
        schema returns it (see docs/operations.md). Windows follow the calendar of the IANA
        time zone (default UTC): a day with a daylight-saving change is one row of 23 or 25
        hours. Rows cover the rollup minutes in [--from, --to).

        Options:
          --meter SLUG        The meter, as recorded in the schema.
          --from TIME         The start, RFC 3339 on a whole minute, such as
                              2025-03-09T00:00:00-05:00. Usage is read from per-minute
                              rollups, so a time with seconds is rejected.
          --to TIME           The end, exclusive, on a whole minute.
          --window UNIT       minute, hour, day or month (default hour).
          --time-zone ZONE    An IANA zone such as America/New_York or Asia/Kathmandu.
          --subject S         Only this subject; otherwise one row per subject.
          --group-by NAME     Keep only this group-by key of the meter; repeat it for several.
          --no-groups         Add all groups up.
          --format FORMAT     table (default), csv or json. Values are exact decimals; in
                              JSON they are strings.
          --log-level LEVEL   debug, info, warning or error (default: warning).
        """

    static let options = OptionSpec(options: [
        "config": .value, "meter": .value, "from": .value, "to": .value, "window": .value, "time-zone": .value,
        "subject": .value, "group-by": .repeated, "no-groups": .flag, "format": .value, "log-level": .value,
    ])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .warning)
        guard let meter = arguments.value("meter") else { throw UsageError("missing --meter SLUG") }
        let (from, to) = try timeRange(arguments)
        // The rollups have one row per minute, so a bound inside a minute would either drop or
        // take in the whole minute, while tally events would cut it at the exact time.
        for (name, time) in [("from", from), ("to", to)] where time.minute != time {
            throw UsageError(
                "--\(name) \(arguments.value(name) ?? time.rfc3339) is not on a whole minute; usage is read from per-minute rollups, so give a time with zero seconds, such as \(time.minute)"
            )
        }
        let window = arguments.value("window") ?? "hour"
        guard ["minute", "hour", "day", "month"].contains(window) else {
            throw UsageError("--window must be minute, hour, day or month, not \(window)")
        }
        let format = try outputFormat(arguments)
        var groupKeys: [String]? = arguments.all("group-by").isEmpty ? nil : arguments.all("group-by")
        if arguments.has("no-groups") {
            guard groupKeys == nil else { throw UsageError("give --group-by or --no-groups, not both") }
            groupKeys = []
        }

        let timeZone = arguments.value("time-zone") ?? "UTC"

        let store = try openStore(configuration, logger: logger)
        defer { store.connection.close() }
        let groupNames = try checkRecordedMeter(meter, store: store)
        for key in groupKeys ?? [] where !groupNames.contains(key) {
            // Rollups written before the meter's group-by changed may still have the key.
            if try store.rollupsHaveGroupKey(meter: meter, key: key) { continue }
            let known =
                groupNames.isEmpty ? "it has none" : "its keys are \(groupNames.sorted().joined(separator: ", "))"
            throw UsageError("meter \(meter) has no group-by key \(key); \(known)")
        }
        guard try store.isValidTimeZone(timeZone) else {
            throw UsageError(
                "--time-zone \(timeZone) is not a valid time zone in PostgreSQL; give an IANA name such as Europe/Berlin"
            )
        }
        let rows = try store.usage(
            meter: meter, from: from, to: to, window: window, timeZone: timeZone, subject: arguments.value("subject"),
            groupKeys: groupKeys)

        let header = ["WINDOW START", "WINDOW END", "SUBJECT", "GROUPS", "VALUE", "EVENTS"]
        let cells = rows.map { [$0.windowStart, $0.windowEnd, $0.subject, $0.groups, $0.value, String($0.eventCount)] }
        switch format {
        case "csv":
            print(csv([header.map { $0.lowercased().replacingSpaces() }] + cells))
        case "json":
            let writer = JSONWriter()
            writer.beginArray()
            for row in rows {
                writer.beginObject()
                writer.field("window_start", row.windowStart)
                writer.field("window_end", row.windowEnd)
                writer.field("subject", row.subject)
                writer.key("groups")
                try writeJSONText(row.groups, to: writer)
                writer.field("value", row.value)
                writer.field("events", row.eventCount)
                writer.endObject()
            }
            writer.endArray()
            print(writer.text)
        default:
            print(StatsCommand.table([header] + cells))
        }
        return 0
    }
}

enum EventsCommand: Command {
    static let help = """
        Usage: tally events --config FILE --subject S --from TIME --to TIME [--meter SLUG]
                            [--limit N] [--format table|csv|json] [--log-level LEVEL]

        Lists the ledger rows of one subject with an event time in [--from, --to), oldest first,
        with their readings and Kafka coordinates: which events made up a usage figure. The
        times are exact, to the microsecond. Quantities are exact decimals, in JSON as strings.

        Options:
          --subject S        The subject, such as a customer id.
          --from TIME        The start, RFC 3339.
          --to TIME          The end, exclusive.
          --meter SLUG       Only events with a reading for this meter, as recorded in the schema.
          --limit N          Print at most N rows (default 1000). When more rows match, a
                             notice on stderr says so.
          --format FORMAT    table (default), csv or json.
          --log-level LEVEL  debug, info, warning or error (default: warning).
        """

    static let options = OptionSpec(options: [
        "config": .value, "subject": .value, "from": .value, "to": .value, "meter": .value, "limit": .value,
        "format": .value, "log-level": .value,
    ])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .warning)
        guard let subject = arguments.value("subject") else { throw UsageError("missing --subject S") }
        let (from, to) = try timeRange(arguments)
        let format = try outputFormat(arguments)
        let limitText = arguments.value("limit") ?? "1000"
        guard let limit = Int(limitText), limit > 0 else {
            throw UsageError("--limit must be a positive number, not \(limitText)")
        }
        let store = try openStore(configuration, logger: logger)
        defer { store.connection.close() }
        if let meter = arguments.value("meter") { _ = try checkRecordedMeter(meter, store: store) }
        var rows = try store.ledgerEvents(
            subject: subject, from: from, to: to, meter: arguments.value("meter"), limit: limit + 1)
        if rows.count > limit {
            rows.removeLast(rows.count - limit)
            printError(
                "tally events: showing the first \(limit) rows, and more match; raise --limit or narrow --from/--to")
        }

        let header = ["LEDGER ID", "EVENT TIME", "SOURCE", "ID", "TYPE", "METERS", "TOPIC", "PARTITION", "OFFSET"]
        let cells = rows.map {
            [
                String($0.ledgerID), $0.eventTime, $0.source, $0.eventID, $0.type, $0.meters, $0.partition.topic,
                String($0.partition.partition), String($0.offset),
            ]
        }
        switch format {
        case "csv":
            print(csv([header.map { $0.lowercased().replacingSpaces() }] + cells))
        case "json":
            let writer = JSONWriter()
            writer.beginArray()
            for row in rows {
                writer.beginObject()
                writer.field("ledger_id", row.ledgerID)
                writer.field("event_time", row.eventTime)
                writer.field("source", row.source)
                writer.field("id", row.eventID)
                writer.field("type", row.type)
                writer.key("meters")
                try writeJSONText(row.meters, to: writer)
                writer.field("topic", row.partition.topic)
                writer.field("partition", Int64(row.partition.partition))
                writer.field("offset", row.offset)
                writer.endObject()
            }
            writer.endArray()
            print(writer.text)
        default:
            print(StatsCommand.table([header] + cells))
        }
        return 0
    }
}

/// Returns the group-by names of a meter recorded in the schema, or rejects the command line
/// when the meter is not recorded.
func checkRecordedMeter(_ meter: String, store: LedgerStore) throws -> Set<String> {
    let meters = try store.recordedMeters()
    guard let groupNames = meters[meter] else {
        let known = meters.keys.sorted().joined(separator: ", ")
        throw UsageError(
            "meter \(meter) is not recorded in schema \(store.schemaName); recorded meters: \(known.isEmpty ? "none" : known)"
        )
    }
    return groupNames
}

/// Reads the required `--from` and `--to` times and checks their order.
func timeRange(_ arguments: ParsedArguments) throws -> (EventTime, EventTime) {
    guard let from = try timeOption(arguments, "from") else { throw UsageError("missing --from TIME") }
    guard let to = try timeOption(arguments, "to") else { throw UsageError("missing --to TIME") }
    guard from < to else { throw UsageError("--to must be after --from") }
    return (from, to)
}

func outputFormat(_ arguments: ParsedArguments) throws -> String {
    let format = arguments.value("format") ?? "table"
    guard ["table", "csv", "json"].contains(format) else {
        throw UsageError("--format must be table, csv or json, not \(format)")
    }
    return format
}

/// Formats rows as RFC 4180 CSV: fields with a comma, quote or line break are quoted, quotes doubled.
func csv(_ rows: [[String]]) -> String {
    rows.map { row in
        row.map { field in
            guard field.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return field }
            return "\"" + field.split(separator: "\"", omittingEmptySubsequences: false).joined(separator: "\"\"")
                + "\""
        }.joined(separator: ",")
    }.joined(separator: "\n")
}

extension String {
    fileprivate func replacingSpaces() -> String {
        String(map { $0 == " " ? "_" : $0 })
    }
}

/// Writes JSON text that PostgreSQL produced as a nested value.
func writeJSONText(_ text: String, to writer: JSONWriter) throws {
    writer.write(try JSONParser(maxDepth: 64).parse(Array(text.utf8)))
}
