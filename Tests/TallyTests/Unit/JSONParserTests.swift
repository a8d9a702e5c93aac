import JSON
import Testing

@Suite("JSONParser")
struct JSONParserTests {
    let parser = JSONParser()

    func parse(_ text: String) throws(JSONParseError) -> JSONValue {
        try parser.parse(Array(text.utf8))
    }

    @Test func numbersKeepTheirLiteralText() throws {
        let value = try parse(#"{"a":0.1,"b":9007199254740993,"c":0.027121761950711698,"d":-1.50e+3}"#)
        guard case .number(let a)? = value.member("a"), case .number(let b)? = value.member("b"),
            case .number(let c)? = value.member("c"), case .number(let d)? = value.member("d")
        else {
            Issue.record("expected numbers in \(value)")
            return
        }
        #expect(a == "0.1")
        #expect(b == "9007199254740993")
        #expect(c == "0.027121761950711698")
        #expect(d == "-1.50e+3")
    }

    @Test func duplicateKeyAtTopLevelIsRejected() {
        #expect(throws: JSONParseError.duplicateKey(key: "id", path: "$")) {
            try parse(#"{"id":"d2","id":"d3"}"#)
        }
    }

    @Test func duplicateKeyInNestedObjectIsRejected() {
        #expect(throws: JSONParseError.duplicateKey(key: "quantity", path: "$.data")) {
            try parse(#"{"data":{"quantity":1,"quantity":-1}}"#)
        }
    }

    @Test func duplicateKeyInLargeObjectIsRejected() {
        let members = (0..<40).map { #""k\#($0)":\#($0)"# }.joined(separator: ",")
        #expect(throws: JSONParseError.duplicateKey(key: "k7", path: "$")) {
            try parse("{\(members),\"k7\":1}")
        }
    }

    @Test func keysDifferingOnlyInUnicodeNormalizationAreDistinct() throws {
        // "é" as one scalar and as "e" plus a combining acute accent: equal as Swift strings.
        let value = try parse("{\"caf\u{E9}\":1,\"cafe\u{301}\":2}")
        guard case .object(let members) = value else {
            Issue.record("expected an object")
            return
        }
        #expect(members.count == 2)
    }

    @Test func invalidUTF8IsReportedWithItsOffset() {
        #expect(throws: JSONParseError.invalidUTF8(offset: 6)) {
            try parser.parse(Array(#"{"a":""#.utf8) + [0xFF] + Array(#""}"#.utf8))
        }
    }

    @Test func unpairedSurrogatesAreRejected() {
        for text in [#"{"a":"\ud800"}"#, #"{"a":"\udc00"}"#, #"{"a":"\ud800\u0041"}"#, #"{"a":"x\uD83D"}"#] {
            #expect(throws: JSONParseError.self, "\(text)") { try parse(text) }
        }
    }

    @Test func surrogatePairIsDecoded() throws {
        let value = try parse(#"{"a":"\ud83d\ude00"}"#)
        #expect(
            value.member("a").map { if case .string(let text) = $0 { return text == "😀" } else { return false } }
                == true)
    }

    @Test func escapedBackslashBeforeUIsNotAnEscape() throws {
        // `\\ud800` is a backslash followed by the letters "ud800", not a surrogate.
        _ = try parse(#"{"a":"\\ud800"}"#)
    }

    @Test func malformedInputsAreRejected() {
        let inputs = [
            #"{"id":"#, #"{"a":1} trailing"#, #"{"a":1}}"#, #"{"a":01}"#, #"{"a":-}"#, #"{"a":tru}"#, #"{"a":1,}"#,
            #"{'a':1}"#, "{\"a\":1 /* comment */}", #"{"a":.5}"#, #"{"a":1.}"#, "", "   ",
        ]
        for input in inputs {
            #expect(throws: JSONParseError.self, "\(input)") { try parse(input) }
        }
    }

    @Test func errorOffsetPointsIntoTheInput() {
        #expect(throws: JSONParseError.malformed(message: "parse error: premature EOF", offset: 15)) {
            try parse(#"{"a":1,"b":[1,2"#)
        }
        #expect(
            throws: JSONParseError.malformed(
                message: "parse error: unallowed token at this point in JSON text", offset: 6)
        ) {
            try parse(#"{"a":}"#)
        }
    }

    @Test func nulCharacterEscapeIsKeptForTheCallerToCheck() throws {
        let value = try parse(#"{"subject":"acme\u0000x"}"#)
        #expect(value.containsNULCharacter)
    }

    @Test func nestingDeeperThanTheLimitIsRejected() {
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        #expect(throws: JSONParseError.nestingTooDeep(limit: 64)) { try parse(deep) }
        let fits = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        #expect(throws: Never.self) { try parse(fits) }
    }

    @Test func largeArraysAndObjectsAreParsed() throws {
        // 1 MiB of small elements: a parser that copied its containers on each append would
        // take minutes here instead of milliseconds.
        let array = "[" + Array(repeating: "1", count: 500_000).joined(separator: ",") + "]"
        guard case .array(let elements) = try parse(array) else {
            Issue.record("expected an array")
            return
        }
        #expect(elements.count == 500_000)

        let object = "{" + (0..<50_000).map { #""k\#($0)":\#($0)"# }.joined(separator: ",") + "}"
        guard case .object(let members) = try parse(object) else {
            Issue.record("expected an object")
            return
        }
        #expect(members.count == 50_000)
    }

    @Test func writerSortsKeysByBytes() throws {
        let value = try parse(#"{"b":1,"a":{"z":true,"B":null},"A":"x\n"}"#)
        let text = String(decoding: value.serialized(sortingKeys: true), as: UTF8.self)
        #expect(text == #"{"A":"x\n","a":{"B":null,"z":true},"b":1}"#)
    }
}
