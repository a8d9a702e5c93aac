import CYajl

/// The reason a byte string is not accepted as a JSON document.
public enum JSONParseError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The bytes are not valid UTF-8. `offset` is the first byte of the invalid sequence.
    case invalidUTF8(offset: Int)
    /// The text is not JSON, as reported by yajl.
    case malformed(message: String, offset: Int)
    /// A `\u` escape names half of a UTF-16 surrogate pair without the other half. Such a
    /// string has no UTF-8 form, and yajl 2.1 would silently replace it with `?`.
    case unpairedSurrogate(offset: Int)
    /// An object has the same key twice. `path` locates the object, for example `$.data`.
    case duplicateKey(key: String, path: String)
    /// Arrays and objects are nested deeper than the parser's limit.
    case nestingTooDeep(limit: Int)

    public var description: String {
        switch self {
        case .invalidUTF8(let offset):
            return "invalid UTF-8 at byte \(offset)"
        case .malformed(let message, let offset):
            return "invalid JSON at byte \(offset): \(message)"
        case .unpairedSurrogate(let offset):
            return "unpaired UTF-16 surrogate escape at byte \(offset)"
        case .duplicateKey(let key, let path):
            return "duplicate key \"\(key)\" in the object at \(path)"
        case .nestingTooDeep(let limit):
            return "arrays and objects are nested deeper than \(limit) levels"
        }
    }
}

/// A strict JSON parser over yajl 2.
///
/// It accepts exactly RFC 8259 JSON: no comments, no trailing text, one value. On top of
/// yajl's checks it rejects invalid UTF-8 anywhere in the input, duplicate object keys,
/// unpaired surrogate escapes and nesting deeper than `maxDepth`.
///
/// A parser is not thread-safe; use one per thread. It reuses its buffers between calls.
public final class JSONParser {
    public let maxDepth: Int
    private var builder = TreeBuilder()

    public init(maxDepth: Int = 64) {
        precondition(maxDepth > 0, "maxDepth must be positive")
        self.maxDepth = maxDepth
    }

    /// Parses `bytes` as one JSON document.
    public func parse(_ bytes: [UInt8]) throws(JSONParseError) -> JSONValue {
        try bytes.withUnsafeBufferPointer { buffer throws(JSONParseError) in
            try parse(buffer)
        }
    }

    /// Parses the bytes in `buffer` as one JSON document. The buffer is only read during the call.
    public func parse(_ buffer: UnsafeBufferPointer<UInt8>) throws(JSONParseError) -> JSONValue {
        if let offset = firstInvalidUTF8Offset(buffer) {
            throw .invalidUTF8(offset: offset)
        }

        builder.reset(maxDepth: maxDepth)
        let root = try withUnsafeMutablePointer(to: &builder) { builderPointer throws(JSONParseError) -> JSONValue in
            var callbacks = yajl_callbacks(
                yajl_null: onNull,
                yajl_boolean: onBoolean,
                yajl_integer: nil,
                yajl_double: nil,
                yajl_number: onNumber,
                yajl_string: onString,
                yajl_start_map: onStartMap,
                yajl_map_key: onMapKey,
                yajl_end_map: onEndMap,
                yajl_start_array: onStartArray,
                yajl_end_array: onEndArray)
            // The handle borrows `callbacks` and `builderPointer` and is freed before either goes away.
            guard let handle = yajl_alloc(&callbacks, nil, builderPointer) else {
                fatalError("yajl_alloc failed: out of memory")
            }
            defer { yajl_free(handle) }

            var status = yajl_parse(handle, buffer.baseAddress, buffer.count)
            // yajl counts the bytes consumed by its last call only, so a failure in
            // yajl_complete_parse (input that ends too early) is placed at the end of the input.
            var errorOffset = yajl_get_bytes_consumed(handle)
            if status == yajl_status_ok {
                status = yajl_complete_parse(handle)
                errorOffset = buffer.count
            }
            if status == yajl_status_ok, let root = builderPointer.pointee.root {
                return root
            }
            if let failure = builderPointer.pointee.failure {
                throw failure
            }
            throw .malformed(message: yajlErrorMessage(handle, buffer), offset: errorOffset)
        }

        if let offset = firstUnpairedSurrogateEscape(buffer) {
            throw .unpairedSurrogate(offset: offset)
        }
        return root
    }
}

