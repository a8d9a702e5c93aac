import Glibc
import JSON
import Kafka
import Postgres
import Tally

enum BackfillCommand: Command {
    static let help = """
        Usage: tally backfill --config FILE --topic TOPIC [--partition N]...
                              [--from-offset N|beginning | --from-time TIME]
                              [--to-offset N|end | --to-time TIME]
                              [--event-time-from TIME] [--event-time-to TIME] [--dry-run]
               tally backfill --config FILE --resume ID
               tally backfill --config FILE --list [--json]

        Reruns a range of a topic through the worker's validation, dedupe, ledger and rollup
        transaction. It reads with its own consumer and a manual assignment, outside the
        consumer group, and never changes the group's offsets. Only offsets below the live
        group's stored offset that have no outcome yet are written: an offset that has one is
        counted as already recorded, and offsets past the stored offset are left to the live
        workers. A range ingested before therefore adds nothing.

        Each run is recorded in PostgreSQL with its range, progress and counts per partition,
        in the transactions that write its batches. SIGTERM or SIGINT stops a run after the
        batch in flight and exits with status 1; --resume ID continues it.

        Options:
          --topic TOPIC          The topic to read.
          --partition N          A partition to read; repeat it for several (default: all).
          --from-offset N        The first offset, or 'beginning' for the log start (default).
          --to-offset N          The last offset, inclusive, or 'end' for the log end when the
                                 run starts (default).
          --from-time TIME       Start at the first message whose Kafka timestamp is at or
                                 after TIME (RFC 3339), found with ListOffsets by timestamp.
          --to-time TIME         End before the first message whose timestamp is at or after TIME.
          --event-time-from TIME Apply only events whose CloudEvents time is at or after TIME.
          --event-time-to TIME   Apply only events whose time is before TIME.
          --dry-run              Read the range and print what it would add per meter, subject
                                 and minute, then roll everything back.
          --resume ID            Continue the interrupted run ID with its recorded range. It
                                 takes no range options and no --dry-run, and a finished run
                                 is reported as such without reading anything.
          --list                 Print the recorded runs.
          --json                 With --list, print JSON.
          --log-level LEVEL      debug, info, warning or error (default: info).

        Events are validated with the current clock, so events older than the dedupe window
        become dead letters too_late, as they would in the worker. A dry run holds one
        transaction for the whole range, and its idempotency key claims make live workers wait
        on the same keys until it ends. A terminal on stderr gets a progress bar; otherwise a
        progress line is logged every 10 seconds.
        """

    static let options = OptionSpec(options: [
        "config": .value, "topic": .value, "partition": .repeated, "from-offset": .value, "to-offset": .value,
        "from-time": .value, "to-time": .value, "event-time-from": .value, "event-time-to": .value, "dry-run": .flag,
        "resume": .value, "list": .flag, "json": .flag, "log-level": .value,
    ])

    /// The options that describe a new run, which `--resume` and `--list` do not take.
    static let newRunOptions = [
        "topic", "partition", "from-offset", "to-offset", "from-time", "to-time", "event-time-from", "event-time-to",
        "dry-run",
    ]

