/// The stable code stored with every dead letter. Operators filter and alert on these
/// strings, so a code is never renamed once released.
public enum RejectionReason: String, Sendable, CaseIterable, Comparable {
    /// The value is a tombstone (null).
    case nullValue = "null_value"
    /// The value has zero bytes.
    case emptyValue = "empty_value"
    /// The value is larger than `ingest.max_payload_bytes`.
    case payloadTooLarge = "payload_too_large"
    /// The bytes are not valid UTF-8, or a string escapes half of a UTF-16 surrogate pair.
    case invalidUTF8 = "invalid_utf8"
    /// The value is not JSON.
    case malformedJSON = "malformed_json"
    /// An object has the same key twice; parsers disagree on which copy wins.
    case duplicateJSONKey = "duplicate_json_key"
    /// Arrays and objects are nested deeper than the parser allows.
    case nestingTooDeep = "nesting_too_deep"
    /// The JSON value is not an object, so it cannot be a CloudEvent.
    case notAnObject = "not_an_object"
    /// A number cannot be stored in PostgreSQL's `jsonb`.
    case numberOutOfRange = "number_out_of_range"
    /// A string or key contains U+0000, which PostgreSQL text cannot store.
    case nulCharacter = "nul_character"
    /// `specversion` is not "1.0".
    case unsupportedSpecversion = "unsupported_specversion"
    /// A required attribute is absent.
    case missingAttribute = "missing_attribute"
    /// An attribute has the wrong type or is an empty string.
    case invalidAttribute = "invalid_attribute"
    /// `time` is not an RFC 3339 date-time with a zone offset.
    case invalidTime = "invalid_time"
    /// `time` is older than the dedupe window, so a duplicate could no longer be recognized.
    case tooLate = "too_late"
    /// `time` is further ahead than the maximum future skew.
    case timeInFuture = "time_in_future"
    /// A meter's value is missing, not a number, or beyond the documented precision.
    case invalidValue = "invalid_value"
    /// The idempotency key was accepted before with a different payload.
    case duplicateIDConflict = "duplicate_id_conflict"
    /// PostgreSQL refused to store the event although it passed validation.
    case storageRejected = "storage_rejected"

    public static func < (lhs: RejectionReason, rhs: RejectionReason) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// The reason and explanation of one dead letter.
public struct Rejection: Error, Sendable {
    public var reason: RejectionReason
    /// A readable explanation naming the attribute or value at fault.
    public var detail: String
    /// The event's (source, id), when they could be read.
    public var eventKey: EventKey?
    /// For a conflict: the ledger row of the event accepted first.
    public var originalLedgerID: Int64?

    public init(_ reason: RejectionReason, _ detail: String, eventKey: EventKey? = nil, originalLedgerID: Int64? = nil)
    {
        self.reason = reason
        self.detail = detail
        self.eventKey = eventKey
        self.originalLedgerID = originalLedgerID
    }
}
