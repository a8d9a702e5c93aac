import Glibc

/// A parsed JSON document.
///
/// Numbers keep the literal text that appeared in the input, so no value passes through
/// `Double` and `0.1` stays `0.1`. Strings are valid UTF-8. Object members keep document
/// order, and their keys are unique byte for byte (the parser rejects duplicates).
///
/// Keys and strings are compared byte for byte everywhere in this module: Swift's `String`
/// equality treats canonically equivalent spellings as equal, and JSON does not.
public enum JSONValue: Sendable {
    case null
    case bool(Bool)
    /// The number literal exactly as written, for example `-0.1e3`.
    case number(String)
    case string(String)
    case array([JSONValue])
    case object([JSONMember])
}

/// One `"key": value` pair of a JSON object.
public struct JSONMember: Sendable {
    public var key: String
    public var value: JSONValue

    public init(key: String, value: JSONValue) {
        self.key = key
        self.value = value
    }
}

extension JSONValue {
    /// Returns the value of the member whose key has exactly the bytes of `key`, if this is an object.
    public func member(_ key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        for member in members where hasSameUTF8(member.key, key) {
            return member.value
        }
        return nil
    }

    /// The JSON type name, for error messages: `null`, `boolean`, `number`, `string`, `array` or `object`.
    public var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "boolean"
        case .number: return "number"
        case .string: return "string"
        case .array: return "array"
        case .object: return "object"
        }
    }

    /// Whether any string or object key in this value contains the character U+0000.
    public var containsNULCharacter: Bool {
        switch self {
        case .null, .bool, .number:
            return false
        case .string(let text):
            return containsNUL(text)
        case .array(let elements):
            return elements.contains { $0.containsNULCharacter }
        case .object(let members):
            return members.contains { containsNUL($0.key) || $0.value.containsNULCharacter }
        }
    }
}

/// Compares the UTF-8 bytes of two strings with `memcmp`. Native strings hand out their
/// storage without copying, which makes this much cheaper than comparing `utf8` views.
func hasSameUTF8(_ lhs: String, _ rhs: String) -> Bool {
    // The count of a native string is stored, so most keys differ without reading their bytes.
    guard lhs.utf8.count == rhs.utf8.count else { return false }
    var left = lhs
    var right = rhs
    return left.withUTF8 { leftBytes in
        right.withUTF8 { rightBytes in
            leftBytes.count == rightBytes.count
                && (leftBytes.count == 0
                    || memcmp(leftBytes.baseAddress!, rightBytes.baseAddress!, leftBytes.count) == 0)
        }
    }
}

func containsNUL(_ text: String) -> Bool {
    var text = text
    return text.withUTF8 { bytes in
        bytes.count > 0 && memchr(bytes.baseAddress!, 0, bytes.count) != nil
    }
}
