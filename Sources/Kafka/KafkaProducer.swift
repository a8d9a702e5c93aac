import CRdKafka

/// A producer over one `rd_kafka_t`, for tools and tests that write messages.
///
/// `produce` and `flush` may be called from one thread at a time. The producer owns its
/// handle and destroys it in `deinit`.
public final class KafkaProducer {
    /// Owned by this object.
    private let handle: OpaquePointer
    /// Owned by this object; librdkafka's opaque pointer refers to it.
    private let box: CallbackBox

    public init(
        properties: [(String, String)],
        onLog: (@Sendable (KafkaLogRecord) -> Void)? = nil,
        onError: (@Sendable (KafkaError) -> Void)? = nil
    ) throws(KafkaError) {
        let box = CallbackBox(onLog: onLog, onError: onError)
        let configuration = try makeConfiguration(properties, box: box)
        rd_kafka_conf_set_dr_msg_cb(configuration, recordDelivery)
        handle = try makeHandle(RD_KAFKA_PRODUCER, configuration)
        self.box = box
    }

    deinit {
        rd_kafka_destroy(handle)
    }

    /// Queues one message. A nil `partition` lets the partitioner choose from the key; a nil
    /// value produces a tombstone. The bytes are copied before this returns.
    public func produce(
        topic: String, partition: Int32? = nil, key: [UInt8]?, value: [UInt8]?, headers: [KafkaHeader] = [],
        timestampMilliseconds: Int64 = 0
    ) throws(KafkaError) {
        var headerList: OpaquePointer?
        if !headers.isEmpty {
            headerList = rd_kafka_headers_new(headers.count)
            for header in headers {
                let code = header.name.withUnsafeBufferPointer { name in
                    name.withMemoryRebound(to: CChar.self) { nameCharacters in
                        withOptionalBytes(header.value) { value, length in
                            rd_kafka_header_add(
                                headerList, nameCharacters.baseAddress, nameCharacters.count, value, length)
                        }
                    }
                }
                if code != RD_KAFKA_RESP_ERR_NO_ERROR {
                    rd_kafka_headers_destroy(headerList)
                    throw KafkaError(code, operation: "add header")
                }
            }
        }

        let code = withOptionalBytes(key) { keyPointer, keyLength in
            withOptionalBytes(value) { valuePointer, valueLength in
                tally_rd_kafka_produce(
                    handle, topic, partition ?? RD_KAFKA_PARTITION_UA, keyPointer, keyLength, valuePointer, valueLength,
                    headerList, timestampMilliseconds)
            }
        }
        if code != RD_KAFKA_RESP_ERR_NO_ERROR {
            // The headers are ours again when produce fails.
            if let headerList { rd_kafka_headers_destroy(headerList) }
            throw KafkaError(code, operation: "produce")
        }
        // Serve delivery reports so the queue does not fill up.
        rd_kafka_poll(handle, 0)
    }

    /// Waits until every queued message is delivered, and throws the first delivery failure.
    public func flush(timeoutMilliseconds: Int32) throws(KafkaError) {
        let code = rd_kafka_flush(handle, timeoutMilliseconds)
        if let failure = box.deliveryFailures.first {
            box.deliveryFailures.removeAll()
            throw failure
        }
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else { throw KafkaError(code, operation: "flush") }
    }

    /// Asks the brokers for the number of partitions of each existing topic among `topics`.
    public func partitionCounts(topics: [String], timeoutMilliseconds: Int32) throws(KafkaError) -> [String: Int] {
        try fetchPartitionCounts(handle, topics: topics, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Asks a partition's leader for its log start and end.
    public func watermarks(topic: String, partition: Int32, timeoutMilliseconds: Int32) throws(KafkaError)
        -> KafkaWatermarks
    {
        try queryWatermarks(handle, topic: topic, partition: partition, timeoutMilliseconds: timeoutMilliseconds)
    }
}

/// Calls `body` with a pointer and length for optional bytes: NULL and 0 for nil.
private func withOptionalBytes<Result>(_ bytes: [UInt8]?, _ body: (UnsafeRawPointer?, Int) -> Result) -> Result {
    guard let bytes else { return body(nil, 0) }
    return bytes.withUnsafeBytes { buffer in
        // An empty array may have no base address; Kafka needs a non-NULL pointer for an empty value.
        var empty: UInt8 = 0
        if buffer.count == 0 { return withUnsafePointer(to: &empty) { body(UnsafeRawPointer($0), 0) } }
        return body(buffer.baseAddress, buffer.count)
    }
}

/// librdkafka calls this from `rd_kafka_poll` or `rd_kafka_flush`, on the producing thread.
private func recordDelivery(
    _ handle: OpaquePointer?, _ message: UnsafePointer<rd_kafka_message_t>?, _ opaque: UnsafeMutableRawPointer?
) {
    guard let message, message.pointee.err != RD_KAFKA_RESP_ERR_NO_ERROR, let box = CallbackBox.from(opaque) else {
        return
    }
    box.deliveryFailures.append(KafkaError(message.pointee.err, operation: "deliver"))
}
