import Glibc

/// A string that compares and hashes by its UTF-8 bytes.
///
/// Swift's `String` equality treats canonically equivalent spellings as equal ("é" as one
/// scalar equals "e" plus a combining accent), while PostgreSQL and the CloudEvents spec
/// compare bytes. Every in-memory map keyed by event data uses this type, so two keys that
/// PostgreSQL keeps apart are never merged in memory.
public struct ByteString: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let string: String

    public init(_ string: String) {
        self.string = string
    }

    public static func == (lhs: ByteString, rhs: ByteString) -> Bool {
        compareBytes(lhs.string, rhs.string) == 0
    }

    public func hash(into hasher: inout Hasher) {
        // Native strings hand out their UTF-8 storage without copying.
        var text = string
        text.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
        hasher.combine(0xFF as UInt8)  // not a UTF-8 byte, so it ends the key unambiguously
    }

    /// Byte order, as PostgreSQL's "C" collation sorts.
    public static func < (lhs: ByteString, rhs: ByteString) -> Bool {
        compareBytes(lhs.string, rhs.string) < 0
    }

    public var description: String { string }
}

/// Compares the UTF-8 bytes of two strings: negative, zero or positive as `memcmp`, and a
/// prefix before the longer string.
private func compareBytes(_ lhs: String, _ rhs: String) -> Int {
    var left = lhs
    var right = rhs
    return left.withUTF8 { leftBytes in
        right.withUTF8 { rightBytes in
            let common = min(leftBytes.count, rightBytes.count)
            if common > 0 {
                let order = memcmp(leftBytes.baseAddress!, rightBytes.baseAddress!, common)
                if order != 0 { return Int(order) }
            }
            return leftBytes.count - rightBytes.count
        }
    }
}

/// An event's idempotency key: its `source` and `id`, which CloudEvents defines as its identity.
public struct EventKey: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let source: ByteString
    public let id: ByteString

    public init(source: String, id: String) {
        self.source = ByteString(source)
        self.id = ByteString(id)
    }

    public static func < (lhs: EventKey, rhs: EventKey) -> Bool {
        (lhs.source, lhs.id) < (rhs.source, rhs.id)
    }

    public var description: String { "(source \(source.string), id \(id.string))" }
}
