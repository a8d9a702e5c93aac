import CLibPQ

extension PostgresConnection {
    /// Runs a `COPY … FROM STDIN` statement with `data` as its input, in the format that the
    /// statement names, and returns the number of rows copied.
    ///
    /// The data is sent in chunks of at most 1 MiB. A failure of the statement, such as a value
    /// that its column rejects, throws with the server's SQLSTATE, as `execute` does.
    @discardableResult
    public func copyIn(_ sql: String, data: [UInt8]) throws(PostgresError) -> Int {
        guard let handle else {
            throw PostgresError(kind: .connectionLost, message: "the connection is closed", operation: "copy")
        }
        let start = PQexec(handle, sql)
        guard let start, PQresultStatus(start) == PGRES_COPY_IN else {
            // An error, or a statement that is not COPY FROM STDIN.
            let result = try PostgresResult.checked(start, connection: handle, operation: "copy")
            preconditionFailure("copyIn needs a COPY FROM STDIN statement; the server returned \(result.rowCount) rows")
        }
        PQclear(start)

        let chunkBytes = 1 << 20
        var sent = true
        data.withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let length = min(chunkBytes, buffer.count - offset)
                let pointer = (buffer.baseAddress! + offset).assumingMemoryBound(to: CChar.self)
                if PQputCopyData(handle, pointer, Int32(length)) != 1 {
                    sent = false
                    return
                }
                offset += length
            }
        }
        // An error message instead of NULL makes the server abandon the COPY.
        _ = PQputCopyEnd(handle, sent ? nil : "the client could not send the COPY data")

        // The COPY's own result comes first; later ones are drained so the connection is idle again.
        var outcome: Result<PostgresResult, PostgresError>?
        while let result = PQgetResult(handle) {
            guard outcome == nil else {
                PQclear(result)
                continue
            }
            do throws(PostgresError) {
                outcome = .success(try PostgresResult.checked(result, connection: handle, operation: "copy"))
            } catch {
                outcome = .failure(error)
            }
        }
        switch outcome {
        case .success(let result):
            return result.affectedRows
        case .failure(let error):
            throw error
        case nil:
            throw PostgresError(
                kind: PQstatus(handle) == CONNECTION_OK ? .statementFailed : .connectionLost,
                message: connectionErrorMessage(handle), operation: "copy")
        }
    }
}

/// Rows for `COPY … FROM STDIN` in PostgreSQL's text format: tab-separated columns, one row a
/// line, `\N` for NULL, and backslash, tab, newline and carriage return escaped in values.
public struct CopyTextRows {
    public private(set) var bytes: [UInt8] = []
    public private(set) var rowCount = 0
    private var columnsInRow = 0

    public init(reservingBytes capacity: Int = 0) {
        bytes.reserveCapacity(capacity)
    }

    /// Appends a text value, escaped, or NULL for nil.
    public mutating func append(_ value: String?) {
        startColumn()
        guard var value else {
            bytes.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "N")])
            return
        }
        value.withUTF8 { appendEscaped($0) }
    }

    /// Appends UTF-8 text, escaped.
    public mutating func append(utf8 buffer: UnsafeBufferPointer<UInt8>) {
        startColumn()
        appendEscaped(buffer)
    }

    public mutating func append(_ value: Int64?) {
        guard let value else { return append(nil as String?) }
        startColumn()
        bytes.append(contentsOf: String(value).utf8)
    }

    /// Appends a `bytea` value in hexadecimal form (`\x…`).
    public mutating func append(bytea value: [UInt8]) {
        startColumn()
        let digits: StaticString = "0123456789abcdef"
        // The backslash of `\x` is doubled, because the text format unescapes it once.
        bytes.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\"), UInt8(ascii: "x")])
        digits.withUTF8Buffer { hex in
            for byte in value {
                bytes.append(hex[Int(byte >> 4)])
                bytes.append(hex[Int(byte & 0x0F)])
            }
        }
    }

    /// Ends the current row.
    public mutating func endRow() {
        bytes.append(UInt8(ascii: "\n"))
        rowCount += 1
        columnsInRow = 0
    }

    private mutating func startColumn() {
        if columnsInRow > 0 { bytes.append(UInt8(ascii: "\t")) }
        columnsInRow += 1
    }

    /// Appends the bytes, copying the runs between escaped bytes in one piece each.
    private mutating func appendEscaped(_ buffer: UnsafeBufferPointer<UInt8>) {
        var runStart = 0
        for index in 0..<buffer.count {
            let escape: UInt8
            switch buffer[index] {
            case UInt8(ascii: "\\"): escape = UInt8(ascii: "\\")
            case UInt8(ascii: "\t"): escape = UInt8(ascii: "t")
            case UInt8(ascii: "\n"): escape = UInt8(ascii: "n")
            case UInt8(ascii: "\r"): escape = UInt8(ascii: "r")
            default: continue
            }
            bytes.append(contentsOf: UnsafeBufferPointer(rebasing: buffer[runStart..<index]))
            bytes.append(UInt8(ascii: "\\"))
            bytes.append(escape)
            runStart = index + 1
        }
        bytes.append(contentsOf: UnsafeBufferPointer(rebasing: buffer[runStart...]))
    }
}
