import Tally

enum RebuildCommand: Command {
    static let help = """
        Usage: tally rebuild --config FILE --meter SLUG --from TIME --to TIME [--log-level LEVEL]

        Recomputes one meter's readings and per-minute rollups for the events whose time lies
        in [--from, --to), from the ledger rows, with the meter as the configuration defines it
        now: after adding a meter, after changing its value path or group-by, or after
        repairing data. --from is rounded down and --to up to whole UTC minutes.

        The meter's rollup rows of the range are replaced in one transaction. Readers see the
        old rows until it commits, live workers go on ingesting (their batches wait for the
        commit before they add to the rollups), and every event is counted once. Events on
        which the meter cannot read its value keep no reading for it and are reported.

        Options:
          --meter SLUG       A meter of the configuration.
          --from TIME        The start, RFC 3339.
          --to TIME          The end, exclusive.
          --log-level LEVEL  debug, info, warning or error (default: info).
        """

    static let options = OptionSpec(options: [
        "config": .value, "meter": .value, "from": .value, "to": .value, "log-level": .value,
    ])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .info)
        guard let slug = arguments.value("meter") else { throw UsageError("missing --meter SLUG") }
        guard let meter = configuration.meters.first(where: { $0.slug == slug }) else {
            throw UsageError(
                "meter \(slug) is not in the configuration; the meters are \(configuration.meters.map(\.slug).joined(separator: ", "))"
            )
        }
        let (from, to) = try timeRange(arguments)
        let start = from.minute
        let end = to.minute == to ? to : to.minute.adding(microseconds: EventTime.microsecondsPerMinute)

        let store = try openStore(configuration, logger: logger)
        defer { store.connection.close() }
        try store.recordMeters(configuration.meters)
        let summary = try store.rebuildRollups(meter: meter, from: start, to: end)
        logger.info(
            "rollups rebuilt",
            [
                "meter": slug, "from": start, "to": end, "events": summary.events,
                "readings.changed": summary.changedReadings, "unreadable": summary.unreadable,
            ])
        print(
            "meter \(slug) from \(start) to \(end): events=\(summary.events) readings_changed=\(summary.changedReadings) "
                + "rollup_rows_replaced=\(summary.rollupRowsDeleted) rollup_rows_written=\(summary.rollupRowsWritten) "
                + "unreadable=\(summary.unreadable)"
                + (summary.unreadableExamples.isEmpty
                    ? "" : " (ledger ids \(summary.unreadableExamples.map(String.init).joined(separator: ", ")))"))
        return 0
    }
}
