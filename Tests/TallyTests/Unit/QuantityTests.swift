import Tally
import Testing

@Suite("Quantity")
struct QuantityTests {
    @Test(arguments: [
        ("0.1", "0.1"), ("9007199254740993", "9007199254740993"), ("0.027121761950711698", "0.027121761950711698"),
        ("12.5", "12.5"), ("12.50", "12.5"), ("-0", "0"), ("-0.0", "0"), ("0e99999999999", "0"), ("1e3", "1000"),
        ("1.5E-2", "0.015"), ("-15e-1", "-1.5"), ("100", "100"), ("0.000001", "0.000001"), ("123.456e1", "1234.56"),
        ("99999999999999999999", "99999999999999999999"), ("0.000000000000000001", "0.000000000000000001"),
        ("1200", "1200"),
    ])
    func normalizes(input: String, expected: String) throws {
        #expect(try Quantity(parsing: input).text == expected)
    }

    @Test(arguments: [
        "abc", "", " 1", "1 ", "+1", "01", "1.", ".5", "NaN", "Infinity", "-Infinity", "1e", "0x10", "1,5", "--1",
    ])
    func rejectsTextThatIsNotAJSONNumber(input: String) {
        #expect(throws: QuantityError.notANumber) { try Quantity(parsing: input) }
    }

    @Test func rejectsValuesBeyondThePrecision() {
        #expect(throws: QuantityError.tooLarge) { try Quantity(parsing: "100000000000000000000") }
        #expect(throws: QuantityError.tooLarge) { try Quantity(parsing: "1e20") }
        #expect(throws: QuantityError.tooLarge) { try Quantity(parsing: "1e400") }
        #expect(throws: QuantityError.tooLarge) { try Quantity(parsing: "1e99999999999") }
        #expect(throws: QuantityError.tooPrecise) { try Quantity(parsing: "0.0000000000000000001") }
        #expect(throws: QuantityError.tooPrecise) { try Quantity(parsing: "1e-19") }
        #expect(throws: QuantityError.tooPrecise) { try Quantity(parsing: "1e-99999999999") }
    }

    @Test func numberAndNumericStringAreEqual() throws {
        #expect(try Quantity(parsing: "0.10") == Quantity(parsing: "0.1"))
    }
}
