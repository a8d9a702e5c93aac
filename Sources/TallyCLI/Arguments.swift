/// A command line that does not fit the command's options.
struct UsageError: Error, CustomStringConvertible {
    var description: String

    init(_ description: String) {
        self.description = description
    }
}

/// The options a command accepts.
struct OptionSpec {
    enum Kind {
        /// Present or absent, such as `--json`.
        case flag
        /// Takes one value, such as `--config FILE`, and may be given once.
        case value
        /// Takes a value and may be repeated, such as `--topic usage:4 --topic other:2`.
        case repeated
    }

    var options: [String: Kind]
}

/// Options and values parsed from a command line, in `--name value` or `--name=value` form.
struct ParsedArguments {
    var flags: Set<String> = []
    var values: [String: [String]] = [:]

    func has(_ flag: String) -> Bool { flags.contains(flag) }

    func value(_ name: String) -> String? { values[name]?.last }

    func all(_ name: String) -> [String] { values[name] ?? [] }

    static func parse(_ arguments: [String], spec: OptionSpec) throws(UsageError) -> ParsedArguments {
        var parsed = ParsedArguments()
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            guard argument.hasPrefix("--"), argument.count > 2 else {
                throw UsageError("unexpected argument \(argument)")
            }
            var name = String(argument.dropFirst(2))
            var inlineValue: String?
            if let equals = name.firstIndex(of: "=") {
                inlineValue = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            }
            guard let kind = spec.options[name] else {
                throw UsageError("unknown option --\(name)")
            }
            switch kind {
            case .flag:
                guard inlineValue == nil else { throw UsageError("option --\(name) takes no value") }
                parsed.flags.insert(name)
            case .value where parsed.values[name] != nil:
                throw UsageError("option --\(name) is given twice")
            case .value, .repeated:
                let value: String
                if let inlineValue {
                    value = inlineValue
                } else {
                    guard index < arguments.count else { throw UsageError("option --\(name) needs a value") }
                    value = arguments[index]
                    index += 1
                }
                parsed.values[name, default: []].append(value)
            }
        }
        return parsed
    }
}
