import CRdKafka

/// A log line from librdkafka, with its syslog level (0 emergency … 7 debug).
public struct KafkaLogRecord: Sendable {
    public var level: Int32
    public var facility: String
    public var message: String
    /// The client instance name, such as `rdkafka#consumer-1`.
    public var client: String
}

/// Handlers that librdkafka reaches through the configuration's opaque pointer.
///
/// `onLog` runs on librdkafka's internal threads, so it must be thread-safe. `onError` runs
/// on the thread that polls. The box is retained by the client that owns the `rd_kafka_t`
/// and outlives it, so the unretained opaque pointer stays valid for every callback.
final class CallbackBox: @unchecked Sendable {
    let onLog: (@Sendable (KafkaLogRecord) -> Void)?
    let onError: (@Sendable (KafkaError) -> Void)?
    /// The consumer that owns this box, for the rebalance callback. Read on the polling thread.
    weak var consumer: KafkaConsumer?
    /// Set and read only on the polling thread.
    weak var rebalanceHandler: (any KafkaRebalanceHandler)?
    /// Delivery failures seen by the producer's report callback, read on the flushing thread.
    var deliveryFailures: [KafkaError] = []

    init(onLog: (@Sendable (KafkaLogRecord) -> Void)?, onError: (@Sendable (KafkaError) -> Void)?) {
        self.onLog = onLog
        self.onError = onError
    }

    static func from(_ opaque: UnsafeMutableRawPointer?) -> CallbackBox? {
        opaque.map { Unmanaged<CallbackBox>.fromOpaque($0).takeUnretainedValue() }
    }
}

/// Builds an `rd_kafka_conf_t` from string properties and the callback box.
///
/// Every property goes to librdkafka unchanged, so any setting it supports (SASL, TLS,
/// timeouts) works without code here. The returned configuration belongs to the caller until
/// `rd_kafka_new` succeeds; on a thrown error nothing is left to free.
func makeConfiguration(_ properties: [(String, String)], box: CallbackBox) throws(KafkaError) -> OpaquePointer {
    guard let configuration = rd_kafka_conf_new() else {
        fatalError("rd_kafka_conf_new failed: out of memory")
    }
    var errorText = [CChar](repeating: 0, count: 512)
    for (name, value) in properties {
        let result = rd_kafka_conf_set(configuration, name, value, &errorText, errorText.count)
        guard result == RD_KAFKA_CONF_OK else {
            rd_kafka_conf_destroy(configuration)
            let detail = cBufferString(errorText)
            throw KafkaError.local("invalid librdkafka property \(name): \(detail)", operation: "configure")
        }
    }
    rd_kafka_conf_set_opaque(configuration, Unmanaged.passUnretained(box).toOpaque())
    rd_kafka_conf_set_log_cb(configuration, forwardLog)
    rd_kafka_conf_set_error_cb(configuration, forwardError)
    return configuration
}

/// Creates the client handle, which takes the configuration on success.
func makeHandle(_ type: rd_kafka_type_t, _ configuration: OpaquePointer) throws(KafkaError) -> OpaquePointer {
    var errorText = [CChar](repeating: 0, count: 512)
    guard let handle = rd_kafka_new(type, configuration, &errorText, errorText.count) else {
        rd_kafka_conf_destroy(configuration)
        throw KafkaError.local(cBufferString(errorText), operation: "create client")
    }
    return handle
}

/// Called by librdkafka on its internal threads.
private func forwardLog(
    _ handle: OpaquePointer?, _ level: Int32, _ facility: UnsafePointer<CChar>?, _ text: UnsafePointer<CChar>?
) {
    guard let handle, let box = CallbackBox.from(rd_kafka_opaque(handle)), let onLog = box.onLog else { return }
    onLog(
        KafkaLogRecord(
            level: level,
            facility: facility.map { String(cString: $0) } ?? "",
            message: text.map { String(cString: $0) } ?? "",
            client: String(cString: rd_kafka_name(handle))))
}

/// Called by librdkafka from the polling thread for errors that are not tied to one message.
private func forwardError(
    _ handle: OpaquePointer?, _ code: Int32, _ reason: UnsafePointer<CChar>?, _ opaque: UnsafeMutableRawPointer?
) {
    guard let box = CallbackBox.from(opaque), let onError = box.onError else { return }
    var isFatal = code == RD_KAFKA_RESP_ERR__FATAL.rawValue
    var message = reason.map { String(cString: $0) } ?? ""
    var errorCode = code
    if isFatal, let handle {
        var text = [CChar](repeating: 0, count: 512)
        errorCode = rd_kafka_fatal_error(handle, &text, text.count).rawValue
        message = cBufferString(text)
        isFatal = true
    }
    onError(KafkaError(code: errorCode, message: message, operation: "client", isFatal: isFatal))
}

/// Decodes a NUL-terminated C buffer that librdkafka filled in.
func cBufferString(_ buffer: [CChar]) -> String {
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return String(decoding: bytes, as: UTF8.self)
}

/// Checks one librdkafka property name and value without creating a client, and returns
/// librdkafka's error text when it rejects them. Checks that involve several properties
/// happen only when a client is created.
public func kafkaPropertyProblem(name: String, value: String) -> String? {
    guard let configuration = rd_kafka_conf_new() else {
        fatalError("rd_kafka_conf_new failed: out of memory")
    }
    defer { rd_kafka_conf_destroy(configuration) }
    var errorText = [CChar](repeating: 0, count: 512)
    guard rd_kafka_conf_set(configuration, name, value, &errorText, errorText.count) == RD_KAFKA_CONF_OK else {
        return cBufferString(errorText)
    }
    return nil
}
