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

        Environment:
          TALLY_CLOCK_START  An RFC 3339 time at which the worker's clock starts, for tests
                             and demos that replay old events. The clock then advances in real
                             time. Never set it in production: it moves the dedupe window.
          TALLY_TEST_HOOK    kill-before-commit or kill-after-commit: the worker kills itself
                             with SIGKILL around the COMMIT of its first batch. For crash
                             tests only; never set it in production.

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
            configuration: configuration, clock: try clock(logger: logger), logger: logger, stopSignal: stopSignal,
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

    /// Returns the system clock, or a shifted one when `TALLY_CLOCK_START` is set.
    static func clock(logger: Logger) throws -> any TallyClock {
        guard let start = ProcessInfo.processInfo.environment["TALLY_CLOCK_START"] else { return SystemClock() }
        let time: EventTime
        do {
            time = try EventTime.parseRFC3339(start)
        } catch {
            throw UsageError("TALLY_CLOCK_START must be an RFC 3339 time with a zone, not \(start): \(error)")
        }
        logger.warning("the worker clock is shifted by TALLY_CLOCK_START", ["clock.start": time.rfc3339])
        return ShiftedClock(startingAt: time)
    }
}