    /// Rejects option combinations that would be ignored: a resumed run keeps its recorded
    /// range and writes (so it cannot be a dry run), and `--list` prints every run.
    static func checkModes(_ arguments: ParsedArguments) throws {
        let given = newRunOptions.filter { arguments.has($0) || arguments.value($0) != nil }
        if arguments.value("resume") != nil {
            guard !arguments.has("list") else { throw UsageError("give --resume or --list, not both") }
            if let option = given.first {
                throw UsageError(
                    "--resume continues a recorded run with its own range and writes its batches; --\(option) cannot be combined with it"
                )
            }
        }
        if arguments.has("list"), let option = given.first {
            throw UsageError("--list prints every recorded run and takes no --\(option)")
        }
        if arguments.has("json"), !arguments.has("list") {
            throw UsageError("--json applies to --list only")
        }
    }

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        try checkModes(arguments)
        // A new run's options are checked before the configuration is read, so that a wrong
        // command line exits with 2 whatever the configuration.
        var resumeID: Int64?
        if let resume = arguments.value("resume") {
            guard let id = Int64(resume), id > 0 else { throw UsageError("--resume needs a run id, not \(resume)") }
            resumeID = id
        }
        let newRun = resumeID == nil && !arguments.has("list") ? try request(arguments) : nil
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .info)

        if arguments.has("list") {
            let store = try openStore(configuration, logger: logger)
            defer { store.connection.close() }
            let runs = try store.backfillRuns()
            print(arguments.has("json") ? renderRunsJSON(runs) : renderRuns(runs))
            return 0
        }

        let stopSignal = StopSignal()
        let sources = handleStopSignals(
            stopSignal, timeoutMilliseconds: configuration.ingest.shutdownTimeoutMilliseconds, logger: logger)
        defer { sources.forEach { $0.cancel() } }
        let backfill = Backfill(configuration: configuration, logger: logger, stopSignal: stopSignal)
        let reporter = ProgressReporter(logger: logger)
        backfill.onProgress = { reporter.report($0) }

        let result: BackfillResult
        if let newRun {
            result = try backfill.start(newRun)
        } else {
            guard let resumeID else { preconditionFailure("a backfill without --list is a new run or a resumed one") }
            result = try backfill.resume(runID: resumeID)
        }
        reporter.finish()

        print(renderResult(result, isDryRun: arguments.has("dry-run")))
        return result.stopped ? 1 : 0
    }

    static func request(_ arguments: ParsedArguments) throws -> BackfillRequest {
        guard let topic = arguments.value("topic") else { throw UsageError("missing --topic TOPIC") }
        var request = BackfillRequest(topic: topic)
        request.partitions = try arguments.all("partition").map { text in
            guard let partition = Int32(text), partition >= 0 else {
                throw UsageError("--partition must be a partition number, not \(text)")
            }
            return partition
        }
        if arguments.value("from-offset") != nil, arguments.value("from-time") != nil {
            throw UsageError("give --from-offset or --from-time, not both")
        }
        if arguments.value("to-offset") != nil, arguments.value("to-time") != nil {
            throw UsageError("give --to-offset or --to-time, not both")
        }
        if let text = arguments.value("from-offset") {
            request.from = try offsetBound(text, option: "from-offset", keyword: "beginning", bound: .beginning)
        } else if let time = try timeOption(arguments, "from-time") {
            request.from = .time(time)
        }
        if let text = arguments.value("to-offset") {
            request.to = try offsetBound(text, option: "to-offset", keyword: "end", bound: .end)
        } else if let time = try timeOption(arguments, "to-time") {
            request.to = .time(time)
        }
        request.eventTimeFrom = try timeOption(arguments, "event-time-from")
        request.eventTimeTo = try timeOption(arguments, "event-time-to")
        if let from = request.eventTimeFrom, let to = request.eventTimeTo, to <= from {
            throw UsageError("--event-time-to must be after --event-time-from")
        }
        switch (request.from, request.to) {
        case (.offset(let from), .offset(let to)) where from > to:
            throw UsageError("--from-offset \(from) is after --to-offset \(to); the range would be empty")
        case (.time(let from), .time(let to)) where to <= from:
            throw UsageError("--to-time must be after --from-time")
        default:
            break
        }
        request.dryRun = arguments.has("dry-run")
        return request
    }

    private static func offsetBound(_ text: String, option: String, keyword: String, bound: BackfillBound) throws
        -> BackfillBound
    {
        if text == keyword { return bound }
        guard let offset = Int64(text), offset >= 0 else {
            throw UsageError("--\(option) must be an offset or \(keyword), not \(text)")
        }
        return .offset(offset)
    }

    static func renderResult(_ result: BackfillResult, isDryRun: Bool = false) -> String {
        let run = result.run
        var rows = [
            [
                "PARTITION", "FROM", "TO", "NEXT", "ACCEPTED", "DUPLICATES", "ALREADY RECORDED", "DEAD LETTERS",
                "LEFT TO LIVE GROUP", "OUTSIDE TIME RANGE",
            ]
        ]
        for range in run.partitions {
            rows.append([
                range.partition.description, String(range.fromOffset), String(range.toOffset), String(range.nextOffset),
                String(range.counts.accepted), String(range.counts.duplicates), String(range.counts.alreadyRecorded),
                String(range.counts.deadLetters), String(range.counts.leftToLiveGroup),
                String(range.counts.outsideTimeRange),
            ])
        }
        var text: String
        if isDryRun {
            text = "Dry run\(result.stopped ? " interrupted before the end of the range" : ""): nothing was written. "
            if result.dryRunAdditions.isEmpty {
                text += "It would add no readings.\n\n"
            } else {
                text += "It would add:\n\n"
                let header = ["METER", "SUBJECT", "GROUPS", "MINUTE", "EVENTS", "AGGREGATION", "VALUE"]
                text += StatsCommand.table([header] + result.dryRunAdditions) + "\n\n"
            }
        } else if result.wasAlreadyFinished {
            text = "Backfill run \(run.id) had already finished; nothing was read. Its recorded counts:\n\n"
        } else {
            text =
                "Backfill run \(run.id) \(result.stopped ? "interrupted; continue it with --resume \(run.id)" : run.status.rawValue)\n\n"
        }
        text += StatsCommand.table(rows)
        let counts = run.counts
        text +=
            "\n\nTOTAL offsets=\(run.doneOffsets)/\(run.totalOffsets) accepted=\(counts.accepted) "
            + "duplicates=\(counts.duplicatesAndRecorded) (already recorded \(counts.alreadyRecorded)) "
            + "dead_letters=\(counts.deadLetters) left_to_live_group=\(counts.leftToLiveGroup) "
            + "outside_time_range=\(counts.outsideTimeRange)"
        return text
    }

    static func renderRuns(_ runs: [BackfillRun]) -> String {
        var rows = [
            [
                "RUN", "STATUS", "TOPIC", "RANGE", "PARTITIONS", "EVENT TIME", "OFFSETS", "ACCEPTED", "DUPLICATES",
                "DEAD LETTERS", "STARTED", "UPDATED",
            ]
        ]
        for run in runs {
            rows.append([
                String(run.id), run.status.rawValue, run.topic, run.rangeDescription,
                run.partitions.map { String($0.partition.partition) }.joined(separator: ","), eventTimeText(run),
                "\(run.doneOffsets)/\(run.totalOffsets)", String(run.counts.accepted),
                String(run.counts.duplicatesAndRecorded), String(run.counts.deadLetters), run.startedAt, run.updatedAt,
            ])
        }
        return StatsCommand.table(rows)
    }

    /// Returns the event-time filter of a run as `from..to`, with `*` for an open end, or `-`
    /// for none.
    static func eventTimeText(_ run: BackfillRun) -> String {
        guard run.eventTimeFrom != nil || run.eventTimeTo != nil else { return "-" }
        return "\(run.eventTimeFrom?.rfc3339 ?? "*")..\(run.eventTimeTo?.rfc3339 ?? "*")"
    }

    static func renderRunsJSON(_ runs: [BackfillRun]) -> String {
        let writer = JSONWriter()
        writer.beginArray()
        for run in runs {
            writer.beginObject()
            writer.field("id", run.id)
            writer.field("status", run.status.rawValue)
            writer.field("topic", run.topic)
            writer.field("range", run.rangeDescription)
            writer.field("event_time_from", run.eventTimeFrom?.rfc3339)
            writer.field("event_time_to", run.eventTimeTo?.rfc3339)
            writer.field("started_at", run.startedAt)
            writer.field("updated_at", run.updatedAt)
            writer.key("partitions")
            writer.beginArray()
            for range in run.partitions {
                writer.beginObject()
                writer.field("partition", Int64(range.partition.partition))
                writer.field("from_offset", range.fromOffset)
                writer.field("to_offset", range.toOffset)
                writer.field("next_offset", range.nextOffset)
                writer.field("accepted", range.counts.accepted)
                writer.field("duplicates", range.counts.duplicates)
                writer.field("already_recorded", range.counts.alreadyRecorded)
                writer.field("dead_letters", range.counts.deadLetters)
                writer.field("left_to_live_group", range.counts.leftToLiveGroup)
                writer.field("outside_time_range", range.counts.outsideTimeRange)
                writer.endObject()
            }
            writer.endArray()
            writer.endObject()
        }
        writer.endArray()
        return writer.text
    }
}

