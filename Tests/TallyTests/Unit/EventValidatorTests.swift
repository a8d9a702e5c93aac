import Tally
import Testing

@Suite("EventValidator")
struct EventValidatorTests {
    static let now = try! EventTime.parseRFC3339("2025-01-15T12:30:00Z")

    let validator: EventValidator

    init() throws {
        let meters =
            try standardMeters() + [
                Meter(
                    slug: "input_tokens", eventType: "llm.request", aggregation: .sum,
                    valuePath: try JSONPath("$.data.input_tokens"),
                    groupBy: [GroupBy(name: "model", path: try JSONPath("$.data.model"))]),
                Meter(
                    slug: "output_tokens", eventType: "llm.request", aggregation: .sum,
                    valuePath: try JSONPath("$.data.output_tokens")),
                Meter(slug: "requests", eventType: "llm.request", aggregation: .count, valuePath: nil),
            ]
        validator = EventValidator(
            meters: MeterSet(meters),
            limits: ValidationLimits(
                maxPayloadBytes: 1 << 20, dedupeWindowMicroseconds: 35 * EventTime.microsecondsPerDay,
                maxFutureSkewMicroseconds: 5 * EventTime.microsecondsPerMinute))
    }

    func reason(_ value: [UInt8]?) -> RejectionReason? {
        if case .rejected(let rejection) = validator.validate(value, now: Self.now) { return rejection.reason }
        return nil
    }

    func reason(_ text: String) -> RejectionReason? {
        reason(Array(text.utf8))
    }

    func accepted(_ text: String) -> AcceptedEvent? {
        if case .accepted(let event) = validator.validate(Array(text.utf8), now: Self.now) { return event }
        return nil
    }

