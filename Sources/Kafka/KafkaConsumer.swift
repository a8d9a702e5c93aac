import CRdKafka
import Glibc

/// Receives a consumer group's rebalances. Both methods run on the thread that polls, inside
/// `KafkaConsumer.poll` or `close`, before librdkafka goes on.
public protocol KafkaRebalanceHandler: AnyObject {
    /// Decides where the assigned partitions start. Partitions left out of the result are not
    /// consumed by this member until the next rebalance.
    func partitionsAssigned(_ partitions: [KafkaTopicPartition]) -> KafkaAssignment

    /// Called before the partitions are given up. With `lost`, another member may already own
    /// them, as after a session timeout, so nothing may be committed for them.
    func partitionsRevoked(_ partitions: [KafkaTopicPartition], lost: Bool)
}

/// The action a member takes on newly assigned partitions.
public struct KafkaAssignment: Sendable {
    /// Partitions to fetch from their offsets at once. They are resumed explicitly, because
    /// librdkafka keeps an application pause across a revocation and a new assignment.
    public var start: [KafkaTopicPartition]
    /// Partitions to assign at their offsets but keep paused until the application resumes
    /// them, for example while their start offsets cannot be read yet.
    public var paused: [KafkaTopicPartition]

    public init(start: [KafkaTopicPartition], paused: [KafkaTopicPartition] = []) {
        self.start = start
        self.paused = paused
    }
}

/// The result of one poll.
public enum KafkaPollResult: Sendable {
    case message(KafkaMessage)
    /// A consumer error, for one partition when `partition` is set.
    case error(KafkaError, partition: KafkaTopicPartition?)
}

/// A high-level consumer over one `rd_kafka_t`.
///
/// Call `poll` and everything else from one thread, which also runs the rebalance handler.
/// The consumer owns its handle and destroys it in `deinit`; call `close()` first to leave
/// the group cleanly.
public final class KafkaConsumer {
    /// Owned by this object.
    private let handle: OpaquePointer
    /// Owned by this object; librdkafka's opaque pointer refers to it.
    private let box: CallbackBox
    private var isClosed = false
    /// Whether `close` gave up before the group was left, so `deinit` must not try again.
    private var closeTimedOut = false
    /// The topics of the current subscription, to skip a subscribe that changes nothing.
    private var subscribedTopics: [String]?
    /// Whether the rebalance callback has received an assignment, even an empty one.
    private var hasSeenAssignment = false
    /// Whether the group uses the cooperative protocol, as of the last rebalance; before the
    /// first one, whether the configured assignor is cooperative.
    private var isCooperative: Bool

    /// Creates a consumer. `properties` go to librdkafka as they are; they must include
    /// `bootstrap.servers` and, for `subscribe`, `group.id`.
    public init(
        properties: [(String, String)],
        onLog: (@Sendable (KafkaLogRecord) -> Void)? = nil,
        onError: (@Sendable (KafkaError) -> Void)? = nil
    ) throws(KafkaError) {
        let box = CallbackBox(onLog: onLog, onError: onError)
        isCooperative =
            properties.last { $0.0 == "partition.assignment.strategy" }?.1.contains("cooperative-sticky") ?? false
        let configuration = try makeConfiguration(properties, box: box)
        rd_kafka_conf_set_rebalance_cb(configuration, handleRebalance)
        handle = try makeHandle(RD_KAFKA_CONSUMER, configuration)
        self.box = box
        box.consumer = self
        // Serve rebalances and errors from the consumer queue, so that `poll` delivers them.
        rd_kafka_poll_set_consumer(handle)
    }

    deinit {
        if subscribedTopics != nil && !hasSeenAssignment {
            // librdkafka 2.0.2 fails an assertion in rd_kafka_destroy, inside
            // rd_kafka_sticky_assignor_state_destroy, when a cooperative-sticky member that
            // joined a group is destroyed before its first assignment. The handle is therefore
            // left to the process. It has left the group once close() returned.
            if !isClosed { _ = rd_kafka_consumer_close(handle) }
            return
        }
        if closeTimedOut {
            rd_kafka_destroy_flags(handle, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE)
            return
        }
        if !isClosed {
            // Leaving without close() is allowed but gives up the group membership abruptly.
            _ = rd_kafka_consumer_close(handle)
        }
        rd_kafka_destroy(handle)
    }