/// Shows a backfill's progress: a bar redrawn on a terminal, or a log line every 10 seconds.
final class ProgressReporter {
    private let logger: Logger
    private let isTerminal = isatty(2) == 1
    private var lastLog = -1.0
    private var drewBar = false

    init(logger: Logger) {
        self.logger = logger
    }

    func report(_ progress: BackfillProgress) {
        let rate = progress.elapsedSeconds > 0 ? Double(progress.offsetsThisSession) / progress.elapsedSeconds : 0
        let remaining = progress.totalOffsets - progress.doneOffsets
        let secondsLeft = rate > 0 ? Int(Double(remaining) / rate) : nil
        let left = secondsLeft.map { "\($0 / 60):" + ($0 % 60 < 10 ? "0" : "") + String($0 % 60) } ?? "-"
        if isTerminal {
            let width = 30
            let filled =
                progress.totalOffsets > 0 ? Int(Int64(width) * progress.doneOffsets / progress.totalOffsets) : width
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            let line =
                "\r[\(bar)] \(progress.doneOffsets)/\(progress.totalOffsets) offsets  \(Int(rate)) offsets/s  \(left) left "
            var bytes = Array(line.utf8)
            _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
            drewBar = true
        } else if lastLog < 0 || progress.elapsedSeconds - lastLog >= 10 {
            lastLog = progress.elapsedSeconds
            logger.info(
                "backfill progress",
                [
                    "offsets.done": progress.doneOffsets, "offsets.total": progress.totalOffsets,
                    "offsets_per_second": Int(rate), "seconds_left": secondsLeft.map(String.init) ?? "-",
                    "accepted": progress.counts.accepted,
                ])
        }
    }

    /// Ends the bar's line.
    func finish() {
        if drewBar { printError("") }
    }
}

/// Reads an RFC 3339 time option.
func timeOption(_ arguments: ParsedArguments, _ name: String) throws -> EventTime? {
    guard let text = arguments.value(name) else { return nil }
    do {
        return try EventTime.parseRFC3339(text)
    } catch {
        throw UsageError("--\(name) must be an RFC 3339 time such as 2025-01-15T10:00:00Z, not \(text)")
    }
}

/// Connects to the configured schema, with a one-line message when PostgreSQL is unreachable.
func openStore(_ configuration: Configuration, logger: Logger) throws -> LedgerStore {
    do {
        return try LedgerStore(settings: configuration.postgres, logger: logger)
    } catch let error as PostgresError where error.kind == .connectionFailed {
        throw CommandFailure("cannot connect to PostgreSQL: \(error.message)")
    }
}
