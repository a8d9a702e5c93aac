import CRdKafka

/// Sends a metadata request and returns the partition count of each existing topic among `topics`.
func fetchPartitionCounts(_ handle: OpaquePointer, topics: [String], timeoutMilliseconds: Int32) throws(KafkaError)
    -> [String: Int]
{
    var metadata: UnsafePointer<rd_kafka_metadata>?
    // Asking for all topics avoids creating topic handles. The response is filtered below.
    let code = rd_kafka_metadata(handle, 1, nil, &metadata, timeoutMilliseconds)
    guard code == RD_KAFKA_RESP_ERR_NO_ERROR, let metadata else {
        throw KafkaError(code, operation: "metadata")
    }
    defer { rd_kafka_metadata_destroy(metadata) }

    var counts: [String: Int] = [:]
    let requested = Set(topics)
    for index in 0..<Int(metadata.pointee.topic_cnt) {
        let topic = metadata.pointee.topics[index]
        let name = String(cString: topic.topic)
        guard requested.contains(name), topic.err == RD_KAFKA_RESP_ERR_NO_ERROR else { continue }
        counts[name] = Int(topic.partition_cnt)
    }
    return counts
}

/// Asks a partition's leader for its log start and end.
func queryWatermarks(_ handle: OpaquePointer, topic: String, partition: Int32, timeoutMilliseconds: Int32)
    throws(KafkaError) -> KafkaWatermarks
{
    var low: Int64 = 0
    var high: Int64 = 0
    let code = rd_kafka_query_watermark_offsets(handle, topic, partition, &low, &high, timeoutMilliseconds)
    guard code == RD_KAFKA_RESP_ERR_NO_ERROR else {
        var error = KafkaError(code, operation: "query watermarks")
        error.message += " (\(topic)[\(partition)])"
        throw error
    }
    return KafkaWatermarks(low: low, high: high)
}
