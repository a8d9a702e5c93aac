/// A failure reported by libpq or by the PostgreSQL server.
///
/// `description` is safe to log: it contains the operation, the SQLSTATE and the server's
/// message, never the SQL text, parameter values or a password.
public struct PostgresError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// Opening the connection failed.
        case connectionFailed
        /// The connection was lost, or the server is shutting down.
        case connectionLost
        /// The server rejected a statement.
        case statementFailed
        /// A text parameter contained U+0000, which libpq would silently cut off.
        case invalidParameter
    }

    public var kind: Kind
    /// The five-character SQLSTATE code, when the server sent one.
    public var sqlState: String?
    /// The primary message from the server or libpq.
    public var message: String
    public var detail: String?
    public var hint: String?
    /// The operation that failed, such as "connect" or "execute".
    public var operation: String

    public init(
        kind: Kind, sqlState: String? = nil, message: String, detail: String? = nil, hint: String? = nil,
        operation: String
    ) {
        self.kind = kind
        self.sqlState = sqlState
        self.message = message
        self.detail = detail
        self.hint = hint
        self.operation = operation
    }

    public var description: String {
        var text = "PostgreSQL \(operation) failed"
        if let sqlState { text += " (SQLSTATE \(sqlState))" }
        text += ": \(message)"
        return text
    }

    /// The SQLSTATE class: the first two characters, for example "08" for connection exceptions.
    public var sqlStateClass: String? {
        sqlState.map { String($0.prefix(2)) }
    }

    /// A serialization failure (40001) or a deadlock (40P01): the transaction can be retried as a whole.
    public var isTransactionConflict: Bool {
        sqlState == "40001" || sqlState == "40P01"
    }

    /// Whether the connection is unusable: lost, refused, or the server is going down.
    ///
    /// Class 08 is a connection exception, and 57P01 to 57P03 are admin shutdown, crash
    /// shutdown and "cannot connect now", which a restarting server sends.
    public var isConnectionProblem: Bool {
        if kind == .connectionFailed || kind == .connectionLost { return true }
        guard let sqlState else { return false }
        return sqlState.hasPrefix("08") || ["57P01", "57P02", "57P03"].contains(sqlState)
    }
}
