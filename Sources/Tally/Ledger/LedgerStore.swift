import Foundation
import JSON
import Postgres

/// The schema is missing or at another version than this build expects.
public struct SchemaVersionError: Error, Sendable, CustomStringConvertible {
    public var schema: String
    public var found: Int?
    public var expected: Int

    public var description: String {
        guard let found else {
            return "schema \(schema) has no Tally tables; run tally migrate first"
        }
        if found < expected {
            return "schema \(schema) is at version \(found), but this tally needs \(expected); run tally migrate"
        }
        return "schema \(schema) is at version \(found), newer than this tally (\(expected)); upgrade tally"
    }
}

/// Tally's tables in one PostgreSQL schema, reached through one connection.
///
/// Used by one thread at a time, like the connection it owns.
public final class LedgerStore {
    public let connection: PostgresConnection
    public let schemaName: String
    /// The schema name quoted for SQL.
    let schema: String
    let logger: Logger
    /// The length of a `dedupe_keys` partition, read from the `settings` table.
    let dedupePeriodSeconds: Int64
    /// The `dedupe_keys` partitions this connection has seen or created.
    var knownDedupePartitions = Set<Int64>()
    /// The Kafka consumer group recorded with each stored offset this store advances.
    public var consumerGroup: String?
    /// Fault injection for tests only; nil in production. See `LedgerStoreTestHooks`.
    public var testHooks = LedgerStoreTestHooks()

    /// Connects and checks that the schema is at the version this build expects.
    public convenience init(settings: PostgresSettings, logger: Logger) throws {
        let connection = try PostgresConnection(
            conninfo: settings.conninfo, applicationName: "tally",
            onNotice: { message in logger.debug("postgres notice", ["pg.message": message]) })
        try self.init(connection: connection, schema: settings.schema, logger: logger)
    }

    /// Uses an open connection and checks the schema version.
    public init(connection: PostgresConnection, schema: String, logger: Logger) throws {
        self.connection = connection
        self.schemaName = schema
        self.schema = try connection.quoteIdentifier(schema)
        self.logger = logger

        // Minutes and dates are computed in UTC, whatever the server's default zone is.
        try connection.execute("SET TIME ZONE 'UTC'")
        try Migrator.requireUTF8(connection)
        let version = try Migrator.currentVersion(connection, schema: schema)
        guard version == Schema.latestVersion else {
            throw SchemaVersionError(schema: schema, found: version, expected: Schema.latestVersion)
        }
        let period = try connection.execute(
            "SELECT value FROM \(self.schema).settings WHERE name = 'dedupe_period_seconds'")
        guard period.rowCount == 1, let seconds = period.string(row: 0, column: 0).flatMap({ Int64($0) }), seconds > 0
        else {
            throw SchemaVersionError(schema: schema, found: version, expected: Schema.latestVersion)
        }
        self.dedupePeriodSeconds = seconds
    }

    /// Reads the stored offsets (the next offset to read) of the partitions that have one.
    public func storedOffsets(_ partitions: [PartitionID]) throws(PostgresError) -> [PartitionID: Int64] {
        try storedPartitions(partitions).mapValues(\.nextOffset)
    }

    /// Reads the stored offset of each partition that has one, with the consumer group that
    /// advanced it last.
    public func storedPartitions(_ partitions: [PartitionID]) throws(PostgresError) -> [PartitionID: StoredPartition] {
        guard !partitions.isEmpty else { return [:] }
        let result = try connection.execute(
            """
            SELECT o.topic, o.partition, o.next_offset, o.consumer_group
            FROM \(schema).partition_offsets o
            JOIN json_to_recordset($1::json) AS p(topic text, partition integer)
              ON o.topic = p.topic COLLATE "C" AND o.partition = p.partition
            """,
            [.text(partitionListJSON(partitions))])
        var stored: [PartitionID: StoredPartition] = [:]
        for row in 0..<result.rowCount {
            let partition = PartitionID(
                topic: result.string(row: row, column: 0)!, partition: Int32(result.int(row: row, column: 1)!))
            stored[partition] = StoredPartition(
                nextOffset: result.int(row: row, column: 2)!, consumerGroup: result.string(row: row, column: 3))
        }
        return stored
    }

