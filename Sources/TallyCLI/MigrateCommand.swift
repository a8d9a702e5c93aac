import Postgres
import Tally

enum MigrateCommand: Command {
    static let help = """
        Usage: tally migrate [--config FILE] [--schema NAME] [--log-level LEVEL]

        Creates Tally's tables in the PostgreSQL schema, or upgrades them to this version.
        It is safe to run twice, and safe while other workers start: concurrent runs wait for
        each other.

        The connection comes from postgres.conninfo in the configuration, or from libpq's
        PG* environment variables (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, ...).

        Options:
          --config FILE      The YAML configuration; only its postgres section is used.
          --schema NAME      The schema to migrate; overrides postgres.schema (default: tally).
          --log-level LEVEL  debug, info, warning or error (default: info).
        """

    static let options = OptionSpec(options: ["config": .value, "schema": .value, "log-level": .value])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        var settings = PostgresSettings()
        if let path = arguments.value("config") {
            settings = try Configuration.loadPostgresSettings(path: path)
        }
        if let schema = arguments.value("schema") {
            guard PostgresSettings.isValidSchemaName(schema) else {
                throw UsageError(
                    "--schema must be a lowercase SQL identifier (letters, digits, _; at most 63), not \(schema)")
            }
            settings.schema = schema
        }
        let logger = try commandLogger(arguments, fallback: .info)

        let connection: PostgresConnection
        do {
            connection = try PostgresConnection(conninfo: settings.conninfo, applicationName: "tally migrate")
        } catch {
            throw CommandFailure("cannot connect to PostgreSQL: \(error.message)")
        }
        let outcome = try Migrator.migrate(connection, schema: settings.schema, logger: logger)
        if outcome.fromVersion == outcome.toVersion {
            print("schema \(settings.schema) is at version \(outcome.toVersion); nothing to do")
        } else {
            print("schema \(settings.schema) migrated from version \(outcome.fromVersion) to \(outcome.toVersion)")
        }
        return 0
    }
}

/// A command failure whose message is complete as it is.
struct CommandFailure: Error, CustomStringConvertible {
    var description: String

    init(_ description: String) {
        self.description = description
    }
}
