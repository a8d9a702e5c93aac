import CLibPQ
import Glibc

/// A statement parameter: text, or binary for `bytea`.
public enum PostgresParameter: Sendable {
    case text(String)
    /// Raw bytes sent in binary format. Use it for `bytea`, where text format would need escaping.
    case bytes([UInt8])
}

/// One libpq connection, used by one thread at a time.
///
/// The connection owns its `PGconn` and closes it in `deinit` or `close()`. Every call blocks
/// the calling thread until the server responds, so callers run it on threads of their own,
/// never on Swift's concurrency pool.
public final class PostgresConnection {
    /// Owned by this object; nil once closed.
    var handle: OpaquePointer?
    private let noticeBox: NoticeBox

    /// Host, port, database and user of the open connection, for logs. It never contains a password.
    public let target: String

    /// Opens a connection.
    ///
    /// `conninfo` is a libpq connection string (`host=... dbname=...` or a `postgresql://` URI).
    /// Settings it leaves out come from libpq's `PG*` environment variables, so an empty
    /// string uses the environment alone. `connectTimeoutSeconds` applies unless `conninfo`
    /// or `PGCONNECT_TIMEOUT` sets its own.
    public init(
        conninfo: String, applicationName: String, connectTimeoutSeconds: Int = 10,
        onNotice: (@Sendable (String) -> Void)? = nil
    ) throws(PostgresError) {
        if conninfo.utf8.contains(0) {
            throw PostgresError(
                kind: .invalidParameter, message: "the connection string contains a NUL character",
                operation: "connect")
        }
        // Later keywords override earlier ones, and `dbname` is expanded as a whole connection
        // string, so the caller's settings win over the defaults before it. Text parameters
        // and results are UTF-8 in Swift, so the client encoding after it is not negotiable.
        var keywords = ["fallback_application_name", "dbname", "client_encoding"]
        var values = [applicationName, conninfo, "UTF8"]
        if getenvString("PGCONNECT_TIMEOUT") == nil {
            keywords.insert("connect_timeout", at: 0)
            values.insert(String(connectTimeoutSeconds), at: 0)
        }
        let connection = withCStringArray(keywords) { keywordPointers in
            withCStringArray(values) { valuePointers in
                PQconnectdbParams(keywordPointers, valuePointers, 1)
            }
        }
        guard let connection else {
            fatalError("PQconnectdbParams returned NULL: out of memory")
        }
        guard PQstatus(connection) == CONNECTION_OK else {
            let message = connectionErrorMessage(connection)
            PQfinish(connection)
            throw PostgresError(kind: .connectionFailed, message: message, operation: "connect")
        }

        self.handle = connection
        self.noticeBox = NoticeBox(onNotice)
        self.target = connectionTarget(connection)
        // The box lives as long as this object, and the receiver is only called during
        // calls on this connection, so the unretained pointer stays valid.
        PQsetNoticeReceiver(connection, receiveNotice, Unmanaged.passUnretained(noticeBox).toOpaque())
    }

    deinit {
        close()
    }

    /// Closes the connection. Later calls throw `connectionLost`.
    public func close() {
        if let handle {
            PQfinish(handle)
            self.handle = nil
        }
    }

    /// Whether libpq considers the connection usable.
    public var isOpen: Bool {
        guard let handle else { return false }
        return PQstatus(handle) == CONNECTION_OK
    }

    /// Whether a transaction block is open, so that ROLLBACK is needed before reuse.
    public var isInTransaction: Bool {
        guard let handle else { return false }
        let status = PQtransactionStatus(handle)
        return status == PQTRANS_INTRANS || status == PQTRANS_INERROR
    }

    /// Reads the server's encoding, such as `UTF8`.
    public func serverEncoding() throws(PostgresError) -> String {
        try execute("SHOW server_encoding").string(row: 0, column: 0) ?? ""
    }

    /// The server's major version, such as 15, or nil when closed.
    public var serverMajorVersion: Int? {
        guard let handle else { return nil }
        return Int(PQserverVersion(handle)) / 10000
    }

    /// Runs one statement with `$1`, `$2`, … parameters and returns its result.
    ///
    /// Text parameters that contain U+0000 are rejected before sending, because libpq passes
    /// text parameters as C strings and would cut them there without an error.
    @discardableResult
    public func execute(_ sql: String, _ parameters: [PostgresParameter?] = []) throws(PostgresError) -> PostgresResult
    {
        guard let handle else {
            throw PostgresError(kind: .connectionLost, message: "the connection is closed", operation: "execute")
        }
        for (index, parameter) in parameters.enumerated() {
            if case .text(let text)? = parameter, containsNUL(text) {
                throw PostgresError(
                    kind: .invalidParameter, message: "parameter $\(index + 1) contains a NUL character",
                    operation: "execute")
            }
        }

        let result = withParameterBuffers(parameters) { values, lengths, formats in
            PQexecParams(handle, sql, Int32(parameters.count), nil, values, lengths, formats, 0)
        }
        return try PostgresResult.checked(result, connection: handle, operation: "execute")
    }