    /// Records the meters of the configuration for SQL readers, and returns the slugs whose
    /// definition changed since they were last recorded: their older rollups were computed
    /// with the old definition.
    @discardableResult
    public func recordMeters(_ meters: [Meter]) throws(PostgresError) -> [String] {
        let writer = JSONWriter()
        writer.beginArray()
        for meter in meters {
            writer.beginObject()
            writer.field("slug", meter.slug)
            writer.field("event_type", meter.eventType)
            writer.field("aggregation", meter.aggregation.rawValue)
            writer.field("value_path", meter.valuePath?.text)
            writer.key("group_by")
            writer.beginObject()
            for dimension in meter.groupBy {
                writer.key(dimension.name)
                writer.string(dimension.path.text)
            }
            writer.endObject()
            writer.endObject()
        }
        writer.endArray()

        let result = try connection.execute(
            """
            WITH incoming AS (
                SELECT * FROM json_to_recordset($1::json)
                    AS m(slug text, event_type text, aggregation text, value_path text, group_by jsonb)
            ), changed AS (
                SELECT i.slug FROM incoming i
                JOIN \(schema).meters m ON m.slug = i.slug COLLATE "C"
                WHERE (m.event_type, m.aggregation, m.value_path, m.group_by)
                      IS DISTINCT FROM (i.event_type COLLATE "C", i.aggregation, i.value_path, i.group_by)
            ), upserted AS (
                INSERT INTO \(schema).meters (slug, event_type, aggregation, value_path, group_by, updated_at)
                SELECT slug, event_type, aggregation, value_path, group_by, now() FROM incoming
                ON CONFLICT (slug) DO UPDATE SET
                    event_type = excluded.event_type, aggregation = excluded.aggregation,
                    value_path = excluded.value_path, group_by = excluded.group_by, updated_at = excluded.updated_at
                WHERE (\(schema).meters.event_type, \(schema).meters.aggregation, \(schema).meters.value_path,
                       \(schema).meters.group_by)
                      IS DISTINCT FROM (excluded.event_type, excluded.aggregation, excluded.value_path, excluded.group_by)
            )
            SELECT slug FROM changed ORDER BY slug
            """,
            [.text(writer.text)])
        return result.rows.compactMap { $0[0] }
    }
}

/// TEST HOOKS: points inside the batch transaction where tests inject faults, such as a
/// process kill before COMMIT or a connection that drops after COMMIT returned. Production
/// code never sets them; `tally run` sets them only from the `TALLY_TEST_HOOK` environment
/// variable (see docs/operations.md).
public struct LedgerStoreTestHooks: Sendable {
    /// Runs after every statement of a batch, just before COMMIT. A thrown error rolls the
    /// batch back like a failed statement.
    public var beforeCommit: (@Sendable () throws(PostgresError) -> Void)?
    /// Runs after COMMIT returned. A thrown error reaches the worker as if the COMMIT's
    /// outcome were unknown, although the batch is committed.
    public var afterCommit: (@Sendable () throws(PostgresError) -> Void)?

    public init() {}
}

/// A partition's row in `partition_offsets`.
public struct StoredPartition: Sendable, Equatable {
    /// The stored offset: the next offset to read.
    public var nextOffset: Int64
    /// The consumer group of the worker that advanced the offset last, when recorded.
    public var consumerGroup: String?
}

/// `[{"topic": …, "partition": …}, …]` for `json_to_recordset`.
func partitionListJSON(_ partitions: [PartitionID]) -> String {
    let writer = JSONWriter()
    writer.beginArray()
    for partition in partitions {
        writer.beginObject()
        writer.field("topic", partition.topic)
        writer.field("partition", Int64(partition.partition))
        writer.endObject()
    }
    writer.endArray()
    return writer.text
}
