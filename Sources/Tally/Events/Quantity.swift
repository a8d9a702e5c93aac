/// An exact decimal quantity, kept as normalized decimal text.
///
/// It is read from a JSON number literal or a numeric string, never through `Double`, and
/// PostgreSQL reads the text into `numeric` exactly. The normal form has no exponent, no
/// leading zeros, no trailing fractional zeros and no `-0`: `1.50e1` becomes `15`,
/// `-0.0` becomes `0`.
///
/// The precision is that of `numeric(38, 18)`: at most 20 digits before the decimal point and
/// 18 after it. A value that needs more is rejected rather than rounded.
public struct Quantity: Hashable, Sendable, CustomStringConvertible {
    public static let maxIntegerDigits = 20
    public static let maxFractionDigits = 18

    /// The normalized decimal text, such as `-12.5` or `0.000001`.
    public let text: String

    public var description: String { text }

    public static let one = Quantity(normalizedText: "1")

    private init(normalizedText: String) {
        self.text = normalizedText
    }
}

/// The reason a value is not an acceptable quantity.
public enum QuantityError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Not written as a JSON number, for example `abc`, `NaN`, `Infinity`, `+1` or ` 1`.
    case notANumber
    /// More than `Quantity.maxIntegerDigits` digits before the decimal point.
    case tooLarge
    /// More than `Quantity.maxFractionDigits` significant digits after the decimal point.
    case tooPrecise

    public var description: String {
        switch self {
        case .notANumber:
            return "not a decimal number"
        case .tooLarge:
            return "more than \(Quantity.maxIntegerDigits) digits before the decimal point"
        case .tooPrecise:
            return "more than \(Quantity.maxFractionDigits) digits after the decimal point"
        }
    }
}

extension Quantity {
    /// Reads text in JSON number syntax: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    /// The same rule applies to a number literal and to a numeric string, so `0.1` and `"0.1"`
    /// give equal quantities.
    public init(parsing text: String) throws(QuantityError) {
        let bytes = Array(text.utf8)
        var index = 0

        func isDigit(_ at: Int) -> Bool {
            at < bytes.count && bytes[at] >= UInt8(ascii: "0") && bytes[at] <= UInt8(ascii: "9")
        }

        let isNegative = index < bytes.count && bytes[index] == UInt8(ascii: "-")
        if isNegative { index += 1 }

        // Integer part: a single 0, or digits not starting with 0.
        let integerStart = index
        guard isDigit(index) else { throw .notANumber }
        if bytes[index] == UInt8(ascii: "0") {
            index += 1
        } else {
            while isDigit(index) { index += 1 }
        }
        var digits = Array(bytes[integerStart..<index])
        var pointPosition = digits.count

        if index < bytes.count && bytes[index] == UInt8(ascii: ".") {
            index += 1
            let fractionStart = index
            while isDigit(index) { index += 1 }
            guard index > fractionStart else { throw .notANumber }
            digits += bytes[fractionStart..<index]
        }

        var exponent = 0
        var exponentOverflow = false
        var exponentIsNegative = false
        if index < bytes.count && (bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E")) {
            index += 1
            if index < bytes.count && (bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-")) {
                exponentIsNegative = bytes[index] == UInt8(ascii: "-")
                index += 1
            }
            guard isDigit(index) else { throw .notANumber }
            while isDigit(index) {
                // Past a million, the result no longer depends on the exact exponent.
                if exponent < 1_000_000 {
                    exponent = exponent * 10 + Int(bytes[index] - UInt8(ascii: "0"))
                } else {
                    exponentOverflow = true
                }
                index += 1
            }
        }
        guard index == bytes.count else { throw .notANumber }

        // Drop leading zeros (moving the point with them) and trailing zeros.
        let firstNonZero = digits.firstIndex { $0 != UInt8(ascii: "0") }
        guard let firstNonZero else {
            self = Quantity(normalizedText: "0")
            return
        }
        let lastNonZero = digits.lastIndex { $0 != UInt8(ascii: "0") }!
        pointPosition -= firstNonZero
        digits = Array(digits[firstNonZero...lastNonZero])

        if exponentOverflow {
            throw exponentIsNegative ? .tooPrecise : .tooLarge
        }
        pointPosition += exponentIsNegative ? -exponent : exponent

        // The value is 0.d1d2…dn × 10^pointPosition, with d1 and dn not zero.
        let integerDigits = max(pointPosition, 0)
        let fractionDigits = max(digits.count - pointPosition, 0)
        guard integerDigits <= Quantity.maxIntegerDigits else { throw .tooLarge }
        guard fractionDigits <= Quantity.maxFractionDigits else { throw .tooPrecise }

        var normalized: [UInt8] = isNegative ? [UInt8(ascii: "-")] : []
        if pointPosition <= 0 {
            normalized += Array("0.".utf8) + Array(repeating: UInt8(ascii: "0"), count: -pointPosition) + digits
        } else if pointPosition >= digits.count {
            normalized += digits + Array(repeating: UInt8(ascii: "0"), count: pointPosition - digits.count)
        } else {
            normalized += digits[..<pointPosition] + [UInt8(ascii: ".")] + digits[pointPosition...]
        }
        self = Quantity(normalizedText: String(decoding: normalized, as: UTF8.self))
    }
}
