import CLibPQ

/// The rows of a finished statement, in text format.
///
/// Owns its `PGresult` and frees it in `deinit`. Values are copied out on access, so they
/// stay valid after the result is gone.
public final class PostgresResult {
    private let handle: OpaquePointer

    private init(handle: OpaquePointer) {
        self.handle = handle
    }

    deinit {
        PQclear(handle)
    }

    /// Takes ownership of `result` and throws if the statement failed.
    static func checked(_ result: OpaquePointer?, connection: OpaquePointer, operation: String) throws(PostgresError)
        -> PostgresResult
    {
        guard let result else {
            // libpq returns NULL only for out-of-memory or a connection that cannot send.
            let lost = PQstatus(connection) != CONNECTION_OK
            throw PostgresError(
                kind: lost ? .connectionLost : .statementFailed, message: connectionErrorMessage(connection),
                operation: operation)
        }
        let status = PQresultStatus(result)
        switch status {
        case PGRES_COMMAND_OK, PGRES_TUPLES_OK, PGRES_EMPTY_QUERY:
            return PostgresResult(handle: result)
        default:
            defer { PQclear(result) }
            func field(_ code: UInt8) -> String? {
                PQresultErrorField(result, Int32(code)).map { String(cString: $0) }
            }
            let sqlState = field(UInt8(ascii: "C"))
            let lost = PQstatus(connection) != CONNECTION_OK
            let message =
                field(UInt8(ascii: "M"))
                ?? connectionErrorMessage(connection)
            throw PostgresError(
                kind: lost ? .connectionLost : .statementFailed,
                sqlState: sqlState,
                message: message,
                detail: field(UInt8(ascii: "D")),
                hint: field(UInt8(ascii: "H")),
                operation: operation)
        }
    }

    public var rowCount: Int { Int(PQntuples(handle)) }

    public var columnCount: Int { Int(PQnfields(handle)) }

    /// The number of rows a command changed, such as an INSERT's count; 0 when it reports none.
    public var affectedRows: Int {
        guard let text = PQcmdTuples(handle) else { return 0 }
        return Int(String(cString: text)) ?? 0
    }

    public func columnName(_ column: Int) -> String {
        String(cString: PQfname(handle, Int32(column)))
    }

    public func isNull(row: Int, column: Int) -> Bool {
        PQgetisnull(handle, Int32(row), Int32(column)) == 1
    }

    /// Returns the value's text, or nil for SQL NULL.
    public func string(row: Int, column: Int) -> String? {
        precondition(row < rowCount && column < columnCount, "cell (\(row), \(column)) is outside the result")
        if isNull(row: row, column: column) { return nil }
        guard let value = PQgetvalue(handle, Int32(row), Int32(column)) else { return nil }
        let length = Int(PQgetlength(handle, Int32(row), Int32(column)))
        return value.withMemoryRebound(to: UInt8.self, capacity: length) {
            String(decoding: UnsafeBufferPointer(start: $0, count: length), as: UTF8.self)
        }
    }

    /// Returns the value as an integer, or nil for SQL NULL.
    public func int(row: Int, column: Int) -> Int64? {
        string(row: row, column: column).flatMap { Int64($0) }
    }

    /// All rows as arrays of text values, for small results such as reports.
    public var rows: [[String?]] {
        (0..<rowCount).map { row in
            (0..<columnCount).map { column in string(row: row, column: column) }
        }
    }
}
