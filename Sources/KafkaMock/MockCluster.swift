import CRdKafka
import Kafka

/// librdkafka's mock Kafka cluster, served on loopback ports chosen by the system.
///
/// It implements the Kafka protocol in-process, for the dev-broker command and the tests.
/// The mock API is experimental upstream, so nothing on the worker's path uses it.
/// The cluster runs on librdkafka's own threads; the methods here may be called from any
/// one thread at a time. It owns the handle that hosts it and destroys both in `deinit`.
public final class MockCluster: @unchecked Sendable {
    /// The client that hosts the cluster. Owned by this object.
    private let host: OpaquePointer
    /// Owned by this object, destroyed before `host`.
    private let cluster: OpaquePointer

    /// The `bootstrap.servers` value for clients, such as `127.0.0.1:39715`.
    public let bootstrapServers: String

    public init(brokerCount: Int32 = 1) throws(KafkaError) {
        guard let configuration = rd_kafka_conf_new() else {
            fatalError("rd_kafka_conf_new failed: out of memory")
        }
        var errorText = [CChar](repeating: 0, count: 512)
        // The host client never connects anywhere; this silences its warning about that.
        rd_kafka_conf_set(configuration, "log_level", "3", &errorText, errorText.count)
        guard let host = rd_kafka_new(RD_KAFKA_PRODUCER, configuration, &errorText, errorText.count) else {
            rd_kafka_conf_destroy(configuration)
            let detail = String(decoding: errorText.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw KafkaError(code: -1, message: detail, operation: "create mock cluster host")
        }
        guard let cluster = rd_kafka_mock_cluster_new(host, brokerCount) else {
            rd_kafka_destroy(host)
            throw KafkaError(code: -1, message: "rd_kafka_mock_cluster_new failed", operation: "create mock cluster")
        }
        self.host = host
        self.cluster = cluster
        self.bootstrapServers = String(cString: rd_kafka_mock_cluster_bootstraps(cluster))
    }

    deinit {
        rd_kafka_mock_cluster_destroy(cluster)
        rd_kafka_destroy(host)
    }

    /// Creates a topic with `partitions` partitions, led by the cluster's brokers in turn.
    public func createTopic(_ name: String, partitions: Int32, replicationFactor: Int32 = 1) throws(KafkaError) {
        let code = rd_kafka_mock_topic_create(cluster, name, partitions, replicationFactor)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else {
            throw KafkaError(code: code.rawValue, message: "cannot create topic \(name)", operation: "create topic")
        }
    }

    /// Makes a broker refuse connections until `setBrokerUp`.
    public func setBrokerDown(_ brokerID: Int32) throws(KafkaError) {
        let code = rd_kafka_mock_broker_set_down(cluster, brokerID)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else {
            throw KafkaError(code: code.rawValue, message: "broker \(brokerID)", operation: "set broker down")
        }
    }

    public func setBrokerUp(_ brokerID: Int32) throws(KafkaError) {
        let code = rd_kafka_mock_broker_set_up(cluster, brokerID)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else {
            throw KafkaError(code: code.rawValue, message: "broker \(brokerID)", operation: "set broker up")
        }
    }

    /// Makes the next `errors.count` requests of type `apiKey` fail with these error codes.
    public func pushRequestErrors(apiKey: Int16, errors: [Int32]) {
        var codes = errors.map { rd_kafka_resp_err_t(rawValue: $0) }
        rd_kafka_mock_push_request_errors_array(cluster, apiKey, codes.count, &codes)
    }
}
