import Hashing
import JSON

/// A CloudEvent that passed validation, with what it contributes to each meter.
public struct AcceptedEvent: Sendable {
    public var key: EventKey
    public var type: String
    public var subject: String
    public var time: EventTime
    /// The `data` attribute, absent when the event has none.
    public var data: JSONValue?
    /// Every other attribute: the optional ones such as `datacontenttype`, and extensions.
    public var attributes: [JSONMember]
    /// SHA-256 of the canonical payload: the whole event with keys sorted, without whitespace.
    public var payloadSHA256: [UInt8]
    /// One reading per meter of the event's type; empty for an unmetered event.
    public var readings: [MeterReading]
}

/// The result of checking one message value.
public enum ValidationOutcome: Sendable {
    case accepted(AcceptedEvent)
    case rejected(Rejection)
}

/// The limits that validation applies.
public struct ValidationLimits: Sendable {
    /// Values longer than this are dead letters `payload_too_large`.
    public var maxPayloadBytes: Int
    /// Events older than this, relative to the clock, are dead letters `too_late`.
    public var dedupeWindowMicroseconds: Int64
    /// Events further ahead than this are dead letters `time_in_future`.
    public var maxFutureSkewMicroseconds: Int64

    public init(maxPayloadBytes: Int, dedupeWindowMicroseconds: Int64, maxFutureSkewMicroseconds: Int64) {
        self.maxPayloadBytes = maxPayloadBytes
        self.dedupeWindowMicroseconds = dedupeWindowMicroseconds
        self.maxFutureSkewMicroseconds = maxFutureSkewMicroseconds
    }
}

/// Checks message values against the CloudEvents 1.0 JSON format and the meters.
///
/// The checks run in a fixed order and the first failure decides the reason, so one input
/// always gets the same reason. Not thread-safe: it reuses a parser and a writer.
public final class EventValidator {
    /// The attributes that Tally requires, besides `specversion` and `time`.
    static let requiredStringAttributes = ["id", "source", "type", "subject"]
    /// Attributes with their own columns in the ledger; every other one is kept in `attributes`.
    static let ledgerColumns: Set<ByteString> = Set(
        ["specversion", "id", "source", "type", "subject", "time", "data"].map(ByteString.init))
    /// The longest `id`, `source`, `type` and `subject`, in bytes. They are indexed, and a
    /// PostgreSQL B-tree entry must stay under about 2.7 kB.
    public static let maxAttributeBytes = 1024
    /// Number literals past these sizes may not fit PostgreSQL's `numeric`, which `jsonb` uses.
    static let maxNumberLiteralLength = 1000
    static let maxNumberExponent = 10_000

    public let meters: MeterSet
    public let limits: ValidationLimits
    private let parser = JSONParser(maxDepth: 64)
    private let writer = JSONWriter()

    public init(meters: MeterSet, limits: ValidationLimits) {
        self.meters = meters
        self.limits = limits
    }

    /// Checks one message value. `now` is the clock reading for the batch.
    public func validate(_ value: [UInt8]?, now: EventTime) -> ValidationOutcome {
        guard let value else {
            return .rejected(Rejection(.nullValue, "the message value is null (a tombstone)"))
        }
        guard !value.isEmpty else {
            return .rejected(Rejection(.emptyValue, "the message value has zero bytes"))
        }
        guard value.count <= limits.maxPayloadBytes else {
            return .rejected(
                Rejection(
                    .payloadTooLarge, "the value has \(value.count) bytes; the limit is \(limits.maxPayloadBytes)"))
        }

        let root: JSONValue
        do {
            root = try parser.parse(value)
        } catch {
            return .rejected(rejection(for: error))
        }
        guard case .object = root else {
            return .rejected(
                Rejection(.notAnObject, "the value is a JSON \(root.typeName); a CloudEvent is a JSON object"))
        }
        if root.containsNULCharacter {
            return .rejected(
                Rejection(.nulCharacter, "a string or key contains U+0000, which PostgreSQL text cannot store"))
        }
        if let literal = firstUnstorableNumber(in: root) {
            return .rejected(
                Rejection(
                    .numberOutOfRange,
                    "the number \(quotedForDetail(literal)) is too long or its exponent too large for PostgreSQL jsonb")
            )
        }

        switch readEvent(root, now: now) {
        case .success(let event):
            return .accepted(event)
        case .failure(let rejection):
            return .rejected(rejection)
        }
    }