/// Returns the first line of yajl's own error text, for example "lexical error: invalid char in json text."
private func yajlErrorMessage(_ handle: yajl_handle, _ buffer: UnsafeBufferPointer<UInt8>) -> String {
    guard let raw = yajl_get_error(handle, 0, buffer.baseAddress, buffer.count) else {
        return "parse error"
    }
    defer { yajl_free_error(handle, raw) }
    let text = String(cString: raw)
    let firstLine = text.split(separator: "\n", maxSplits: 1).first.map(String.init) ?? text
    return firstLine.trimmingWhitespace()
}

extension String {
    fileprivate func trimmingWhitespace() -> String {
        var view = Substring(self)
        while let first = view.first, first.isWhitespace { view.removeFirst() }
        while let last = view.last, last.isWhitespace { view.removeLast() }
        return String(view)
    }
}

/// Finds the offset of the first byte that does not start or continue a valid UTF-8 sequence.
private func firstInvalidUTF8Offset(_ buffer: UnsafeBufferPointer<UInt8>) -> Int? {
    var iterator = buffer.makeIterator()
    var parser = Unicode.UTF8.ForwardParser()
    var offset = 0
    while true {
        switch parser.parseScalar(from: &iterator) {
        case .valid(let encoded):
            offset += encoded.count
        case .emptyInput:
            return nil
        case .error:
            return offset
        }
    }
}

/// Finds the offset of the first `\u` escape of a surrogate that is not part of a high-low pair.
///
/// This runs after yajl accepted the document. In valid JSON a backslash occurs only inside a
/// string, where it always starts an escape, so reading escapes left to right is exact.
private func firstUnpairedSurrogateEscape(_ buffer: UnsafeBufferPointer<UInt8>) -> Int? {
    let backslash = UInt8(ascii: "\\")
    let letterU = UInt8(ascii: "u")

    func codeUnit(at index: Int) -> UInt16? {
        guard index + 6 <= buffer.count, buffer[index] == backslash, buffer[index + 1] == letterU else {
            return nil
        }
        var value: UInt16 = 0
        for position in index + 2..<index + 6 {
            guard let digit = hexDigitValue(buffer[position]) else { return nil }
            value = value << 4 | UInt16(digit)
        }
        return value
    }

    var index = 0
    while index < buffer.count {
        guard buffer[index] == backslash else {
            index += 1
            continue
        }
        guard let unit = codeUnit(at: index) else {
            index += 2  // a one-character escape such as \n or \"
            continue
        }
        switch unit {
        case 0xD800...0xDBFF:
            guard let low = codeUnit(at: index + 6), (0xDC00...0xDFFF).contains(low) else {
                return index
            }
            index += 12
        case 0xDC00...0xDFFF:
            return index
        default:
            index += 6
        }
    }
    return nil
}

private func hexDigitValue(_ byte: UInt8) -> UInt8? {
    switch byte {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
    default: return nil
    }
}

// MARK: - Building the tree from yajl's callbacks

/// Collects yajl's events into a `JSONValue`. yajl calls back on the thread that called
/// `yajl_parse`, with the `ctx` pointer that `JSONParser.parse` passes, which points at this value.
private struct TreeBuilder {
    /// Objects with more members than this check for duplicate keys with a set instead of a scan.
    static let linearKeyScanLimit = 16

    /// An array or object still open. A class, so that appending to the innermost one mutates
    /// it in place: an enum payload taken out of the stack would be copied on every append,
    /// which makes large documents quadratic.
    final class Frame {
        let isObject: Bool
        var elements: [JSONValue] = []
        var members: [JSONMember] = []
        var pendingKey: String?
        /// The keys seen so far, once the object has more than `linearKeyScanLimit` of them.
        var keys: Set<[UInt8]>?

        init(isObject: Bool) {
            self.isObject = isObject
        }
    }

    var stack: [Frame] = []
    var root: JSONValue?
    var failure: JSONParseError?
    var maxDepth = 64

    mutating func reset(maxDepth: Int) {
        stack.removeAll(keepingCapacity: true)
        root = nil
        failure = nil
        self.maxDepth = maxDepth
    }

