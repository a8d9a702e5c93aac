import Tally

enum RunCommand: Command {
    static let help = """
        Usage: tally run --config FILE [--log-level LEVEL]

        Runs the ingest worker: joins the Kafka consumer group, writes each batch of events to
        the ledger and rollups in one PostgreSQL transaction together with the stored offsets,
        and logs one logfmt line per record to stderr.

        SIGTERM or SIGINT stops it: the batch in flight is committed or rolled back, the worker
        leaves the group and exits with status 0 within ingest.shutdown_timeout. A second
        signal exits at once. Run 'tally migrate' once before the first start.

        Options:
          --config FILE      The YAML configuration (see docs/configuration.md).
          --log-level LEVEL  debug, info, warning or error; overrides log.level in the file.
        """

    static let options = OptionSpec(options: ["config": .value, "log-level": .value])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: configuration.logLevel)
        let stopSignal = StopSignal()
        let sources = handleStopSignals(
            stopSignal, timeoutMilliseconds: configuration.ingest.shutdownTimeoutMilliseconds, logger: logger)
        defer { sources.forEach { $0.cancel() } }

        let worker = Worker(configuration: configuration, logger: logger, stopSignal: stopSignal)
        try worker.run()
        return 0
    }
}