    /// The object that receives rebalances. The consumer does not retain it.
    public var rebalanceHandler: (any KafkaRebalanceHandler)? {
        get { box.rebalanceHandler }
        set { box.rebalanceHandler = newValue }
    }

    /// librdkafka's instance name, such as `rdkafka#consumer-1`.
    public var name: String {
        String(cString: rd_kafka_name(handle))
    }

    /// Joins the consumer group for `topics`. The partitions arrive through the rebalance handler.
    /// Subscribing again to the same topics does nothing, because every subscribe starts a
    /// rebalance of the whole group.
    public func subscribe(topics: [String]) throws(KafkaError) {
        guard subscribedTopics != topics else { return }
        let list = TopicPartitionList(topics.map { KafkaTopicPartition(topic: $0, partition: RD_KAFKA_PARTITION_UA) })
        let code = rd_kafka_subscribe(handle, list.pointer)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else {
            throw KafkaError(code, operation: "subscribe")
        }
        subscribedTopics = topics
    }

    /// Consumes exactly these partitions from their offsets, outside any group rebalance.
    public func assign(_ partitions: [KafkaTopicPartition]) throws(KafkaError) {
        let list = TopicPartitionList(partitions)
        let code = rd_kafka_assign(handle, list.pointer)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else {
            throw KafkaError(code, operation: "assign")
        }
    }

    /// Waits up to `timeoutMilliseconds` for a message or an error. Rebalances that arrive
    /// meanwhile are handled before this returns.
    public func poll(timeoutMilliseconds: Int32) -> KafkaPollResult? {
        guard let message = rd_kafka_consumer_poll(handle, timeoutMilliseconds) else { return nil }
        defer { rd_kafka_message_destroy(message) }

        let code = message.pointee.err
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else {
            let text = rd_kafka_message_errstr(message).map { String(cString: $0) } ?? ""
            let error = KafkaError(code: code.rawValue, message: text, operation: "consume")
            let partition = message.pointee.rkt.map {
                KafkaTopicPartition(
                    topic: String(cString: rd_kafka_topic_name($0)), partition: message.pointee.partition,
                    offset: message.pointee.offset)
            }
            return .error(error, partition: partition)
        }
        return .message(KafkaMessage(copying: message))
    }

    /// Moves the fetch position of assigned partitions to the given offsets.
    public func seek(_ partitions: [KafkaTopicPartition], timeoutMilliseconds: Int32) throws(KafkaError) {
        let list = TopicPartitionList(partitions)
        if let error = rd_kafka_seek_partitions(handle, list.pointer, timeoutMilliseconds) {
            throw KafkaError(consuming: error, operation: "seek")
        }
        if let error = TopicPartitionList.firstError(in: list.pointer, operation: "seek") {
            throw error
        }
    }

    /// Stops fetching from the partitions until `resume`.
    public func pause(_ partitions: [KafkaTopicPartition]) throws(KafkaError) {
        let list = TopicPartitionList(partitions)
        let code = rd_kafka_pause_partitions(handle, list.pointer)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else { throw KafkaError(code, operation: "pause") }
    }

    public func resume(_ partitions: [KafkaTopicPartition]) throws(KafkaError) {
        let list = TopicPartitionList(partitions)
        let code = rd_kafka_resume_partitions(handle, list.pointer)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else { throw KafkaError(code, operation: "resume") }
    }

    /// Commits offsets (the next offset to read) to the group coordinator. With `async`, it
    /// returns at once and a failure only reaches the log.
    public func commit(_ offsets: [KafkaTopicPartition], async: Bool) throws(KafkaError) {
        guard !offsets.isEmpty else { return }
        let list = TopicPartitionList(offsets)
        let code = rd_kafka_commit(handle, list.pointer, async ? 1 : 0)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else { throw KafkaError(code, operation: "commit") }
    }

    /// Fetches the offsets the group has committed for the partitions, nil where none is committed.
    public func committedOffsets(_ partitions: [KafkaTopicPartition], timeoutMilliseconds: Int32) throws(KafkaError)
        -> [KafkaTopicPartition]
    {
        let list = TopicPartitionList(partitions)
        let code = rd_kafka_committed(handle, list.pointer, timeoutMilliseconds)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else { throw KafkaError(code, operation: "committed") }
        return TopicPartitionList.entries(of: list.pointer).map { entry in
            var entry = entry
            if let offset = entry.offset, offset < 0 { entry.offset = nil }
            return entry
        }
    }

