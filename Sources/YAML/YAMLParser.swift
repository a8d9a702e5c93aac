import CYAML

/// A YAML document that could not be read.
public struct YAMLError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var mark: YAMLMark?

    public init(message: String, mark: YAMLMark?) {
        self.message = message
        self.mark = mark
    }

    public var description: String {
        guard let mark else { return message }
        return "\(message) at \(mark)"
    }
}

/// Reads one YAML document into a `YAMLNode` tree with libyaml's event parser.
///
/// Anchors, aliases and several documents in one stream are rejected, and so are duplicate
/// keys in a mapping, which YAML forbids but libyaml does not check. Tags are ignored.
public enum YAMLParser {
    public static func parse(_ text: String) throws(YAMLError) -> YAMLNode {
        var bytes = Array(text.utf8)
        if bytes.isEmpty { bytes = [UInt8(ascii: "\n")] }
        return try bytes.withUnsafeBufferPointer { buffer throws(YAMLError) in
            var parser = yaml_parser_t()
            guard yaml_parser_initialize(&parser) == 1 else {
                fatalError("yaml_parser_initialize failed: out of memory")
            }
            defer { yaml_parser_delete(&parser) }
            // libyaml reads from `buffer`, which outlives the parser.
            yaml_parser_set_input_string(&parser, buffer.baseAddress, buffer.count)
            var reader = EventReader()
            return try reader.read(&parser)
        }
    }
}

/// Turns libyaml events into nodes, with a stack of the collections still open.
private struct EventReader {
    enum Frame {
        case sequence([YAMLNode], YAMLMark)
        case mapping([YAMLEntry], YAMLMark, pendingKey: YAMLScalar?)
    }

    var stack: [Frame] = []
    var root: YAMLNode?
    var documentCount = 0

    mutating func read(_ parser: inout yaml_parser_t) throws(YAMLError) -> YAMLNode {
        while true {
            var event = yaml_event_t()
            guard yaml_parser_parse(&parser, &event) == 1 else {
                throw parserError(parser)
            }
            defer { yaml_event_delete(&event) }

            let mark = YAMLMark(line: Int(event.start_mark.line) + 1, column: Int(event.start_mark.column) + 1)
            switch event.type {
            case YAML_STREAM_END_EVENT:
                return root ?? .mapping([], mark)
            case YAML_DOCUMENT_START_EVENT:
                documentCount += 1
                if documentCount > 1 {
                    throw YAMLError(message: "only one YAML document is allowed", mark: mark)
                }
            case YAML_ALIAS_EVENT:
                throw YAMLError(message: "anchors and aliases are not supported", mark: mark)
            case YAML_SCALAR_EVENT:
                let scalarEvent = event.data.scalar
                if scalarEvent.anchor != nil {
                    throw YAMLError(message: "anchors and aliases are not supported", mark: mark)
                }
                let value = String(
                    decoding: UnsafeBufferPointer(start: scalarEvent.value, count: scalarEvent.length), as: UTF8.self)
                let scalar = YAMLScalar(value: value, isPlain: scalarEvent.style == YAML_PLAIN_SCALAR_STYLE, mark: mark)
                try add(scalar: scalar)
            case YAML_SEQUENCE_START_EVENT:
                if event.data.sequence_start.anchor != nil {
                    throw YAMLError(message: "anchors and aliases are not supported", mark: mark)
                }
                try openCollection(at: mark)
                stack.append(.sequence([], mark))
            case YAML_MAPPING_START_EVENT:
                if event.data.mapping_start.anchor != nil {
                    throw YAMLError(message: "anchors and aliases are not supported", mark: mark)
                }
                try openCollection(at: mark)
                stack.append(.mapping([], mark, pendingKey: nil))
            case YAML_SEQUENCE_END_EVENT, YAML_MAPPING_END_EVENT:
                try closeCollection()
            default:
                break
            }
        }
    }

    /// Checks that a collection may start here: not as a mapping key.
    func openCollection(at mark: YAMLMark) throws(YAMLError) {
        if case .mapping(_, _, pendingKey: nil)? = stack.last {
            throw YAMLError(message: "mapping keys must be scalars", mark: mark)
        }
    }

    mutating func add(scalar: YAMLScalar) throws(YAMLError) {
        if case .mapping(let entries, let mark, pendingKey: nil)? = stack.last {
            if entries.contains(where: { $0.key.value.utf8.elementsEqual(scalar.value.utf8) }) {
                throw YAMLError(message: "duplicate key \"\(scalar.value)\"", mark: scalar.mark)
            }
            stack[stack.count - 1] = .mapping(entries, mark, pendingKey: scalar)
            return
        }
        try add(node: .scalar(scalar))
    }

    mutating func add(node: YAMLNode) throws(YAMLError) {
        guard let top = stack.popLast() else {
            root = node
            return
        }
        switch top {
        case .sequence(var items, let mark):
            items.append(node)
            stack.append(.sequence(items, mark))
        case .mapping(var entries, let mark, let pendingKey):
            guard let key = pendingKey else {
                throw YAMLError(message: "mapping keys must be scalars", mark: node.mark)
            }
            entries.append(YAMLEntry(key: key, value: node))
            stack.append(.mapping(entries, mark, pendingKey: nil))
        }
    }

    mutating func closeCollection() throws(YAMLError) {
        guard let top = stack.popLast() else {
            preconditionFailure("libyaml ended a collection that was never started")
        }
        switch top {
        case .sequence(let items, let mark):
            try add(node: .sequence(items, mark))
        case .mapping(let entries, let mark, _):
            try add(node: .mapping(entries, mark))
        }
    }

    func parserError(_ parser: yaml_parser_t) -> YAMLError {
        let problem = parser.problem.map { String(cString: $0) } ?? "invalid YAML"
        let context = parser.context.map { String(cString: $0) }
        let message = context.map { "\(problem) (\($0))" } ?? problem
        let mark = YAMLMark(line: Int(parser.problem_mark.line) + 1, column: Int(parser.problem_mark.column) + 1)
        return YAMLError(message: message, mark: mark)
    }
}
