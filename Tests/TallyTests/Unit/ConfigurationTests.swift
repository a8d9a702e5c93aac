import Foundation
import Tally
import Testing

@Suite("Configuration")
struct ConfigurationTests {
    static let minimal = """
        kafka:
          brokers: 127.0.0.1:9092
          topics: [usage]
          group_id: tally
        meters:
          - slug: api_calls
            event_type: api.call
            aggregation: sum
            value: $.data.quantity
        """

    func parse(_ text: String, environment: [String: String] = [:]) throws(ConfigurationError) -> Configuration {
        try Configuration.parse(yaml: text, environment: environment)
    }

    func message(_ text: String) -> String {
        do {
            _ = try parse(text)
            return "no error"
        } catch {
            return error.message
        }
    }

    @Test func exampleConfigurationLoads() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
            "../../../docs/examples/tally.yaml"
        ).path
        let configuration = try Configuration.load(path: path, environment: ["KAFKA_PASSWORD": "secret"])
        #expect(configuration.kafka.topics == ["usage"])
        #expect(configuration.meters.map(\.slug) == ["input_tokens", "output_tokens", "requests"])
        #expect(configuration.meters[0].groupBy.map(\.name) == ["model"])
        #expect(configuration.kafka.properties.first { $0.0 == "sasl.password" }?.1 == "secret")
        #expect(configuration.postgres.schema == "tally")
        #expect(configuration.ingest.batchMaxMessages == 5000)
    }

    @Test func defaultsApplyWhenSectionsAreLeftOut() throws {
        let configuration = try parse(Self.minimal)
        #expect(configuration.ingest.dedupeWindowMicroseconds == 35 * 86_400_000_000)
        #expect(configuration.ingest.maxFutureSkewMicroseconds == 300_000_000)
        #expect(configuration.ingest.maxPayloadBytes == 1_048_576)
        #expect(configuration.postgres.conninfo == "")
        #expect(configuration.postgres.schema == "tally")
        #expect(configuration.ingest.shutdownTimeoutMilliseconds == 30_000)
        #expect(configuration.ingest.noProgressTimeoutMilliseconds == 60_000)
        #expect(
            configuration.kafka.consumerProperties.contains {
                $0 == ("partition.assignment.strategy", "cooperative-sticky")
            })
    }

    @Test func durationsAndSizesAreRead() throws {
        let configuration = try parse(
            Self.minimal + """

                ingest:
                  dedupe_window: 40d
                  max_future_skew: 90s
                  max_payload_bytes: 512KiB
                  write_connections: 1
                  batch:
                    max_messages: 100
                    max_bytes: 2MiB
                    max_wait: 20ms
                  shutdown_timeout: 5s
                  no_progress_timeout: 2m
                """)
        #expect(configuration.ingest.dedupeWindowMicroseconds == 40 * 86_400_000_000)
        #expect(configuration.ingest.maxFutureSkewMicroseconds == 90_000_000)
        #expect(configuration.ingest.maxPayloadBytes == 512 * 1024)
        #expect(configuration.ingest.batchMaxMessages == 100)
        #expect(configuration.ingest.batchMaxBytes == 2 << 20)
        #expect(configuration.ingest.batchMaxWaitMilliseconds == 20)
        #expect(configuration.ingest.shutdownTimeoutMilliseconds == 5000)
        #expect(configuration.ingest.noProgressTimeoutMilliseconds == 120_000)
        #expect(configuration.ingest.writeConnections == 1)
    }

    @Test func limitsOutsideTheirRangeAreRejected() {
        #expect(message(Self.minimal + "\ningest:\n  dedupe_window: 800d").contains("from 1m to 730d"))
        #expect(message(Self.minimal + "\ningest:\n  dedupe_window: 30s").contains("from 1m to 730d"))
        #expect(message(Self.minimal + "\ningest:\n  max_future_skew: 2d").contains("at most 1d"))
        #expect(message(Self.minimal + "\ningest:\n  batch:\n    max_bytes: 1GiB").contains("to 256MiB"))
        #expect(message(Self.minimal + "\ningest:\n  batch:\n    max_messages: 0").contains("from 1 to"))
        #expect(message(Self.minimal + "\ningest:\n  shutdown_timeout: 0s").contains("from 1s to 1h"))
        #expect(message(Self.minimal + "\ningest:\n  no_progress_timeout: 500ms").contains("from 1s to 1d"))
        #expect(message(Self.minimal + "\ningest:\n  write_connections: 3").contains("from 1 to 2"))
    }

    @Test func unknownKeyNamesItsPlace() {
        let text = Self.minimal.replacingOccurrences(of: "group_id: tally", with: "group_id: tally\n  groupid: x")
        #expect(message(text).contains("unknown key groupid in kafka at line 5"))
    }

    @Test func managedKafkaPropertiesAreRejected() {
        let text = Self.minimal.replacingOccurrences(
            of: "group_id: tally", with: "group_id: tally\n  properties:\n    enable.auto.commit: \"true\"")
        #expect(message(text).contains("enable.auto.commit"))
    }

    @Test func meterMistakesAreReported() {
        #expect(
            message(Self.minimal.replacingOccurrences(of: "aggregation: sum", with: "aggregation: avg")).contains("avg")
        )
        #expect(
            message(Self.minimal.replacingOccurrences(of: "\n    value: $.data.quantity", with: "")).contains(
                "needs a value path"))
        #expect(
            message(Self.minimal.replacingOccurrences(of: "$.data.quantity", with: "data.quantity")).contains(
                "must start with '$'"))
        #expect(
            message(Self.minimal + "\n  - slug: api_calls\n    event_type: x\n    aggregation: count").contains(
                "used twice"))
        #expect(
            message(
                Self.minimal.replacingOccurrences(
                    of: "aggregation: sum\n    value: $.data.quantity",
                    with: "aggregation: count\n    value: $.data.quantity")
            ).contains("takes no value"))
    }

    @Test func emptyMeterListIsRejected() {
        let text = Self.minimal[..<Self.minimal.range(of: "meters:")!.upperBound] + " []"
        #expect(message(String(text)).contains("meters lists no meter"))
    }

    @Test func librdkafkaPropertiesAreCheckedWithTheirLine() {
        let unknown = Self.minimal.replacingOccurrences(
            of: "group_id: tally", with: "group_id: tally\n  properties:\n    no.such.property: x")
        #expect(message(unknown).contains("kafka.properties.no.such.property at line 6"))
        let invalid = Self.minimal.replacingOccurrences(
            of: "group_id: tally", with: "group_id: tally\n  properties:\n    session.timeout.ms: soon")
        #expect(message(invalid).contains("rejected by librdkafka"))
    }

    @Test func postgresSectionIsReadAlone() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("tally-\(UUID().uuidString).yaml").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let text =
            "kafka:\n  properties:\n    sasl.password: ${UNSET_SECRET}\npostgres:\n  schema: billing\nmeters: []\n"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        #expect(try Configuration.loadPostgresSettings(path: path, environment: [:]).schema == "billing")
        #expect(throws: ConfigurationError.self) { try Configuration.load(path: path, environment: [:]) }
    }

    @Test func missingFileAndDirectoryAreNamed() {
        #expect(throws: ConfigurationError.self) { try Configuration.load(path: "/nonexistent/tally.yaml") }
        do {
            _ = try Configuration.load(path: "/tmp")
        } catch {
            #expect(error.message.contains("is a directory"))
        }
    }

    @Test func environmentVariablesAreExpanded() throws {
        let text = Self.minimal + "\npostgres:\n  conninfo: host=db password=${PGPASS_TEST}"
        #expect(try parse(text, environment: ["PGPASS_TEST": "s3cret"]).postgres.conninfo == "host=db password=s3cret")
        #expect(message(text).contains("PGPASS_TEST, which is not set"))
    }

    @Test func duplicateYAMLKeysAndAliasesAreRejected() {
        #expect(message(Self.minimal + "\nkafka:\n  brokers: x").contains("duplicate key"))
        #expect(message("kafka: &k\n  brokers: x\nother: *k").contains("aliases"))
        #expect(message("kafka: [").contains("invalid YAML"))
    }

    @Test func jsonPathsAcceptBracketsAndIndexes() throws {
        let path = try JSONPath("$.data['model.name'].items[2]")
        #expect(
            path.steps == [
                .member(ByteString("data")), .member(ByteString("model.name")), .member(ByteString("items")), .index(2),
            ])
        #expect(throws: ConfigurationError.self) { try JSONPath("$") }
        #expect(throws: ConfigurationError.self) { try JSONPath("$.data[") }
        #expect(throws: ConfigurationError.self) { try JSONPath("$..x") }
    }

    @Test func secretsAreRecognizedForLogs() {
        #expect(KafkaSettings.isSecret("sasl.password"))
        #expect(KafkaSettings.isSecret("ssl.key.password"))
        #expect(!KafkaSettings.isSecret("security.protocol"))
    }
}
