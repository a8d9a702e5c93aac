import Foundation
import Kafka
import YAML

extension Configuration {
    /// Reads the configuration file at `path`.
    public static func load(path: String, environment: [String: String] = ProcessInfo.processInfo.environment)
        throws(ConfigurationError) -> Configuration
    {
        let text = try readFile(path)
        do {
            return try parse(yaml: text, environment: environment)
        } catch {
            throw ConfigurationError("\(path): \(error.message)")
        }
    }

    /// Reads only the `postgres` section of the file at `path`, for commands that need nothing
    /// else. The rest of the file must be valid YAML but is not checked.
    public static func loadPostgresSettings(
        path: String, environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws(ConfigurationError) -> PostgresSettings {
        let text = try readFile(path)
        do throws(ConfigurationError) {
            let root = try parseYAML(text)
            guard case .mapping(let entries, _) = root else {
                throw ConfigurationError("the top level must be a mapping, not a \(root.kindName)")
            }
            guard let node = entries.first(where: { $0.key.value == "postgres" })?.value else {
                return PostgresSettings()
            }
            return try ConfigurationReader(environment: environment).readPostgres(node)
        } catch {
            throw ConfigurationError("\(path): \(error.message)")
        }
    }

    private static func readFile(_ path: String) throws(ConfigurationError) -> String {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw ConfigurationError("the configuration file \(path) does not exist")
        }
        guard !isDirectory.boolValue else {
            throw ConfigurationError("the configuration file \(path) is a directory")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigurationError("cannot read the configuration file \(path): permission denied or I/O error")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigurationError("the configuration file \(path) is not UTF-8 text")
        }
        return text
    }

    private static func parseYAML(_ text: String) throws(ConfigurationError) -> YAMLNode {
        do {
            return try YAMLParser.parse(text)
        } catch {
            throw ConfigurationError("invalid YAML: \(error)")
        }
    }

    /// Reads a configuration from YAML text. `${NAME}` in a value is replaced by the
    /// environment variable NAME, so secrets can stay out of the file.
    public static func parse(yaml text: String, environment: [String: String] = [:]) throws(ConfigurationError)
        -> Configuration
    {
        let root = try parseYAML(text)
        var reader = ConfigurationReader(environment: environment)
        return try reader.read(root)
    }
}

/// Walks the YAML tree, checking every key and value with its position for the message.
private struct ConfigurationReader {
    let environment: [String: String]

    mutating func read(_ root: YAMLNode) throws(ConfigurationError) -> Configuration {
        let top = try mapping(root, "the top level", allowed: ["kafka", "postgres", "ingest", "meters", "log"])

        guard let kafkaNode = top["kafka"] else { throw ConfigurationError("missing key kafka") }
        let kafka = try readKafka(kafkaNode)
        let postgres =
            try top["postgres"].map { node throws(ConfigurationError) in try readPostgres(node) }
            ?? PostgresSettings()
        let ingest =
            try top["ingest"].map { node throws(ConfigurationError) in try readIngest(node) } ?? IngestSettings()
        guard let metersNode = top["meters"] else { throw ConfigurationError("missing key meters") }
        let meters = try readMeters(metersNode)

        var logLevel = Logger.Level.info
        if let logNode = top["log"] {
            let log = try mapping(logNode, "log", allowed: ["level"])
            if let levelNode = log["level"] {
                let name = try string(levelNode, "log.level")
                guard let level = Logger.Level(name: name) else {
                    throw located("log.level must be debug, info, warning or error, not \(name)", levelNode)
                }
                logLevel = level
            }
        }
        return Configuration(kafka: kafka, postgres: postgres, ingest: ingest, meters: meters, logLevel: logLevel)
    }

