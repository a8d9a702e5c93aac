import CRdKafka

/// A failure reported by librdkafka, with its error code and the call that failed.
public struct KafkaError: Error, Sendable, CustomStringConvertible {
    /// The `rd_kafka_resp_err_t` value. Negative codes are local to the client.
    public var code: Int32
    /// librdkafka's name for the code, such as `_TRANSPORT` or `UNKNOWN_TOPIC_OR_PART`.
    public var name: String
    public var message: String
    /// The librdkafka call or the step that failed.
    public var operation: String
    public var isFatal: Bool
    public var isRetriable: Bool

    public init(code: Int32, message: String, operation: String, isFatal: Bool = false, isRetriable: Bool = false) {
        self.code = code
        self.name = String(cString: rd_kafka_err2name(rd_kafka_resp_err_t(code)))
        self.message = message
        self.operation = operation
        self.isFatal = isFatal
        self.isRetriable = isRetriable
    }

    /// Creates an error from a response code, with librdkafka's text for it.
    init(_ code: rd_kafka_resp_err_t, operation: String) {
        self.init(code: code.rawValue, message: String(cString: rd_kafka_err2str(code)), operation: operation)
    }

    /// Creates an error from an `rd_kafka_error_t`, which this initializer destroys.
    init(consuming error: OpaquePointer, operation: String) {
        defer { rd_kafka_error_destroy(error) }
        self.init(
            code: rd_kafka_error_code(error).rawValue,
            message: String(cString: rd_kafka_error_string(error)),
            operation: operation,
            isFatal: rd_kafka_error_is_fatal(error) != 0,
            isRetriable: rd_kafka_error_is_retriable(error) != 0)
    }

    /// Creates an error for a step that failed in this layer, with no librdkafka code.
    static func local(_ message: String, operation: String) -> KafkaError {
        KafkaError(code: RD_KAFKA_RESP_ERR__FAIL.rawValue, message: message, operation: operation)
    }

    public var description: String {
        "Kafka \(operation) failed (\(name)): \(message)"
    }

    /// The message is past the end of the partition's log, or below its start.
    public var isOffsetOutOfRange: Bool {
        code == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE.rawValue
    }

    /// True when the application did not poll within `max.poll.interval.ms`, so the consumer
    /// left the group. Its partitions go to other members, and it rejoins on the next poll.
    public var isMaxPollExceeded: Bool {
        code == RD_KAFKA_RESP_ERR__MAX_POLL_EXCEEDED.rawValue
    }

    /// The topic or partition does not exist on the brokers.
    public var isUnknownTopicOrPartition: Bool {
        code == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART.rawValue || code == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC.rawValue
            || code == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION.rawValue
    }

    /// The consumer reached the end of a partition's log (with `enable.partition.eof`).
    public var isPartitionEOF: Bool {
        code == RD_KAFKA_RESP_ERR__PARTITION_EOF.rawValue
    }

    /// A request timed out, for example because no broker could be reached.
    public var isTimeout: Bool {
        code == RD_KAFKA_RESP_ERR__TIMED_OUT.rawValue || code == RD_KAFKA_RESP_ERR__TRANSPORT.rawValue
            || code == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN.rawValue
    }
}
