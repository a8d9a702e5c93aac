import Glibc
import Tally

/// The `tally` command line: `tally <command> [options]`.
public enum TallyCommand {
    public static let version = "0.1.0"

    static let usage = """
        Usage: tally <command> [options]

        Tally reads usage events (CloudEvents JSON) from Kafka and writes an exactly-once
        ledger and per-minute rollups to PostgreSQL.

        Commands:
          run          Run the ingest worker until SIGTERM or SIGINT.
          migrate      Create or upgrade the PostgreSQL schema.
          stats        Print stored offsets, outcome counts and meter totals.
          backfill     Rerun a range of a topic from its offsets; list and resume runs.
          rebuild      Recompute a meter's rollups over a time range from the ledger.
          dead-letters List, show and replay dead letters (list, show ID, replay).
          reconcile    Check that Kafka, the ledger and the rollups account for each other.
          usage        Print a meter's usage per minute, hour, day or month in a time zone.
          events       List the ledger rows of one subject and time range.
          dev-broker   Serve librdkafka's mock Kafka cluster on loopback (demos and tests only).

        Run 'tally <command> --help' for the options of a command.
        """

    /// Runs the command named by `arguments[1]` and returns the process exit status:
    /// 0 on success, 1 when the work failed, 2 for a wrong command line.
    public static func main(_ arguments: [String]) -> Int32 {
        let rest = Array(arguments.dropFirst())
        guard var name = rest.first else {
            printError(usage)
            return 2
        }
        var options = Array(rest.dropFirst())
        let command: Command.Type
        if name == "dead-letters" {
            if options.first == "--help" || options.first == "-h" {
                print(DeadLettersCommand.help)
                return 0
            }
            guard let subcommand = DeadLettersCommand.subcommand(&options) else {
                printError("tally dead-letters: error: give list, show ID or replay; run 'tally dead-letters --help'")
                return 2
            }
            name += " " + subcommand.name
            command = subcommand.command
        } else {
            switch name {
            case "run": command = RunCommand.self
            case "migrate": command = MigrateCommand.self
            case "stats": command = StatsCommand.self
            case "dev-broker": command = DevBrokerCommand.self
            case "backfill": command = BackfillCommand.self
            case "rebuild": command = RebuildCommand.self
            case "reconcile": command = ReconcileCommand.self
            case "usage": command = UsageCommand.self
            case "events": command = EventsCommand.self
            case "--help", "-h", "help":
                print(usage)
                return 0
            case "--version":
                print("tally \(version)")
                return 0
            default:
                printError("tally: error: unknown command \(name); run 'tally --help' for the list")
                return 2
            }
        }

        if options.contains("--help") || options.contains("-h") {
            print(command.help)
            return 0
        }
        do {
            let parsed = try ParsedArguments.parse(options, spec: command.options)
            return try command.run(parsed)
        } catch let error as UsageError {
            printError("tally \(name): error: \(error.description); run 'tally \(name) --help' for usage")
            return 2
        } catch {
            printError("tally \(name): error: \(String(describing: error))")
            return 1
        }
    }
}

/// One subcommand.
protocol Command {
    static var help: String { get }
    static var options: OptionSpec { get }
    /// Runs the command and returns its exit status; throws to report a failure in one line.
    static func run(_ arguments: ParsedArguments) throws -> Int32
}

/// Writes text to stderr, ending it with a newline.
func printError(_ text: String) {
    writeLine(text, to: 2)
}

/// Writes text to standard output at once, without buffering, ending it with a newline.
func printNow(_ text: String) {
    writeLine(text, to: 1)
}

private func writeLine(_ text: String, to descriptor: Int32) {
    var bytes = Array(text.utf8)
    if bytes.last != UInt8(ascii: "\n") { bytes.append(UInt8(ascii: "\n")) }
    var offset = 0
    while offset < bytes.count {
        let written = bytes[offset...].withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        if written <= 0 { return }
        offset += written
    }
}

/// Reads `--config`, which a command requires.
func requiredConfiguration(_ arguments: ParsedArguments) throws -> Configuration {
    guard let path = arguments.value("config") else {
        throw UsageError("missing --config FILE")
    }
    return try Configuration.load(path: path)
}

/// Makes the logger of a command, at the level of `--log-level` or else `fallback`.
func commandLogger(_ arguments: ParsedArguments, fallback: Logger.Level) throws -> Logger {
    guard let name = arguments.value("log-level") else { return Logger(level: fallback) }
    guard let level = Logger.Level(name: name) else {
        throw UsageError("--log-level must be debug, info, warning or error, not \(name)")
    }
    return Logger(level: level)
}
