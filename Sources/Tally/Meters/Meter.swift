import JSON

/// The function that combines the values of a meter's events.
public enum Aggregation: String, Sendable, CaseIterable {
    case sum, count, min, max
    /// The value of the event with the latest event time.
    case latest
}

/// A named dimension that splits a meter's rollups, such as `model: $.data.model`.
public struct GroupBy: Hashable, Sendable {
    public var name: String
    public var path: JSONPath

    public init(name: String, path: JSONPath) {
        self.name = name
        self.path = path
    }
}

/// A meter: which events it reads, which value it takes from each, and how it aggregates.
public struct Meter: Sendable, Equatable {
    public var slug: String
    public var eventType: String
    public var aggregation: Aggregation
    /// The value to aggregate; nil for `count`, which counts events.
    public var valuePath: JSONPath?
    public var groupBy: [GroupBy]

    public init(
        slug: String, eventType: String, aggregation: Aggregation, valuePath: JSONPath?, groupBy: [GroupBy] = []
    ) {
        self.slug = slug
        self.eventType = eventType
        self.aggregation = aggregation
        self.valuePath = valuePath
        self.groupBy = groupBy
    }

    /// Whether the meter reads anything under the event's `data`.
    var readsData: Bool {
        (valuePath?.readsData ?? false) || groupBy.contains { $0.path.readsData }
    }
}

/// The contribution of one event to one meter.
public struct MeterReading: Sendable, Equatable {
    public var meter: String
    /// 1 for `count`; the event's value otherwise.
    public var quantity: Quantity
    /// The group-by values in the meter's order. Nil where the event lacks the path.
    public var groups: [(name: String, value: String?)]

    public init(meter: String, quantity: Quantity, groups: [(name: String, value: String?)]) {
        self.meter = meter
        self.quantity = quantity
        self.groups = groups
    }

    public static func == (lhs: MeterReading, rhs: MeterReading) -> Bool {
        lhs.meter == rhs.meter && lhs.quantity == rhs.quantity
            && lhs.groups.map { ByteString($0.name) } == rhs.groups.map { ByteString($0.name) }
            && lhs.groups.map { $0.value.map(ByteString.init) } == rhs.groups.map { $0.value.map(ByteString.init) }
    }
}

/// The maximum length of a group-by value, in bytes, because the values are part of the
/// rollups' primary key.
public let maxGroupValueBytes = 256

/// The configured meters, looked up by event type.
public struct MeterSet: Sendable {
    public let meters: [Meter]
    private let byType: [ByteString: [Meter]]

    public init(_ meters: [Meter]) {
        self.meters = meters
        self.byType = Dictionary(grouping: meters) { ByteString($0.eventType) }
    }

    /// Returns the meters that read events of `type`, in configuration order.
    public func meters(for type: String) -> [Meter] {
        byType[ByteString(type)] ?? []
    }

    /// Reads every meter of `type` on `event`, or returns the rejection of the first meter
    /// whose value cannot be read.
    func readings(type: String, event: JSONValue) -> Result<[MeterReading], Rejection> {
        let applicable = meters(for: type)
        guard !applicable.isEmpty else { return .success([]) }

        if let reader = applicable.first(where: \.readsData) {
            let data = event.member("data")
            if case .object? = data {
            } else {
                let found = data.map { "a JSON \($0.typeName)" } ?? "absent"
                return .failure(
                    Rejection(
                        .invalidAttribute,
                        "data must be a JSON object because meter \(reader.slug) reads it, but it is \(found)"))
            }
        }

        var readings: [MeterReading] = []
        readings.reserveCapacity(applicable.count)
        for meter in applicable {
            let quantity: Quantity
            if let path = meter.valuePath {
                switch readQuantity(path: path, event: event) {
                case .success(let value): quantity = value
                case .failure(let problem):
                    return .failure(Rejection(.invalidValue, "meter \(meter.slug): \(path) \(problem)"))
                }
            } else {
                quantity = .one
            }

            var groups: [(name: String, value: String?)] = []
            for dimension in meter.groupBy {
                let text: String?
                switch dimension.path.evaluate(in: event) {
                case nil, .null?:
                    text = nil
                case .string(let value)?:
                    text = value
                case .number(let literal)?:
                    text = literal
                case .bool(let flag)?:
                    text = flag ? "true" : "false"
                case let value?:
                    return .failure(
                        Rejection(
                            .invalidValue,
                            "meter \(meter.slug): group_by \(dimension.name) at \(dimension.path) is a JSON \(value.typeName); use a string, number or boolean"
                        ))
                }
                if let text, text.utf8.count > maxGroupValueBytes {
                    return .failure(
                        Rejection(
                            .invalidValue,
                            "meter \(meter.slug): group_by \(dimension.name) has \(text.utf8.count) bytes; the limit is \(maxGroupValueBytes)"
                        ))
                }
                groups.append((dimension.name, text))
            }
            readings.append(MeterReading(meter: meter.slug, quantity: quantity, groups: groups))
        }
        return .success(readings)
    }

    private func readQuantity(path: JSONPath, event: JSONValue) -> Result<Quantity, QuantityProblem> {
        switch path.evaluate(in: event) {
        case nil:
            return .failure(QuantityProblem("is missing"))
        case .number(let literal)?:
            do {
                return .success(try Quantity(parsing: literal))
            } catch {
                return .failure(QuantityProblem("is \(literal): \(error)"))
            }
        case .string(let text)?:
            do {
                return .success(try Quantity(parsing: text))
            } catch {
                return .failure(QuantityProblem("is the string \(quotedForDetail(text)): \(error)"))
            }
        case let value?:
            return .failure(QuantityProblem("is a JSON \(value.typeName), not a number or numeric string"))
        }
    }
}

private struct QuantityProblem: Error, CustomStringConvertible {
    let description: String

    init(_ description: String) {
        self.description = description
    }
}

/// Quotes a value from an event for a dead-letter detail, cut to 64 characters.
func quotedForDetail(_ text: String) -> String {
    let limit = 64
    let shortened = text.count > limit ? String(text.prefix(limit)) + "…" : text
    return "\"" + shortened + "\""
}
