import CRdKafka
import Glibc

/// A topic and partition, with an offset where one is meant.
public struct KafkaTopicPartition: Hashable, Sendable, CustomStringConvertible {
    public var topic: String
    public var partition: Int32
    /// An offset, or one of the logical offsets such as `KafkaOffset.beginning`; nil when unset.
    public var offset: Int64?

    public init(topic: String, partition: Int32, offset: Int64? = nil) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
    }

    public var description: String {
        offset.map { "\(topic)[\(partition)]@\($0)" } ?? "\(topic)[\(partition)]"
    }
}

/// librdkafka's logical offsets.
public enum KafkaOffset {
    /// The log start: the oldest message the broker still keeps.
    public static let beginning = Int64(RD_KAFKA_OFFSET_BEGINNING)
    /// The log end: the next message to be produced.
    public static let end = Int64(RD_KAFKA_OFFSET_END)
}

/// A record header. Kafka allows several headers with one name, and a null value.
public struct KafkaHeader: Sendable, Equatable {
    public var name: [UInt8]
    public var value: [UInt8]?

    public init(name: [UInt8], value: [UInt8]?) {
        self.name = name
        self.value = value
    }

    public init(name: String, value: String?) {
        self.init(name: Array(name.utf8), value: value.map { Array($0.utf8) })
    }
}

/// A consumed message, copied out of librdkafka's buffers.
public struct KafkaMessage: Sendable {
    public var topic: String
    public var partition: Int32
    public var offset: Int64
    /// Nil for a message without a key; an empty array for an empty key.
    public var key: [UInt8]?
    /// Nil for a tombstone; an empty array for a zero-length value.
    public var value: [UInt8]?
    public var headers: [KafkaHeader]
    /// The message timestamp in milliseconds since the Unix epoch, when the broker sent one.
    public var timestampMilliseconds: Int64?

    public init(
        topic: String, partition: Int32, offset: Int64, key: [UInt8]?, value: [UInt8]?,
        headers: [KafkaHeader] = [], timestampMilliseconds: Int64? = nil
    ) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers
        self.timestampMilliseconds = timestampMilliseconds
    }
}

/// The oldest and next offsets of a partition's log.
public struct KafkaWatermarks: Sendable, Equatable {
    /// The log start: the offset of the oldest message kept.
    public var low: Int64
    /// The log end: the offset the next produced message will get.
    public var high: Int64

    public init(low: Int64, high: Int64) {
        self.low = low
        self.high = high
    }
}

extension KafkaMessage {
    /// Copies a message out of librdkafka. Does not destroy `message`.
    init(copying message: UnsafeMutablePointer<rd_kafka_message_t>) {
        let raw = message.pointee
        topic = raw.rkt.map { String(cString: rd_kafka_topic_name($0)) } ?? ""
        partition = raw.partition
        offset = raw.offset
        key = raw.key.map { Array(UnsafeRawBufferPointer(start: $0, count: raw.key_len)) }
        value = raw.payload.map { Array(UnsafeRawBufferPointer(start: $0, count: raw.len)) }

        var timestampType = RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
        let timestamp = rd_kafka_message_timestamp(message, &timestampType)
        timestampMilliseconds = timestampType == RD_KAFKA_TIMESTAMP_NOT_AVAILABLE ? nil : timestamp

        headers = []
        var headerList: OpaquePointer?
        if rd_kafka_message_headers(message, &headerList) == RD_KAFKA_RESP_ERR_NO_ERROR, let headerList {
            var index = 0
            while true {
                var name: UnsafePointer<CChar>?
                var valuePointer: UnsafeRawPointer?
                var size = 0
                let status = rd_kafka_header_get_all(headerList, index, &name, &valuePointer, &size)
                guard status == RD_KAFKA_RESP_ERR_NO_ERROR, let name else { break }
                let nameBytes = Array(UnsafeRawBufferPointer(start: name, count: strlen(name)))
                let valueBytes = valuePointer.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) }
                headers.append(KafkaHeader(name: nameBytes, value: valueBytes))
                index += 1
            }
        }
    }
}

/// A topic-partition list built for one call and destroyed after it.
final class TopicPartitionList {
    /// Owned by this object unless `release()` hands it over.
    private(set) var handle: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?

    init(_ partitions: [KafkaTopicPartition]) {
        let list = rd_kafka_topic_partition_list_new(Int32(partitions.count))!
        for entry in partitions {
            let element = rd_kafka_topic_partition_list_add(list, entry.topic, entry.partition)!
            if let offset = entry.offset {
                element.pointee.offset = offset
            }
        }
        handle = list
    }

    deinit {
        if let handle { rd_kafka_topic_partition_list_destroy(handle) }
    }

    var pointer: UnsafeMutablePointer<rd_kafka_topic_partition_list_t> {
        guard let handle else { preconditionFailure("topic-partition list used after release") }
        return handle
    }

    /// Reads the entries of a list that librdkafka owns or this layer owns.
    static func entries(of list: UnsafePointer<rd_kafka_topic_partition_list_t>) -> [KafkaTopicPartition] {
        let count = Int(list.pointee.cnt)
        guard count > 0, let elements = list.pointee.elems else { return [] }
        return (0..<count).map { index in
            let element = elements[index]
            return KafkaTopicPartition(
                topic: String(cString: element.topic), partition: element.partition,
                offset: element.offset == Int64(RD_KAFKA_OFFSET_INVALID) ? nil : element.offset)
        }
    }

    /// Returns the first per-partition error in a list that a call filled in, if any.
    static func firstError(in list: UnsafePointer<rd_kafka_topic_partition_list_t>, operation: String) -> KafkaError? {
        let count = Int(list.pointee.cnt)
        guard count > 0, let elements = list.pointee.elems else { return nil }
        for index in 0..<count where elements[index].err != RD_KAFKA_RESP_ERR_NO_ERROR {
            let element = elements[index]
            var error = KafkaError(element.err, operation: operation)
            error.message += " (\(String(cString: element.topic))[\(element.partition)])"
            return error
        }
        return nil
    }
}
