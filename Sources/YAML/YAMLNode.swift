/// A position in a YAML document, counted from 1.
public struct YAMLMark: Sendable, Equatable, CustomStringConvertible {
    public var line: Int
    public var column: Int

    public init(line: Int, column: Int) {
        self.line = line
        self.column = column
    }

    public var description: String { "line \(line), column \(column)" }
}

/// A scalar with its position. Every scalar is kept as text; the reader of the document
/// decides whether a key expects a number, a duration or a string.
public struct YAMLScalar: Sendable {
    public var value: String
    /// True for an unquoted scalar, where `null`, `~` and an empty value mean null.
    public var isPlain: Bool
    public var mark: YAMLMark

    public init(value: String, isPlain: Bool, mark: YAMLMark) {
        self.value = value
        self.isPlain = isPlain
        self.mark = mark
    }

    /// Whether this is YAML's null: an unquoted `null`, `Null`, `NULL`, `~` or nothing.
    public var isNull: Bool {
        isPlain && ["", "~", "null", "Null", "NULL"].contains(value)
    }
}

/// One `key: value` entry of a mapping.
public struct YAMLEntry: Sendable {
    public var key: YAMLScalar
    public var value: YAMLNode

    public init(key: YAMLScalar, value: YAMLNode) {
        self.key = key
        self.value = value
    }
}

/// A YAML node. Mappings keep document order and have unique scalar keys.
public indirect enum YAMLNode: Sendable {
    case scalar(YAMLScalar)
    case sequence([YAMLNode], YAMLMark)
    case mapping([YAMLEntry], YAMLMark)

    public var mark: YAMLMark {
        switch self {
        case .scalar(let scalar): return scalar.mark
        case .sequence(_, let mark): return mark
        case .mapping(_, let mark): return mark
        }
    }

    /// The kind of node, for error messages: `scalar`, `sequence` or `mapping`.
    public var kindName: String {
        switch self {
        case .scalar: return "scalar"
        case .sequence: return "sequence"
        case .mapping: return "mapping"
        }
    }
}
