import JSON

/// A path to one value in an event, in the subset of JSONPath (RFC 9535) that names a single
/// member or element: `$` followed by `.name`, `['name']` or `[index]` steps, such as
/// `$.data.input_tokens`, `$.data['model.name']` or `$.data.items[0]`.
///
/// Wildcards, filters, slices and descendant steps are not supported: a meter reads exactly
/// one value per event.
public struct JSONPath: Hashable, Sendable, CustomStringConvertible {
    public enum Step: Hashable, Sendable {
        case member(ByteString)
        case index(Int)
    }

    public let steps: [Step]
    /// The path as written in the configuration.
    public let text: String

    public var description: String { text }

    /// Whether the path starts at the event's `data` attribute.
    public var readsData: Bool {
        steps.first == .member(ByteString("data"))
    }

    public init(_ text: String) throws(ConfigurationError) {
        self.text = text
        var characters = Array(text.unicodeScalars)
        guard characters.first == "$" else {
            throw ConfigurationError("path \(text) must start with '$'")
        }
        characters.removeFirst()

        var steps: [Step] = []
        var index = 0
        while index < characters.count {
            switch characters[index] {
            case ".":
                index += 1
                var name = String.UnicodeScalarView()
                while index < characters.count, characters[index] != ".", characters[index] != "[" {
                    name.append(characters[index])
                    index += 1
                }
                guard !name.isEmpty else {
                    throw ConfigurationError("path \(text) has an empty member name")
                }
                steps.append(.member(ByteString(String(name))))
            case "[":
                index += 1
                guard index < characters.count else {
                    throw ConfigurationError("path \(text) ends inside brackets")
                }
                if characters[index] == "'" || characters[index] == "\"" {
                    let quote = characters[index]
                    index += 1
                    var name = String.UnicodeScalarView()
                    var closed = false
                    while index < characters.count {
                        let character = characters[index]
                        index += 1
                        if character == "\\", index < characters.count {
                            name.append(characters[index])
                            index += 1
                        } else if character == quote {
                            closed = true
                            break
                        } else {
                            name.append(character)
                        }
                    }
                    guard closed, index < characters.count, characters[index] == "]" else {
                        throw ConfigurationError("path \(text) has an unclosed quoted name")
                    }
                    index += 1
                    steps.append(.member(ByteString(String(name))))
                } else {
                    var digits = ""
                    while index < characters.count, characters[index] != "]" {
                        digits.unicodeScalars.append(characters[index])
                        index += 1
                    }
                    guard index < characters.count, let position = Int(digits), position >= 0 else {
                        throw ConfigurationError(
                            "path \(text) has an invalid step [\(digits)]; use ['name'] or a non-negative index")
                    }
                    index += 1
                    steps.append(.index(position))
                }
            default:
                throw ConfigurationError("path \(text) has an unexpected character '\(characters[index])'")
            }
        }
        guard !steps.isEmpty else {
            throw ConfigurationError("path \(text) names the whole event; name a member such as $.data.tokens")
        }
        self.steps = steps
    }

    /// Returns the value at this path in `event`, or nil when a step is missing.
    public func evaluate(in event: JSONValue) -> JSONValue? {
        var current = event
        for step in steps {
            switch step {
            case .member(let name):
                guard let next = current.member(name.string) else { return nil }
                current = next
            case .index(let position):
                guard case .array(let elements) = current, position < elements.count else { return nil }
                current = elements[position]
            }
        }
        return current
    }
}