    func readKafka(_ node: YAMLNode) throws(ConfigurationError) -> KafkaSettings {
        let kafka = try mapping(node, "kafka", allowed: ["brokers", "topics", "group_id", "properties"])
        guard let brokersNode = kafka["brokers"] else { throw located("missing key kafka.brokers", node) }
        let brokers = try string(brokersNode, "kafka.brokers")
        guard !brokers.isEmpty else { throw located("kafka.brokers is empty", brokersNode) }

        guard let topicsNode = kafka["topics"] else { throw located("missing key kafka.topics", node) }
        let topics = try stringList(topicsNode, "kafka.topics")
        guard !topics.isEmpty else { throw located("kafka.topics lists no topic", topicsNode) }
        for topic in topics where !isValidKafkaTopicName(topic) {
            throw located("kafka.topics: \(topic) is not a valid Kafka topic name", topicsNode)
        }
        guard Set(topics).count == topics.count else { throw located("kafka.topics lists a topic twice", topicsNode) }

        guard let groupNode = kafka["group_id"] else { throw located("missing key kafka.group_id", node) }
        let groupID = try string(groupNode, "kafka.group_id")
        guard !groupID.isEmpty else { throw located("kafka.group_id is empty", groupNode) }

        var properties: [(String, String)] = []
        if let propertiesNode = kafka["properties"] {
            guard case .mapping(let entries, _) = propertiesNode else {
                throw located(
                    "kafka.properties must be a mapping of librdkafka property names to values", propertiesNode)
            }
            for entry in entries {
                let name = entry.key.value
                if let replacement = KafkaSettings.managedProperties[name] {
                    let advice = replacement.isEmpty ? "Tally sets it itself" : "set \(replacement) instead"
                    throw ConfigurationError("kafka.properties.\(name) at \(entry.key.mark) cannot be set: \(advice)")
                }
                let value = try string(entry.value, "kafka.properties.\(name)")
                if let problem = kafkaPropertyProblem(name: name, value: value) {
                    throw ConfigurationError(
                        "kafka.properties.\(name) at \(entry.key.mark) is rejected by librdkafka: \(problem)")
                }
                properties.append((name, value))
            }
        }
        return KafkaSettings(brokers: brokers, topics: topics, groupID: groupID, properties: properties)
    }

    func readPostgres(_ node: YAMLNode) throws(ConfigurationError) -> PostgresSettings {
        let postgres = try mapping(node, "postgres", allowed: ["conninfo", "schema"])
        var settings = PostgresSettings()
        if let conninfoNode = postgres["conninfo"] {
            settings.conninfo = try string(conninfoNode, "postgres.conninfo")
        }
        if let schemaNode = postgres["schema"] {
            let schema = try string(schemaNode, "postgres.schema")
            guard isPlainIdentifier(schema) else {
                throw located(
                    "postgres.schema must be a lowercase SQL identifier (letters, digits, _; at most 63), not \(schema)",
                    schemaNode)
            }
            settings.schema = schema
        }
        return settings
    }

    func readIngest(_ node: YAMLNode) throws(ConfigurationError) -> IngestSettings {
        let ingest = try mapping(
            node, "ingest",
            allowed: [
                "dedupe_window", "max_future_skew", "max_payload_bytes", "batch", "commit_to_kafka", "shutdown_timeout",
                "no_progress_timeout",
                "write_connections",
            ])
        var settings = IngestSettings()
        if let value = ingest["dedupe_window"] {
            settings.dedupeWindowMicroseconds = try duration(value, "ingest.dedupe_window")
            guard (60 * 1_000_000...730 * 86_400_000_000).contains(settings.dedupeWindowMicroseconds) else {
                throw located("ingest.dedupe_window must be from 1m to 730d", value)
            }
        }
        if let value = ingest["max_future_skew"] {
            settings.maxFutureSkewMicroseconds = try duration(value, "ingest.max_future_skew")
            guard settings.maxFutureSkewMicroseconds <= 86_400_000_000 else {
                throw located("ingest.max_future_skew must be at most 1d", value)
            }
        }
        if let value = ingest["max_payload_bytes"] {
            settings.maxPayloadBytes = try byteSize(value, "ingest.max_payload_bytes")
            guard settings.maxPayloadBytes > 0 else {
                throw located("ingest.max_payload_bytes must be positive", value)
            }
        }
        if let value = ingest["commit_to_kafka"] {
            settings.commitToKafka = try boolean(value, "ingest.commit_to_kafka")
        }
        if let value = ingest["write_connections"] {
            settings.writeConnections = try integer(value, "ingest.write_connections", range: 1...2)
        }
        if let value = ingest["shutdown_timeout"] {
            settings.shutdownTimeoutMilliseconds = Int(try duration(value, "ingest.shutdown_timeout") / 1000)
            guard (1000...3_600_000).contains(settings.shutdownTimeoutMilliseconds) else {
                throw located("ingest.shutdown_timeout must be from 1s to 1h", value)
            }
        }
        if let value = ingest["no_progress_timeout"] {
            settings.noProgressTimeoutMilliseconds = Int(try duration(value, "ingest.no_progress_timeout") / 1000)
            guard (1000...86_400_000).contains(settings.noProgressTimeoutMilliseconds) else {
                throw located("ingest.no_progress_timeout must be from 1s to 1d", value)
            }
        }
        if let batchNode = ingest["batch"] {
            let batch = try mapping(batchNode, "ingest.batch", allowed: ["max_messages", "max_bytes", "max_wait"])
            if let value = batch["max_messages"] {
                settings.batchMaxMessages = try integer(value, "ingest.batch.max_messages", range: 1...1_000_000)
            }
            if let value = batch["max_bytes"] {
                settings.batchMaxBytes = try byteSize(value, "ingest.batch.max_bytes")
                guard (1...(256 << 20)).contains(settings.batchMaxBytes) else {
                    throw located("ingest.batch.max_bytes must be from 1 byte to 256MiB", value)
                }
            }
            if let value = batch["max_wait"] {
                settings.batchMaxWaitMilliseconds = Int(try duration(value, "ingest.batch.max_wait") / 1000)
            }
        }
        return settings
    }