    /// Returns the partitions currently assigned to this consumer.
    public func assignment() throws(KafkaError) -> [KafkaTopicPartition] {
        var list: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?
        let code = rd_kafka_assignment(handle, &list)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR, let list else { throw KafkaError(code, operation: "assignment") }
        defer { rd_kafka_topic_partition_list_destroy(list) }
        return TopicPartitionList.entries(of: list).map {
            KafkaTopicPartition(topic: $0.topic, partition: $0.partition)
        }
    }

    /// Asks the brokers for the number of partitions of each topic among `topics`. A topic
    /// that does not exist is left out. Throws when no broker responds in time.
    public func partitionCounts(topics: [String], timeoutMilliseconds: Int32) throws(KafkaError) -> [String: Int] {
        try fetchPartitionCounts(handle, topics: topics, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Asks a partition's leader for its log start and end.
    public func watermarks(topic: String, partition: Int32, timeoutMilliseconds: Int32) throws(KafkaError)
        -> KafkaWatermarks
    {
        try queryWatermarks(handle, topic: topic, partition: partition, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Returns the log start and end that the partition's leader reported in the last fetch
    /// response, without a request to the broker. Returns nil before the first fetch.
    public func cachedWatermarks(topic: String, partition: Int32) -> KafkaWatermarks? {
        var low: Int64 = -1
        var high: Int64 = -1
        let code = rd_kafka_get_watermark_offsets(handle, topic, partition, &low, &high)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR, low >= 0, high >= 0 else { return nil }
        return KafkaWatermarks(low: low, high: high)
    }

    /// Looks up, per partition, the earliest offset whose message timestamp is at or after
    /// the given time (ListOffsets by timestamp). Each entry's `offset` is the time in
    /// milliseconds since the Unix epoch on input. On output it is the offset found, or -1
    /// where the broker returned none: the time is after the partition's last message, or the
    /// broker does not implement the lookup (librdkafka 2.0.2's mock cluster returns -1).
    public func offsetsForTimes(_ partitions: [KafkaTopicPartition], timeoutMilliseconds: Int32) throws(KafkaError)
        -> [KafkaTopicPartition]
    {
        let list = TopicPartitionList(partitions)
        let code = rd_kafka_offsets_for_times(handle, list.pointer, timeoutMilliseconds)
        guard code == RD_KAFKA_RESP_ERR_NO_ERROR else { throw KafkaError(code, operation: "offsets for times") }
        if let error = TopicPartitionList.firstError(in: list.pointer, operation: "offsets for times") {
            throw error
        }
        return TopicPartitionList.entries(of: list.pointer)
    }

    /// Leaves the group: the rebalance handler receives the revocation, then the consumer
    /// stops. Call it once, from the polling thread.
    ///
    /// Leaving waits for the group coordinator, which may be unreachable. After
    /// `timeoutMilliseconds` this gives up and returns false. The coordinator then notices
    /// the departure after `session.timeout.ms`, and the handle is destroyed without another
    /// attempt to leave.
    @discardableResult
    public func close(timeoutMilliseconds: Int64 = 60_000) throws(KafkaError) -> Bool {
        guard !isClosed else { return true }
        isClosed = true
        guard let queue = rd_kafka_queue_new(handle) else {
            let code = rd_kafka_consumer_close(handle)
            guard code == RD_KAFKA_RESP_ERR_NO_ERROR else { throw KafkaError(code, operation: "close") }
            return true
        }
        defer { rd_kafka_queue_destroy(queue) }
        if let error = rd_kafka_consumer_close_queue(handle, queue) {
            throw KafkaError(consuming: error, operation: "close")
        }
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        let start = Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000
        while rd_kafka_consumer_closed(handle) == 0 {
            clock_gettime(CLOCK_MONOTONIC, &spec)
            let elapsed = Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000 - start
            if elapsed >= timeoutMilliseconds {
                closeTimedOut = true
                return false
            }
            // The final revocation arrives as an event on the queue. Serving the queue with
            // callbacks instead fails an assertion in librdkafka 2.0.2 on ops it passes on.
            guard let event = rd_kafka_queue_poll(queue, Int32(min(100, timeoutMilliseconds - elapsed))) else {
                continue
            }
            if rd_kafka_event_type(event) == RD_KAFKA_EVENT_REBALANCE,
                let partitions = rd_kafka_event_topic_partition_list(event)
            {
                applyRebalance(rd_kafka_event_error(event), partitions)
            }
            rd_kafka_event_destroy(event)
        }
        return true
    }

    // MARK: Rebalance

    fileprivate func applyRebalance(
        _ code: rd_kafka_resp_err_t, _ partitions: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>
    ) {
        let entries = TopicPartitionList.entries(of: partitions)
        // librdkafka returns NULL while the group is terminating. The protocol of the last
        // rebalance then still applies.
        if let name = rd_kafka_rebalance_protocol(handle) {
            isCooperative = String(cString: name) == "COOPERATIVE"
        }

        switch code {
        case RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS:
            hasSeenAssignment = true
            let decision =
                box.rebalanceHandler?.partitionsAssigned(entries)
                ?? KafkaAssignment(
                    start: entries.map {
                        KafkaTopicPartition(topic: $0.topic, partition: $0.partition, offset: KafkaOffset.beginning)
                    })
            let list = TopicPartitionList(decision.start + decision.paused)
            if isCooperative {
                if let error = rd_kafka_incremental_assign(handle, list.pointer) {
                    reportRebalanceFailure(KafkaError(consuming: error, operation: "incremental assign"))
                }
            } else {
                let code = rd_kafka_assign(handle, list.pointer)
                if code != RD_KAFKA_RESP_ERR_NO_ERROR {
                    reportRebalanceFailure(KafkaError(code, operation: "assign"))
                }
            }
            // An application pause outlives a revocation in librdkafka, so a partition paused
            // before it was revoked would stay paused when assigned again. Set both states.
            do {
                if !decision.paused.isEmpty { try pause(decision.paused) }
                if !decision.start.isEmpty { try resume(decision.start) }
            } catch {
                reportRebalanceFailure(error)
            }

        case RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS:
            let lost = rd_kafka_assignment_lost(handle) != 0
            box.rebalanceHandler?.partitionsRevoked(entries, lost: lost)
            if isCooperative {
                if let error = rd_kafka_incremental_unassign(handle, partitions) {
                    reportRebalanceFailure(KafkaError(consuming: error, operation: "incremental unassign"))
                }
            } else {
                let code = rd_kafka_assign(handle, nil)
                if code != RD_KAFKA_RESP_ERR_NO_ERROR {
                    reportRebalanceFailure(KafkaError(code, operation: "unassign"))
                }
            }

        default:
            // A failed rebalance: drop the whole assignment, as librdkafka requires.
            reportRebalanceFailure(KafkaError(code, operation: "rebalance"))
            box.rebalanceHandler?.partitionsRevoked(entries, lost: true)
            _ = rd_kafka_assign(handle, nil)
        }
    }

    private func reportRebalanceFailure(_ error: KafkaError) {
        box.onError?(error)
    }
}

/// librdkafka calls this from inside `rd_kafka_consumer_poll` or `rd_kafka_consumer_close`,
/// on the polling thread, with the consumer's callback box as the opaque pointer.
private func handleRebalance(
    _ handle: OpaquePointer?, _ code: rd_kafka_resp_err_t,
    _ partitions: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?, _ opaque: UnsafeMutableRawPointer?
) {
    if let partitions, let consumer = CallbackBox.from(opaque)?.consumer {
        consumer.applyRebalance(code, partitions)
        return
    }
    // The consumer is being destroyed: take librdkafka's default action so the group does not stall.
    let isCooperative = rd_kafka_rebalance_protocol(handle).map { String(cString: $0) == "COOPERATIVE" } ?? false
    switch (code, isCooperative) {
    case (RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, true):
        if let error = rd_kafka_incremental_assign(handle, partitions) { rd_kafka_error_destroy(error) }
    case (RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, false):
        _ = rd_kafka_assign(handle, partitions)
    case (_, true):
        if let error = rd_kafka_incremental_unassign(handle, partitions) { rd_kafka_error_destroy(error) }
    case (_, false):
        _ = rd_kafka_assign(handle, nil)
    }
}
