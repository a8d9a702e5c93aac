/// A configuration that cannot be used, with the place in the file when known.
public struct ConfigurationError: Error, Sendable, CustomStringConvertible {
    public var message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { message }
}

/// Everything `tally run` needs, read from the YAML file described in docs/configuration.md.
public struct Configuration: Sendable {
    public var kafka: KafkaSettings
    public var postgres: PostgresSettings
    public var ingest: IngestSettings
    public var meters: [Meter]
    public var logLevel: Logger.Level

    public init(
        kafka: KafkaSettings, postgres: PostgresSettings, ingest: IngestSettings = IngestSettings(), meters: [Meter],
        logLevel: Logger.Level = .info
    ) {
        self.kafka = kafka
        self.postgres = postgres
        self.ingest = ingest
        self.meters = meters
        self.logLevel = logLevel
    }
}

public struct KafkaSettings: Sendable {
    /// The `bootstrap.servers` list, such as `broker1:9092,broker2:9092`.
    public var brokers: String
    public var topics: [String]
    public var groupID: String
    /// librdkafka properties passed through unchanged, in file order.
    public var properties: [(String, String)]

    /// Properties that Tally sets itself because exactly-once depends on them.
    public static let managedProperties: [String: String] = [
        "bootstrap.servers": "kafka.brokers",
        "metadata.broker.list": "kafka.brokers",
        "group.id": "kafka.group_id",
        "enable.auto.commit": "",
        "enable.auto.offset.store": "",
        "auto.offset.reset": "",
        "enable.partition.eof": "",
    ]

    public init(brokers: String, topics: [String], groupID: String, properties: [(String, String)] = []) {
        self.brokers = brokers
        self.topics = topics
        self.groupID = groupID
        self.properties = properties
    }

    /// The librdkafka properties for the worker's consumer.
    ///
    /// Offsets are never committed automatically: PostgreSQL stores them in the batch
    /// transaction. A partition without a stored offset starts at the log start. The
    /// `cooperative-sticky` assignor moves only the partitions that must move in a rebalance;
    /// `partition.assignment.strategy` in `properties` overrides it.
    public var consumerProperties: [(String, String)] {
        var result: [(String, String)] = [
            ("client.id", "tally"),
            ("partition.assignment.strategy", "cooperative-sticky"),
        ]
        result += properties
        result += [
            ("bootstrap.servers", brokers),
            ("group.id", groupID),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
        ]
        return result
    }

    /// Whether a property's value must stay out of logs.
    public static func isSecret(_ name: String) -> Bool {
        let lowered = name.lowercased()
        return ["password", "secret", "key.pem", "oauthbearer.config", "sasl.jaas", "token"].contains {
            lowered.contains($0)
        }
    }
}

public struct PostgresSettings: Sendable {
    /// A libpq connection string or URI. Empty means libpq's `PG*` environment variables alone.
    public var conninfo: String
    /// The schema of Tally's tables.
    public var schema: String

    public init(conninfo: String = "", schema: String = "tally") {
        self.conninfo = conninfo
        self.schema = schema
    }

    /// Checks that `name` is a lowercase SQL identifier that needs no quoting:
    /// `[a-z_][a-z0-9_]*`, at most 63 bytes.
    public static func isValidSchemaName(_ name: String) -> Bool {
        isPlainIdentifier(name)
    }
}

public struct IngestSettings: Sendable {
    public static let microsecondsPerSecond: Int64 = 1_000_000

    /// An event whose key was accepted within this time is a duplicate; older events are `too_late`.
    public var dedupeWindowMicroseconds: Int64 = 35 * 86_400 * microsecondsPerSecond
    /// Events further ahead of the clock than this are `time_in_future`.
    public var maxFutureSkewMicroseconds: Int64 = 5 * 60 * microsecondsPerSecond
    /// Values longer than this are `payload_too_large`.
    public var maxPayloadBytes: Int = 1 << 20
    /// A batch is written when it contains this many messages…
    public var batchMaxMessages: Int = 5000
    /// …or this many bytes of keys and values…
    public var batchMaxBytes: Int = 16 << 20
    /// …or when its first message has waited this long.
    public var batchMaxWaitMilliseconds: Int = 250
    /// Whether to copy the stored offsets to Kafka after each commit, for lag tools.
    public var commitToKafka: Bool = true
    /// How long a stop may take to finish the batch in flight and leave the group.
    public var shutdownTimeoutMilliseconds: Int = 30_000
    /// How long a worker with assigned partitions and lag may go without committing a batch
    /// before it reports `no_progress`.
    public var noProgressTimeoutMilliseconds: Int = 60_000
    /// With 2, a batch that spans several partitions is validated and written as two
    /// transactions at once, on two PostgreSQL connections, each for its own partitions.
    public var writeConnections: Int = 2

    public init() {}
}