    func readMeters(_ node: YAMLNode) throws(ConfigurationError) -> [Meter] {
        guard case .sequence(let items, _) = node else {
            throw located("meters must be a list of meters", node)
        }
        guard !items.isEmpty else {
            throw located(
                "meters lists no meter; a worker without meters would use up the idempotency keys of every event",
                node)
        }
        var meters: [Meter] = []
        var slugs = Set<String>()
        for item in items {
            let fields = try mapping(
                item, "a meter", allowed: ["slug", "event_type", "aggregation", "value", "group_by"])
            guard let slugNode = fields["slug"] else { throw located("a meter has no slug", item) }
            let slug = try string(slugNode, "meters.slug")
            guard isPlainIdentifier(slug) else {
                throw located("meter slug \(slug) must use lowercase letters, digits and _ (at most 63)", slugNode)
            }
            guard slugs.insert(slug).inserted else { throw located("meter slug \(slug) is used twice", slugNode) }
            let context = "meter \(slug)"

            guard let typeNode = fields["event_type"] else { throw located("\(context) has no event_type", item) }
            let eventType = try string(typeNode, "\(context): event_type")
            guard !eventType.isEmpty else { throw located("\(context): event_type is empty", typeNode) }

            guard let aggregationNode = fields["aggregation"] else {
                throw located("\(context) has no aggregation", item)
            }
            let aggregationName = try string(aggregationNode, "\(context): aggregation")
            guard let aggregation = Aggregation(rawValue: aggregationName) else {
                throw located(
                    "\(context): aggregation must be sum, count, min, max or latest, not \(aggregationName)",
                    aggregationNode)
            }

            var valuePath: JSONPath?
            if let valueNode = fields["value"] {
                guard aggregation != .count else {
                    throw located("\(context): a count meter counts events and takes no value", valueNode)
                }
                valuePath = try path(valueNode, "\(context): value")
            } else if aggregation != .count {
                throw located(
                    "\(context): a \(aggregation.rawValue) meter needs a value path such as $.data.tokens", item)
            }

            var groupBy: [GroupBy] = []
            if let groupNode = fields["group_by"] {
                guard case .mapping(let entries, _) = groupNode else {
                    throw located(
                        "\(context): group_by must map names to paths, such as model: $.data.model", groupNode)
                }
                for entry in entries {
                    guard !entry.key.value.isEmpty else {
                        throw ConfigurationError("\(context): a group_by name is empty at \(entry.key.mark)")
                    }
                    groupBy.append(GroupBy(name: entry.key.value, path: try path(entry.value, "\(context): group_by")))
                }
            }
            meters.append(
                Meter(
                    slug: slug, eventType: eventType, aggregation: aggregation, valuePath: valuePath, groupBy: groupBy))
        }
        return meters
    }

    // MARK: Values

    func mapping(_ node: YAMLNode, _ context: String, allowed: Set<String>) throws(ConfigurationError) -> [String:
        YAMLNode]
    {
        guard case .mapping(let entries, _) = node else {
            throw located("\(context) must be a mapping, not a \(node.kindName)", node)
        }
        var result: [String: YAMLNode] = [:]
        for entry in entries {
            guard allowed.contains(entry.key.value) else {
                let known = allowed.sorted().joined(separator: ", ")
                throw ConfigurationError(
                    "unknown key \(entry.key.value) in \(context) at \(entry.key.mark); known keys: \(known)")
            }
            result[entry.key.value] = entry.value
        }
        return result
    }

    func string(_ node: YAMLNode, _ context: String) throws(ConfigurationError) -> String {
        guard case .scalar(let scalar) = node else {
            throw located("\(context) must be a single value, not a \(node.kindName)", node)
        }
        return try expandEnvironment(scalar.value, context, node)
    }

