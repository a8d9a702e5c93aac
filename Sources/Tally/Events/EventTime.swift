import Glibc

/// An instant as whole microseconds since 1970-01-01T00:00:00Z, the resolution PostgreSQL's
/// `timestamptz` keeps. Integer arithmetic throughout, so no instant passes through `Double`.
public struct EventTime: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var microseconds: Int64

    public init(microseconds: Int64) {
        self.microseconds = microseconds
    }

    public static func < (lhs: EventTime, rhs: EventTime) -> Bool { lhs.microseconds < rhs.microseconds }

    public static let microsecondsPerSecond: Int64 = 1_000_000
    public static let microsecondsPerMinute: Int64 = 60 * microsecondsPerSecond
    public static let microsecondsPerDay: Int64 = 86_400 * microsecondsPerSecond

    /// Reads the system's real-time clock.
    public static func systemNow() -> EventTime {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return EventTime(microseconds: Int64(spec.tv_sec) * microsecondsPerSecond + Int64(spec.tv_nsec) / 1000)
    }

    /// The start of the UTC minute that contains this instant.
    public var minute: EventTime {
        EventTime(microseconds: floorDivide(microseconds, Self.microsecondsPerMinute) * Self.microsecondsPerMinute)
    }

    public func adding(microseconds delta: Int64) -> EventTime {
        EventTime(microseconds: microseconds + delta)
    }

    /// RFC 3339 text in UTC with six fractional digits, such as `2024-12-10T17:36:52.356000Z`.
    /// PostgreSQL reads it back into `timestamptz` exactly.
    public var rfc3339: String {
        let days = floorDivide(microseconds, Self.microsecondsPerDay)
        let microsecondOfDay = microseconds - days * Self.microsecondsPerDay
        let date = CivilDate(daysSinceEpoch: days)
        let secondOfDay = microsecondOfDay / Self.microsecondsPerSecond
        let fraction = microsecondOfDay % Self.microsecondsPerSecond
        if (0...9999).contains(date.year) {
            // The common case, written digit by digit into the 27 bytes of the result, because
            // the batch writes format several times per event.
            return String(unsafeUninitializedCapacity: 27) { buffer in
                func put(_ value: Int64, digits: Int, at offset: Int) {
                    var rest = value
                    for index in stride(from: offset + digits - 1, through: offset, by: -1) {
                        buffer[index] = UInt8(ascii: "0") + UInt8(rest % 10)
                        rest /= 10
                    }
                }
                put(date.year, digits: 4, at: 0)
                buffer[4] = UInt8(ascii: "-")
                put(date.month, digits: 2, at: 5)
                buffer[7] = UInt8(ascii: "-")
                put(date.day, digits: 2, at: 8)
                buffer[10] = UInt8(ascii: "T")
                put(secondOfDay / 3600, digits: 2, at: 11)
                buffer[13] = UInt8(ascii: ":")
                put(secondOfDay / 60 % 60, digits: 2, at: 14)
                buffer[16] = UInt8(ascii: ":")
                put(secondOfDay % 60, digits: 2, at: 17)
                buffer[19] = UInt8(ascii: ".")
                put(fraction, digits: 6, at: 20)
                buffer[26] = UInt8(ascii: "Z")
                return 27
            }
        }
        return String(date.year).leftPadded(to: 4) + "-" + String(date.month).leftPadded(to: 2) + "-"
            + String(date.day).leftPadded(to: 2) + "T" + String(secondOfDay / 3600).leftPadded(to: 2) + ":"
            + String(secondOfDay / 60 % 60).leftPadded(to: 2) + ":" + String(secondOfDay % 60).leftPadded(to: 2) + "."
            + String(fraction).leftPadded(to: 6) + "Z"
    }

    public var description: String { rfc3339 }
}

/// The reason a `time` attribute is not an RFC 3339 date-time.
public struct TimeFormatError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String
}

