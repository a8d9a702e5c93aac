import Foundation
import Postgres

/// Creates or upgrades Tally's schema.
///
/// A session advisory lock serializes concurrent runs, so two workers that start at once
/// both succeed and each migration is applied exactly once. Running it again is a no-op.
public enum Migrator {
    public struct Outcome: Sendable, Equatable {
        /// The version before, or 0 for a new schema.
        public var fromVersion: Int
        public var toVersion: Int
    }

    /// The version of the newest migration this build applies.
    public static var latestVersion: Int { Schema.latestVersion }

    /// The number of migrations in this build.
    public static var migrationCount: Int { Schema.migrations.count }

    public static func migrate(_ connection: PostgresConnection, schema: String, logger: Logger) throws(PostgresError)
        -> Outcome
    {
        try requireUTF8(connection)
        let quotedSchema = try connection.quoteIdentifier(schema)
        // One lock per schema name, taken for the session and released below.
        let lockKey = "tally.migrate:\(schema)"
        try connection.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", [.text(lockKey)])
        defer {
            _ = try? connection.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", [.text(lockKey)])
        }

        try connection.executeScript(
            """
            CREATE SCHEMA IF NOT EXISTS \(quotedSchema);
            CREATE TABLE IF NOT EXISTS \(quotedSchema).schema_migrations (
                version integer PRIMARY KEY,
                description text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """)
        let applied = try appliedVersion(connection, quotedSchema: quotedSchema)
        guard applied <= Schema.latestVersion else {
            throw PostgresError(
                kind: .statementFailed,
                message:
                    "schema \(schema) is at version \(applied), newer than this tally (\(Schema.latestVersion)); upgrade tally",
                operation: "migrate")
        }

        for migration in Schema.migrations where migration.version > applied {
            logger.info("applying migration", ["pg.schema": schema, "migration.version": migration.version])
            try connection.execute("BEGIN")
            do {
                try connection.executeScript(migration.sql.replacingOccurrences(of: "{schema}", with: quotedSchema))
                try connection.execute(
                    "INSERT INTO \(quotedSchema).schema_migrations (version, description) VALUES ($1, $2)",
                    [.text(String(migration.version)), .text(migration.description)])
                try connection.execute("COMMIT")
            } catch {
                _ = try? connection.execute("ROLLBACK")
                throw error
            }
        }
        return Outcome(fromVersion: applied, toVersion: Schema.latestVersion)
    }

    /// The applied version, or nil when the schema has no migrations table.
    public static func currentVersion(_ connection: PostgresConnection, schema: String) throws(PostgresError) -> Int? {
        let quotedSchema = try connection.quoteIdentifier(schema)
        let exists = try connection.execute(
            "SELECT to_regclass($1) IS NOT NULL", [.text("\(quotedSchema).schema_migrations")])
        guard exists.string(row: 0, column: 0) == "t" else { return nil }
        return try appliedVersion(connection, quotedSchema: quotedSchema)
    }

    private static func appliedVersion(_ connection: PostgresConnection, quotedSchema: String) throws(PostgresError)
        -> Int
    {
        let result = try connection.execute("SELECT coalesce(max(version), 0) FROM \(quotedSchema).schema_migrations")
        return Int(result.int(row: 0, column: 0) ?? 0)
    }

    /// Refuses a database whose encoding is not UTF8: event text is stored as it arrives, and
    /// another encoding would reject or alter characters outside its repertoire.
    static func requireUTF8(_ connection: PostgresConnection) throws(PostgresError) {
        let encoding = try connection.serverEncoding()
        guard encoding == "UTF8" else {
            throw PostgresError(
                kind: .statementFailed,
                message:
                    "the database uses the encoding \(encoding); Tally needs a UTF8 database (CREATE DATABASE ... ENCODING 'UTF8')",
                operation: "check encoding")
        }
    }
}