    func stringList(_ node: YAMLNode, _ context: String) throws(ConfigurationError) -> [String] {
        switch node {
        case .scalar:
            return [try string(node, context)]
        case .sequence(let items, _):
            var values: [String] = []
            for item in items { values.append(try string(item, context)) }
            return values
        case .mapping:
            throw located("\(context) must be a list", node)
        }
    }

    func boolean(_ node: YAMLNode, _ context: String) throws(ConfigurationError) -> Bool {
        switch try string(node, context) {
        case "true": return true
        case "false": return false
        case let other: throw located("\(context) must be true or false, not \(other)", node)
        }
    }

    func integer(_ node: YAMLNode, _ context: String, range: ClosedRange<Int>) throws(ConfigurationError) -> Int {
        let text = try string(node, context).replacingOccurrences(of: "_", with: "")
        guard let value = Int(text), range.contains(value) else {
            throw located("\(context) must be an integer from \(range.lowerBound) to \(range.upperBound)", node)
        }
        return value
    }

    /// Reads a duration such as `250ms`, `30s`, `5m`, `12h` or `35d`, in microseconds.
    func duration(_ node: YAMLNode, _ context: String) throws(ConfigurationError) -> Int64 {
        let text = try string(node, context)
        let units: [(String, Int64)] = [
            ("ms", 1000), ("s", 1_000_000), ("m", 60_000_000), ("h", 3_600_000_000), ("d", 86_400_000_000),
        ]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            let number = text.dropLast(suffix.count)
            if let value = Int64(number), value >= 0, value <= Int64.max / scale {
                return value * scale
            }
        }
        throw located("\(context) must be a duration such as 250ms, 30s, 5m, 12h or 35d, not \(text)", node)
    }

    /// Reads a size such as `1048576`, `512KiB`, `16MiB` or `1GiB`, in bytes.
    func byteSize(_ node: YAMLNode, _ context: String) throws(ConfigurationError) -> Int {
        let text = try string(node, context)
        let units: [(String, Int)] = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("B", 1), ("", 1)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            if let value = Int(text.dropLast(suffix.count)), value >= 0, value <= Int(Int32.max) / scale * 2 {
                return value * scale
            }
        }
        throw located("\(context) must be a size such as 1048576, 512KiB, 16MiB or 1GiB, not \(text)", node)
    }

    func path(_ node: YAMLNode, _ context: String) throws(ConfigurationError) -> JSONPath {
        let text = try string(node, context)
        do {
            return try JSONPath(text)
        } catch {
            throw located("\(context): \(error.message)", node)
        }
    }

    /// Replaces each `${NAME}` with the environment variable NAME.
    func expandEnvironment(_ value: String, _ context: String, _ node: YAMLNode) throws(ConfigurationError) -> String {
        guard value.contains("${") else { return value }
        var result = ""
        var rest = Substring(value)
        while let start = rest.range(of: "${") {
            result += rest[..<start.lowerBound]
            guard let end = rest[start.upperBound...].firstIndex(of: "}") else {
                throw located("\(context) has an unclosed ${", node)
            }
            let name = String(rest[start.upperBound..<end])
            guard let replacement = environment[name] else {
                throw located("\(context) refers to the environment variable \(name), which is not set", node)
            }
            result += replacement
            rest = rest[rest.index(after: end)...]
        }
        return result + rest
    }

    func located(_ message: String, _ node: YAMLNode) -> ConfigurationError {
        ConfigurationError("\(message) (at \(node.mark))")
    }
}

/// Checks a Kafka topic name: 1 to 249 characters from letters, digits, `.`, `_` and `-`, not `.` or `..`.
public func isValidKafkaTopicName(_ name: String) -> Bool {
    guard !name.isEmpty, name.utf8.count <= 249, name != ".", name != ".." else { return false }
    return name.unicodeScalars.allSatisfy { scalar in
        ("a"..."z").contains(scalar) || ("A"..."Z").contains(scalar) || ("0"..."9").contains(scalar)
            || scalar == "." || scalar == "_" || scalar == "-"
    }
}

/// Checks for a lowercase SQL identifier that needs no quoting: `[a-z_][a-z0-9_]*`, at most 63 bytes.
func isPlainIdentifier(_ name: String) -> Bool {
    guard let first = name.unicodeScalars.first, name.utf8.count <= 63 else { return false }
    guard ("a"..."z").contains(first) || first == "_" else { return false }
    return name.unicodeScalars.allSatisfy { ("a"..."z").contains($0) || ("0"..."9").contains($0) || $0 == "_" }
}