    /// Adds a finished value to the innermost container, or makes it the root.
    mutating func add(_ value: JSONValue) -> Bool {
        guard let top = stack.last else {
            root = value
            return true
        }
        if top.isObject {
            guard let key = top.pendingKey else {
                preconditionFailure("yajl passed an object value without a key")
            }
            top.members.append(JSONMember(key: key, value: value))
            top.pendingKey = nil
        } else {
            top.elements.append(value)
        }
        return true
    }

    mutating func open(isObject: Bool) -> Bool {
        guard stack.count < maxDepth else {
            failure = .nestingTooDeep(limit: maxDepth)
            return false
        }
        stack.append(Frame(isObject: isObject))
        return true
    }

    mutating func setKey(_ key: String) -> Bool {
        guard let top = stack.last, top.isObject else {
            preconditionFailure("yajl passed an object key outside an object")
        }
        let isDuplicate: Bool
        if top.keys != nil {
            isDuplicate = !top.keys!.insert(Array(key.utf8)).inserted
        } else {
            isDuplicate = top.members.contains { hasSameUTF8($0.key, key) }
            if top.members.count >= Self.linearKeyScanLimit {
                top.keys = Set(top.members.map { Array($0.key.utf8) } + [Array(key.utf8)])
            }
        }
        top.pendingKey = key
        if isDuplicate {
            failure = .duplicateKey(key: key, path: currentPath())
            return false
        }
        return true
    }

    mutating func close() -> Bool {
        let frame = stack.removeLast()
        return add(frame.isObject ? .object(frame.members) : .array(frame.elements))
    }

    /// Describes the location of the innermost container, such as `$.data.items[2]`.
    func currentPath() -> String {
        var path = "$"
        for frame in stack.dropLast() {
            if frame.isObject {
                path += "." + (frame.pendingKey ?? "")
            } else {
                path += "[\(frame.elements.count)]"
            }
        }
        return path
    }
}

private func builder(_ context: UnsafeMutableRawPointer?) -> UnsafeMutablePointer<TreeBuilder> {
    guard let context else { preconditionFailure("yajl callback without its context") }
    return context.assumingMemoryBound(to: TreeBuilder.self)
}

private func text(_ pointer: UnsafePointer<UInt8>?, _ length: Int) -> String {
    // yajl has already checked that string contents are valid UTF-8.
    String(decoding: UnsafeBufferPointer(start: pointer, count: length), as: UTF8.self)
}

private func onNull(_ context: UnsafeMutableRawPointer?) -> Int32 {
    builder(context).pointee.add(.null) ? 1 : 0
}

private func onBoolean(_ context: UnsafeMutableRawPointer?, _ value: Int32) -> Int32 {
    builder(context).pointee.add(.bool(value != 0)) ? 1 : 0
}

private func onNumber(_ context: UnsafeMutableRawPointer?, _ pointer: UnsafePointer<CChar>?, _ length: Int) -> Int32 {
    let literal =
        pointer.map { start in
            start.withMemoryRebound(to: UInt8.self, capacity: length) { text($0, length) }
        } ?? ""
    return builder(context).pointee.add(.number(literal)) ? 1 : 0
}

private func onString(_ context: UnsafeMutableRawPointer?, _ pointer: UnsafePointer<UInt8>?, _ length: Int) -> Int32 {
    builder(context).pointee.add(.string(text(pointer, length))) ? 1 : 0
}

private func onStartMap(_ context: UnsafeMutableRawPointer?) -> Int32 {
    builder(context).pointee.open(isObject: true) ? 1 : 0
}

private func onMapKey(_ context: UnsafeMutableRawPointer?, _ pointer: UnsafePointer<UInt8>?, _ length: Int) -> Int32 {
    builder(context).pointee.setKey(text(pointer, length)) ? 1 : 0
}

private func onEndMap(_ context: UnsafeMutableRawPointer?) -> Int32 {
    builder(context).pointee.close() ? 1 : 0
}

private func onStartArray(_ context: UnsafeMutableRawPointer?) -> Int32 {
    builder(context).pointee.open(isObject: false) ? 1 : 0
}

private func onEndArray(_ context: UnsafeMutableRawPointer?) -> Int32 {
    builder(context).pointee.close() ? 1 : 0
}
