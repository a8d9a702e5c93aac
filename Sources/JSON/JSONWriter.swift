import CYajl

/// Writes compact JSON text through yajl's generator.
///
/// The caller must produce a well-formed sequence (a key before each object value, closes
/// matching opens); a wrong sequence is a bug and traps. Strings must be valid UTF-8, which
/// Swift's `String` guarantees. Number literals are written unchanged, so they must already
/// be valid JSON numbers.
///
/// A writer is not thread-safe. `reset()` reuses its buffer for the next document.
public final class JSONWriter {
    /// Owned by this writer and freed in `deinit`.
    private let generator: yajl_gen

    public init() {
        guard let generator = yajl_gen_alloc(nil) else {
            fatalError("yajl_gen_alloc failed: out of memory")
        }
        self.generator = generator
    }

    deinit {
        yajl_gen_free(generator)
    }

    /// Discards the text written so far.
    public func reset() {
        yajl_gen_reset(generator, nil)
        yajl_gen_clear(generator)
    }

    /// The text written so far, as UTF-8 bytes.
    public var bytes: [UInt8] {
        withBuffer { Array($0) }
    }

    /// The text written so far.
    public var text: String {
        withBuffer { String(decoding: $0, as: UTF8.self) }
    }

    /// Calls `body` with the generator's buffer, which stays valid until the next write or reset.
    public func withBuffer<Result>(_ body: (UnsafeBufferPointer<UInt8>) throws -> Result) rethrows -> Result {
        var pointer: UnsafePointer<UInt8>?
        var length = 0
        check(yajl_gen_get_buf(generator, &pointer, &length), "get_buf")
        return try body(UnsafeBufferPointer(start: pointer, count: length))
    }

    public func beginObject() {
        check(yajl_gen_map_open(generator), "map_open")
    }

    public func endObject() {
        check(yajl_gen_map_close(generator), "map_close")
    }

    public func beginArray() {
        check(yajl_gen_array_open(generator), "array_open")
    }

    public func endArray() {
        check(yajl_gen_array_close(generator), "array_close")
    }

    /// Writes an object key. Keys are strings in yajl's generator.
    public func key(_ key: String) {
        string(key)
    }

    public func string(_ value: String) {
        var value = value
        value.withUTF8 { buffer in
            check(yajl_gen_string(generator, buffer.baseAddress, buffer.count), "string")
        }
    }

    /// Writes a number literal exactly as given, for example `12.50` or `-1e3`.
    public func number(_ literal: String) {
        var literal = literal
        literal.withUTF8 { buffer in
            buffer.withMemoryRebound(to: CChar.self) { characters in
                check(yajl_gen_number(generator, characters.baseAddress, characters.count), "number")
            }
        }
    }

    public func number(_ value: Int64) {
        check(yajl_gen_integer(generator, value), "integer")
    }

    public func bool(_ value: Bool) {
        check(yajl_gen_bool(generator, value ? 1 : 0), "bool")
    }

    public func null() {
        check(yajl_gen_null(generator), "null")
    }

    /// Writes an object member with a string value.
    public func field(_ name: String, _ value: String) {
        key(name)
        string(value)
    }

    /// Writes an object member with a string value, or `null`.
    public func field(_ name: String, _ value: String?) {
        key(name)
        if let value { string(value) } else { null() }
    }

    /// Writes an object member with an integer value.
    public func field(_ name: String, _ value: Int64) {
        key(name)
        number(value)
    }

    /// Writes an object member with an integer value, or `null`.
    public func field(_ name: String, _ value: Int64?) {
        key(name)
        if let value { number(value) } else { null() }
    }

    /// Writes an object member whose value is a number literal, written unchanged.
    public func field(_ name: String, number literal: String) {
        key(name)
        number(literal)
    }

    /// Writes `value`. With `sortingKeys`, object members are written in ascending byte order
    /// of their keys at every level, which gives equal documents equal text.
    public func write(_ value: JSONValue, sortingKeys: Bool = false) {
        switch value {
        case .null:
            null()
        case .bool(let flag):
            bool(flag)
        case .number(let literal):
            number(literal)
        case .string(let text):
            string(text)
        case .array(let elements):
            beginArray()
            for element in elements {
                write(element, sortingKeys: sortingKeys)
            }
            endArray()
        case .object(let members):
            beginObject()
            let ordered = sortingKeys ? members.sorted { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) } : members
            for member in ordered {
                key(member.key)
                write(member.value, sortingKeys: sortingKeys)
            }
            endObject()
        }
    }

    private func check(_ status: yajl_gen_status, _ call: StaticString) {
        guard status == yajl_gen_status_ok else {
            preconditionFailure("yajl_gen_\(call) failed with status \(status.rawValue)")
        }
    }
}

extension JSONValue {
    /// Serializes this value as compact JSON, with object keys sorted by bytes when `sortingKeys` is set.
    public func serialized(sortingKeys: Bool = false) -> [UInt8] {
        let writer = JSONWriter()
        writer.write(self, sortingKeys: sortingKeys)
        return writer.bytes
    }
}