    private func readEvent(_ root: JSONValue, now: EventTime) -> Result<AcceptedEvent, Rejection> {
        switch root.member("specversion") {
        case nil:
            return .failure(Rejection(.missingAttribute, "specversion is missing"))
        case .string(let version)? where version.utf8.elementsEqual("1.0".utf8):
            break
        case .string(let version)?:
            return .failure(
                Rejection(
                    .unsupportedSpecversion, "specversion is \(quotedForDetail(version)); only \"1.0\" is supported"))
        case let other?:
            return .failure(Rejection(.invalidAttribute, "specversion is a JSON \(other.typeName), not a string"))
        }

        var strings: [String: String] = [:]
        for name in Self.requiredStringAttributes {
            switch root.member(name) {
            case nil:
                return .failure(Rejection(.missingAttribute, "\(name) is missing"))
            case .string(let text)? where text.utf8.count > Self.maxAttributeBytes:
                return .failure(
                    Rejection(
                        .invalidAttribute,
                        "\(name) has \(text.utf8.count) bytes; the limit is \(Self.maxAttributeBytes)"))
            case .string(let text)? where !text.isEmpty:
                strings[name] = text
            case .string?:
                return .failure(Rejection(.invalidAttribute, "\(name) is an empty string"))
            case let other?:
                return .failure(Rejection(.invalidAttribute, "\(name) is a JSON \(other.typeName), not a string"))
            }
        }
        let key = EventKey(source: strings["source"]!, id: strings["id"]!)
        let type = strings["type"]!
        let subject = strings["subject"]!

        if root.member("data") != nil, root.member("data_base64") != nil {
            return .failure(Rejection(.invalidAttribute, "data and data_base64 are both present", eventKey: key))
        }

        let time: EventTime
        switch root.member("time") {
        case nil:
            return .failure(Rejection(.missingAttribute, "time is missing", eventKey: key))
        case .string(let text)?:
            do {
                time = try EventTime.parseRFC3339(text)
            } catch {
                return .failure(
                    Rejection(.invalidTime, "time \(quotedForDetail(text)) is not RFC 3339: \(error)", eventKey: key))
            }
        case .number(let literal)?:
            return .failure(
                Rejection(
                    .invalidTime, "time is the number \(literal); epoch numbers are not accepted, use RFC 3339 text",
                    eventKey: key))
        case let other?:
            return .failure(
                Rejection(.invalidTime, "time is a JSON \(other.typeName), not an RFC 3339 string", eventKey: key))
        }

        let oldestAccepted = now.adding(microseconds: -limits.dedupeWindowMicroseconds)
        if time < oldestAccepted {
            return .failure(
                Rejection(
                    .tooLate, "time \(time) is before \(oldestAccepted), the start of the dedupe window", eventKey: key)
            )
        }
        let latestAccepted = now.adding(microseconds: limits.maxFutureSkewMicroseconds)
        if time > latestAccepted {
            return .failure(
                Rejection(
                    .timeInFuture, "time \(time) is after \(latestAccepted), the limit of the maximum future skew",
                    eventKey: key))
        }

        let readings: [MeterReading]
        switch meters.readings(type: type, event: root) {
        case .success(let values):
            readings = values
        case .failure(var rejection):
            rejection.eventKey = key
            return .failure(rejection)
        }

        guard case .object(let members) = root else { preconditionFailure("checked above") }
        let attributes = members.filter { !Self.ledgerColumns.contains(ByteString($0.key)) }

        writer.reset()
        writer.write(root, sortingKeys: true)
        let digest = writer.withBuffer { SHA256.digest($0) }

        return .success(
            AcceptedEvent(
                key: key, type: type, subject: subject, time: time, data: root.member("data"),
                attributes: attributes, payloadSHA256: digest, readings: readings))
    }

    private func rejection(for error: JSONParseError) -> Rejection {
        switch error {
        case .invalidUTF8, .unpairedSurrogate:
            return Rejection(.invalidUTF8, error.description)
        case .malformed:
            return Rejection(.malformedJSON, error.description)
        case .duplicateKey:
            return Rejection(.duplicateJSONKey, error.description)
        case .nestingTooDeep:
            return Rejection(.nestingTooDeep, error.description)
        }
    }

    /// Returns the first number literal that PostgreSQL's `numeric` may be unable to store.
    private func firstUnstorableNumber(in value: JSONValue) -> String? {
        switch value {
        case .number(let literal):
            if literal.utf8.count > Self.maxNumberLiteralLength { return literal }
            if let exponentStart = literal.utf8.firstIndex(where: { $0 == UInt8(ascii: "e") || $0 == UInt8(ascii: "E") }
            ) {
                let digits = literal.utf8[literal.utf8.index(after: exponentStart)...].filter {
                    $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")
                }
                let significant = digits.drop { $0 == UInt8(ascii: "0") }
                if significant.count > 5 { return literal }
                let exponent = significant.reduce(0) { $0 * 10 + Int($1 - UInt8(ascii: "0")) }
                if exponent > Self.maxNumberExponent { return literal }
            }
            return nil
        case .array(let elements):
            for element in elements {
                if let literal = firstUnstorableNumber(in: element) { return literal }
            }
            return nil
        case .object(let members):
            for member in members {
                if let literal = firstUnstorableNumber(in: member.value) { return literal }
            }
            return nil
        case .null, .bool, .string:
            return nil
        }
    }
}