    /// Returns an `api.call` event with one attribute replaced by raw JSON text, or removed when nil.
    func event(replacing name: String, with json: String?) -> String {
        var attributes: [(String, String)] = [
            ("specversion", #""1.0""#), ("id", #""e1""#), ("source", #""test""#), ("type", #""api.call""#),
            ("subject", #""cust-1""#), ("time", #""2025-01-15T12:00:10Z""#), ("data", #"{"quantity":1}"#),
        ]
        if let index = attributes.firstIndex(where: { $0.0 == name }) {
            if let json { attributes[index].1 = json } else { attributes.remove(at: index) }
        } else if let json {
            attributes.append((name, json))
        }
        return "{" + attributes.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}"
    }

    @Test func validEventIsAcceptedWithItsReadings() throws {
        let event = try #require(accepted(apiCall("e1", "cust-1", "2")))
        #expect(event.key == EventKey(source: "test", id: "e1"))
        #expect(event.readings.map(\.meter) == ["api_calls", "calls"])
        #expect(event.readings.map(\.quantity.text) == ["2", "1"])
        #expect(event.payloadSHA256.count == 32)
    }

    @Test func llmRequestFeedsThreeMeters() throws {
        let text =
            #"{"specversion":"1.0","id":"req-7f3a","source":"api-gateway","type":"llm.request","subject":"customer-42","time":"2025-01-15T12:15:30.123456Z","data":{"model":"gpt-x","input_tokens":1200,"output_tokens":340}}"#
        let event = try #require(accepted(text))
        #expect(event.readings.map(\.meter) == ["input_tokens", "output_tokens", "requests"])
        #expect(event.readings.map(\.quantity.text) == ["1200", "340", "1"])
        #expect(event.readings[0].groups.map(\.value) == ["gpt-x"])
    }

    @Test func unmeteredTypeIsAcceptedWithoutReadings() throws {
        let event = try #require(accepted(event(replacing: "type", with: #""image.generated""#)))
        #expect(event.readings.isEmpty)
    }

    @Test func extensionAttributesAreKept() throws {
        let event = try #require(accepted(event(replacing: "region", with: #""eu-west""#)))
        #expect(event.attributes.map(\.key) == ["region"])
    }

    @Test func payloadHashIgnoresKeyOrderAndWhitespace() throws {
        let first = try #require(accepted(apiCall("e1")))
        let reordered =
            #"{ "data": {"quantity": 1}, "time":"2025-01-15T12:00:10Z","subject":"cust-1","type":"api.call","source":"test","id":"e1","specversion":"1.0" }"#
        let second = try #require(accepted(reordered))
        #expect(first.payloadSHA256 == second.payloadSHA256)
        let changed = try #require(accepted(apiCall("e1", "cust-1", "2")))
        #expect(first.payloadSHA256 != changed.payloadSHA256)
    }

    @Test func everyReasonCodeHasAnInput() {
        let big = event(replacing: "padding", with: "\"" + String(repeating: "x", count: 1 << 20) + "\"")
        let cases: [(RejectionReason, [UInt8]?)] = [
            (.nullValue, nil),
            (.emptyValue, []),
            (.payloadTooLarge, Array(big.utf8)),
            (.invalidUTF8, Array(#"{"specversion":"1.0","id":""#.utf8) + [0xC3, 0x28] + Array(#""}"#.utf8)),
            (.malformedJSON, Array(#"{"id":"#.utf8)),
            (.duplicateJSONKey, Array(#"{"id":"d2","id":"d3"}"#.utf8)),
            (.nestingTooDeep, Array((String(repeating: "[", count: 100) + String(repeating: "]", count: 100)).utf8)),
            (.notAnObject, Array(#"[1,2]"#.utf8)),
            (.numberOutOfRange, Array(event(replacing: "big", with: "1e200000").utf8)),
            (.nulCharacter, Array(event(replacing: "subject", with: #""acme\u0000x""#).utf8)),
            (.unsupportedSpecversion, Array(event(replacing: "specversion", with: #""0.3""#).utf8)),
            (.missingAttribute, Array(event(replacing: "source", with: nil).utf8)),
            (.invalidAttribute, Array(event(replacing: "subject", with: #"["cust-1"]"#).utf8)),
            (.invalidTime, Array(event(replacing: "time", with: #""2024""#).utf8)),
            (.tooLate, Array(event(replacing: "time", with: #""2024-12-01T00:00:00Z""#).utf8)),
            (.timeInFuture, Array(event(replacing: "time", with: #""2099-01-01T00:00:00Z""#).utf8)),
            (.invalidValue, Array(event(replacing: "data", with: #"{"quantity":"abc"}"#).utf8)),
        ]
        for (expected, value) in cases {
            #expect(reason(value) == expected, "expected \(expected.rawValue)")
        }
    }

    @Test func requiredAttributesMustBeNonEmptyStrings() {
        for name in ["id", "source", "type", "subject"] {
            #expect(reason(event(replacing: name, with: nil)) == .missingAttribute, "\(name) missing")
            #expect(reason(event(replacing: name, with: #""""#)) == .invalidAttribute, "\(name) empty")
            #expect(reason(event(replacing: name, with: "42")) == .invalidAttribute, "\(name) a number")
        }
        #expect(reason(event(replacing: "specversion", with: nil)) == .missingAttribute)
        #expect(reason(event(replacing: "specversion", with: "1.0")) == .invalidAttribute)
        #expect(reason(event(replacing: "time", with: nil)) == .missingAttribute)
    }

    @Test func overlongAttributesAreInvalid() {
        let long = "\"" + String(repeating: "a", count: 1025) + "\""
        #expect(reason(event(replacing: "subject", with: long)) == .invalidAttribute)
        #expect(reason(event(replacing: "id", with: "\"" + String(repeating: "a", count: 1024) + "\"")) == nil)
    }

    @Test func epochNumbersAreInvalidTimes() {
        #expect(reason(event(replacing: "time", with: "1733850000")) == .invalidTime)
        #expect(reason(event(replacing: "time", with: "1733850000000")) == .invalidTime)
        #expect(reason(event(replacing: "time", with: #""1733850000""#)) == .invalidTime)
        #expect(reason(event(replacing: "time", with: #""2025-03-09T12:00:00""#)) == .invalidTime)
    }

    @Test func windowEdgesAreInclusive() {
        #expect(reason(event(replacing: "time", with: #""2024-12-11T12:30:00Z""#)) == nil)
        #expect(reason(event(replacing: "time", with: #""2024-12-11T12:29:59.999999Z""#)) == .tooLate)
        #expect(reason(event(replacing: "time", with: #""2025-01-15T12:35:00Z""#)) == nil)
        #expect(reason(event(replacing: "time", with: #""2025-01-15T12:35:00.000001Z""#)) == .timeInFuture)
    }

    @Test func missingValueIsNeverCountedAsZero() {
        #expect(reason(event(replacing: "data", with: #"{"other":1}"#)) == .invalidValue)
        #expect(reason(event(replacing: "data", with: #"{"quantity":null}"#)) == .invalidValue)
        #expect(reason(event(replacing: "data", with: #"{"quantity":true}"#)) == .invalidValue)
        #expect(reason(event(replacing: "data", with: #"{"quantity":"NaN"}"#)) == .invalidValue)
        #expect(reason(event(replacing: "data", with: #"{"quantity":"Infinity"}"#)) == .invalidValue)
        #expect(reason(event(replacing: "data", with: #"{"quantity":1e400}"#)) == .invalidValue)
        #expect(reason(event(replacing: "data", with: #"{"quantity":0.0000000000000000001}"#)) == .invalidValue)
    }

    @Test func dataMustBeAnObjectWhenAMeterReadsIt() {
        #expect(reason(event(replacing: "data", with: nil)) == .invalidAttribute)
        #expect(reason(event(replacing: "data", with: #""text""#)) == .invalidAttribute)
        #expect(reason(event(replacing: "data", with: "[1]")) == .invalidAttribute)
    }

    @Test func numericStringEqualsNumber() throws {
        let fromString = try #require(accepted(apiCall("e1", "cust-1", #""12.5""#)))
        let fromNumber = try #require(accepted(apiCall("e1", "cust-1", "12.50")))
        #expect(fromString.readings[0].quantity == fromNumber.readings[0].quantity)
    }

    @Test func nulInDataIsRejected() {
        #expect(reason(event(replacing: "data", with: #"{"quantity":1,"note":"a\u0000b"}"#)) == .nulCharacter)
        #expect(reason(event(replacing: "data", with: #"{"quantity":1,"a\u0000b":1}"#)) == .nulCharacter)
    }

    @Test func groupByValuesMustBeScalars() {
        let text =
            #"{"specversion":"1.0","id":"r1","source":"s","type":"llm.request","subject":"c","time":"2025-01-15T12:00:00Z","data":{"model":{"name":"x"},"input_tokens":1,"output_tokens":1}}"#
        #expect(reason(text) == .invalidValue)
        let missingModel =
            #"{"specversion":"1.0","id":"r1","source":"s","type":"llm.request","subject":"c","time":"2025-01-15T12:00:00Z","data":{"input_tokens":1,"output_tokens":1}}"#
        #expect(reason(missingModel) == nil)
    }
}