    /// Runs one or more statements without parameters, such as a migration script.
    public func executeScript(_ sql: String) throws(PostgresError) {
        guard let handle else {
            throw PostgresError(kind: .connectionLost, message: "the connection is closed", operation: "execute")
        }
        _ = try PostgresResult.checked(PQexec(handle, sql), connection: handle, operation: "execute")
    }

    /// `name` quoted as an SQL identifier, for names that cannot be parameters (schemas, tables).
    public func quoteIdentifier(_ name: String) throws(PostgresError) -> String {
        guard let handle else {
            throw PostgresError(kind: .connectionLost, message: "the connection is closed", operation: "quote")
        }
        var name = name
        let quoted: UnsafeMutablePointer<CChar>? = name.withUTF8 { buffer in
            buffer.withMemoryRebound(to: CChar.self) { PQescapeIdentifier(handle, $0.baseAddress, $0.count) }
        }
        guard let quoted else {
            throw PostgresError(
                kind: .invalidParameter, message: connectionErrorMessage(handle), operation: "quote")
        }
        defer { PQfreemem(quoted) }
        return String(cString: quoted)
    }
}

/// Holds the notice callback for the C notice receiver.
private final class NoticeBox {
    let onNotice: (@Sendable (String) -> Void)?

    init(_ onNotice: (@Sendable (String) -> Void)?) {
        self.onNotice = onNotice
    }
}

/// libpq calls this on the thread that runs the statement which produced the notice.
private func receiveNotice(_ context: UnsafeMutableRawPointer?, _ result: OpaquePointer?) {
    guard let context, let result else { return }
    let box = Unmanaged<NoticeBox>.fromOpaque(context).takeUnretainedValue()
    guard let onNotice = box.onNotice else { return }
    let message = PQresultErrorField(result, Int32(UInt8(ascii: "M"))).map { String(cString: $0) } ?? ""
    onNotice(message)
}

func connectionErrorMessage(_ connection: OpaquePointer) -> String {
    guard let raw = PQerrorMessage(connection) else { return "unknown libpq error" }
    let text = String(cString: raw)
    // libpq ends messages with a newline and may stack several lines; keep them on one line.
    return text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters() }.joined(separator: "; ")
}

private func connectionTarget(_ connection: OpaquePointer) -> String {
    func field(_ value: UnsafeMutablePointer<CChar>?) -> String {
        value.map { String(cString: $0) } ?? ""
    }
    let host = field(PQhost(connection))
    let port = field(PQport(connection))
    let database = field(PQdb(connection))
    let user = field(PQuser(connection))
    return "host=\(host) port=\(port) dbname=\(database) user=\(user)"
}

/// Searches with `memchr`, because parameters can be several megabytes of JSON.
private func containsNUL(_ text: String) -> Bool {
    var text = text
    return text.withUTF8 { buffer in
        buffer.count > 0 && memchr(buffer.baseAddress!, 0, buffer.count) != nil
    }
}

private func getenvString(_ name: String) -> String? {
    getenv(name).map { String(cString: $0) }
}

/// Calls `body` with a NULL-terminated array of C strings that live for the call.
private func withCStringArray<Result>(
    _ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> Result
) -> Result {
    let copies = strings.map { strdup($0) }
    defer { copies.forEach { free($0) } }
    let pointers: [UnsafePointer<CChar>?] = copies.map { UnsafePointer($0) } + [nil]
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}

/// Calls `body` with libpq's three parallel parameter arrays: values, lengths and formats
/// (0 for text, 1 for binary). The buffers live for the call.
private func withParameterBuffers<Result>(
    _ parameters: [PostgresParameter?],
    _ body: (UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<Int32>?, UnsafePointer<Int32>?) -> Result
) -> Result {
    var storage: [UnsafeMutablePointer<CChar>?] = []
    var lengths: [Int32] = []
    var formats: [Int32] = []
    storage.reserveCapacity(parameters.count)
    defer { storage.forEach { free($0) } }

    for parameter in parameters {
        switch parameter {
        case nil:
            storage.append(nil)
            lengths.append(0)
            formats.append(0)
        case .text(let text)?:
            storage.append(strdup(text))
            lengths.append(0)
            formats.append(0)
        case .bytes(let bytes)?:
            let copy = malloc(max(bytes.count, 1))!.assumingMemoryBound(to: CChar.self)
            bytes.withUnsafeBytes { source in
                if let base = source.baseAddress { memcpy(copy, base, bytes.count) }
            }
            storage.append(copy)
            lengths.append(Int32(bytes.count))
            formats.append(1)
        }
    }
    let values: [UnsafePointer<CChar>?] = storage.map { UnsafePointer($0) }
    return values.withUnsafeBufferPointer { valueBuffer in
        lengths.withUnsafeBufferPointer { lengthBuffer in
            formats.withUnsafeBufferPointer { formatBuffer in
                body(valueBuffer.baseAddress, lengthBuffer.baseAddress, formatBuffer.baseAddress)
            }
        }
    }
}

extension StringProtocol {
    func trimmingCharacters() -> String {
        var view = Substring(self)
        while let first = view.first, first.isWhitespace { view.removeFirst() }
        while let last = view.last, last.isWhitespace { view.removeLast() }
        return String(view)
    }
}
