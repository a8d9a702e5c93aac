import Foundation
import Glibc
import Postgres
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

        let worker = Worker(
            configuration: configuration, logger: logger, stopSignal: stopSignal,
            storeTestHooks: try testHooks(logger: logger))
        try worker.run()
        return 0
    }

    /// TEST HOOK: `TALLY_TEST_HOOK=kill-before-commit` makes the worker kill itself with
    /// SIGKILL after the statements of its first batch, before COMMIT;
    /// `kill-after-commit` right after the COMMIT returned, before the offsets are copied to
    /// Kafka. The crash tests use them (docs/operations.md). Never set it in production.
    static func testHooks(
        logger: Logger, environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> LedgerStoreTestHooks {
        var hooks = LedgerStoreTestHooks()
        guard let hook = environment["TALLY_TEST_HOOK"], !hook.isEmpty else { return hooks }
        let killNow: @Sendable () throws(PostgresError) -> Void = {
            logger.warning("TALLY_TEST_HOOK: killing the worker with SIGKILL", ["hook": hook])
            kill(getpid(), SIGKILL)
        }
        switch hook {
        case "kill-before-commit": hooks.beforeCommit = killNow
        case "kill-after-commit": hooks.afterCommit = killNow
        default:
            throw UsageError("TALLY_TEST_HOOK must be kill-before-commit or kill-after-commit, not \(hook)")
        }
        logger.warning(
            "TALLY_TEST_HOOK is set: a fault injection for tests; never set it in production", ["hook": hook])
        return hooks
    }
}