extension EventTime {
    /// Reads an RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
    ///
    /// - The zone is required, so a local time without an offset is rejected.
    /// - Digits past the sixth fractional one are cut off, never rounded.
    /// - A leap second (`:60`) is read as 59.999999 seconds of the same minute, because
    ///   PostgreSQL and Unix time have no 61st second. It is valid only where the UTC time is
    ///   23:59:60, the one place leap seconds are inserted.
    /// - `T`/`t` and `Z`/`z` are both accepted, as RFC 3339 allows.
    ///
    /// Foundation's date parsers are not used because they go through `Double`, which cannot
    /// hold every microsecond of this century exactly.
    public static func parseRFC3339(_ text: String) throws(TimeFormatError) -> EventTime {
        var reader = FixedFormatReader(Array(text.utf8))

        let year = try reader.digits(4, "year")
        try reader.expect("-", "'-' after the year")
        let month = try reader.digits(2, "month")
        try reader.expect("-", "'-' after the month")
        let day = try reader.digits(2, "day")
        guard reader.take("T") || reader.take("t") else {
            throw TimeFormatError(description: "expected 'T' between the date and the time")
        }
        let hour = try reader.digits(2, "hour")
        try reader.expect(":", "':' after the hour")
        let minute = try reader.digits(2, "minute")
        try reader.expect(":", "':' after the minute")
        let second = try reader.digits(2, "second")

        var microsecond: Int64 = 0
        if reader.take(".") {
            var digitCount = 0
            while let digit = reader.digit() {
                if digitCount < 6 { microsecond = microsecond * 10 + Int64(digit) }
                digitCount += 1
            }
            guard digitCount > 0 else {
                throw TimeFormatError(description: "expected digits after the decimal point of the seconds")
            }
            if digitCount < 6 {
                for _ in digitCount..<6 { microsecond *= 10 }
            }
        }

        var offsetMinutes: Int64 = 0
        if reader.take("Z") || reader.take("z") {
            offsetMinutes = 0
        } else if let sign = reader.sign() {
            let offsetHour = try reader.digits(2, "zone offset hour")
            try reader.expect(":", "':' in the zone offset")
            let offsetMinute = try reader.digits(2, "zone offset minute")
            guard offsetHour <= 23, offsetMinute <= 59 else {
                throw TimeFormatError(description: "zone offset out of range")
            }
            offsetMinutes = sign * (offsetHour * 60 + offsetMinute)
        } else if reader.isAtEnd {
            throw TimeFormatError(description: "missing zone offset; add 'Z' or an offset such as '+02:00'")
        } else {
            throw TimeFormatError(description: "expected 'Z' or a zone offset such as '+02:00'")
        }
        guard reader.isAtEnd else {
            throw TimeFormatError(description: "unexpected text after the zone offset")
        }

        guard year >= 1, (1...12).contains(month), day >= 1,
            day <= CivilDate.daysInMonth(year: year, month: month)
        else {
            throw TimeFormatError(description: "no such date")
        }
        guard hour <= 23, minute <= 59, second <= 60 else {
            throw TimeFormatError(description: "time of day out of range")
        }

        var wholeSeconds = second
        if second == 60 {
            // The leap second stays inside its minute, at its last representable instant.
            wholeSeconds = 59
            microsecond = 999_999
        }

        let days = CivilDate(year: year, month: month, day: day).daysSinceEpoch
        let localSeconds = days * 86_400 + hour * 3600 + minute * 60 + wholeSeconds
        let utcSeconds = localSeconds - offsetMinutes * 60
        // Leap seconds are inserted only as the last second of a UTC day, so 12:30:60Z is not a time.
        if second == 60, (utcSeconds % 86_400 + 86_400) % 86_400 != 86_399 {
            throw TimeFormatError(description: "a leap second is only valid at 23:59:60 UTC")
        }
        return EventTime(microseconds: utcSeconds * microsecondsPerSecond + microsecond)
    }
}

/// A proleptic Gregorian calendar date.
struct CivilDate: Equatable {
    var year: Int64
    var month: Int64
    var day: Int64

    init(year: Int64, month: Int64, day: Int64) {
        self.year = year
        self.month = month
        self.day = day
    }

    static func isLeapYear(_ year: Int64) -> Bool {
        (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
    }

    static func daysInMonth(year: Int64, month: Int64) -> Int64 {
        switch month {
        case 2: return isLeapYear(year) ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }

    /// The number of days since 1970-01-01. The calendar repeats every 400 years (146,097 days).
    /// Counting years from March puts the leap day at the end of each year, so the formula has
    /// no special case for it.
    var daysSinceEpoch: Int64 {
        let marchYear = month <= 2 ? year - 1 : year
        let era = floorDivide(marchYear, 400)
        let yearOfEra = marchYear - era * 400
        let marchMonth = (month + 9) % 12  // March is 0, February is 11
        let dayOfYear = (153 * marchMonth + 2) / 5 + day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        return era * 146_097 + dayOfEra - 719_468  // 719,468 days from 0000-03-01 to 1970-01-01
    }

    /// Creates the date `days` days after 1970-01-01, the inverse of `daysSinceEpoch`.
    init(daysSinceEpoch days: Int64) {
        let shifted = days + 719_468
        let era = floorDivide(shifted, 146_097)
        let dayOfEra = shifted - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let marchMonth = (5 * dayOfYear + 2) / 153
        day = dayOfYear - (153 * marchMonth + 2) / 5 + 1
        month = marchMonth < 10 ? marchMonth + 3 : marchMonth - 9
        year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
    }
}

/// Integer division rounding toward negative infinity, for instants before 1970.
func floorDivide(_ value: Int64, _ divisor: Int64) -> Int64 {
    let quotient = value / divisor
    return (value % divisor != 0 && (value < 0) != (divisor < 0)) ? quotient - 1 : quotient
}

/// Reads a fixed-layout ASCII text left to right.
private struct FixedFormatReader {
    let bytes: [UInt8]
    var index = 0

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
    }

    var isAtEnd: Bool { index == bytes.count }

    mutating func digit() -> Int? {
        guard index < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[index]) else { return nil }
        defer { index += 1 }
        return Int(bytes[index] - UInt8(ascii: "0"))
    }

    mutating func digits(_ count: Int, _ field: String) throws(TimeFormatError) -> Int64 {
        var value: Int64 = 0
        for _ in 0..<count {
            guard let digit = digit() else {
                throw TimeFormatError(description: "expected \(count) digits for the \(field)")
            }
            value = value * 10 + Int64(digit)
        }
        return value
    }

    mutating func take(_ character: Unicode.Scalar) -> Bool {
        guard index < bytes.count, bytes[index] == UInt8(ascii: character) else { return false }
        index += 1
        return true
    }

    mutating func expect(_ character: Unicode.Scalar, _ what: String) throws(TimeFormatError) {
        guard take(character) else { throw TimeFormatError(description: "expected \(what)") }
    }

    /// +1 for `+`, -1 for `-`, nil for anything else.
    mutating func sign() -> Int64? {
        if take("+") { return 1 }
        if take("-") { return -1 }
        return nil
    }
}
