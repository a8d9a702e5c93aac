import Tally
import Testing

@Suite("EventTime")
struct EventTimeTests {
    func parse(_ text: String) throws -> String {
        try EventTime.parseRFC3339(text).rfc3339
    }

    @Test func fractionIsTruncatedToMicrosecondsNotRounded() throws {
        #expect(try parse("2024-12-10T17:36:52.3569999Z") == "2024-12-10T17:36:52.356999Z")
        #expect(try parse("2023-11-16T18:17:03.9799600Z") == "2023-11-16T18:17:03.979960Z")
        #expect(try parse("2024-12-10T17:36:52.356Z") == "2024-12-10T17:36:52.356000Z")
        #expect(try parse("2024-12-10T17:36:46Z") == "2024-12-10T17:36:46.000000Z")
    }

    @Test func leapSecondStaysInItsMinute() throws {
        #expect(try parse("2016-12-31T23:59:60Z") == "2016-12-31T23:59:59.999999Z")
        #expect(try parse("2016-12-31T15:59:60-08:00") == "2016-12-31T23:59:59.999999Z")
        #expect(try parse("2016-12-31T23:59:60.5Z") == "2016-12-31T23:59:59.999999Z")
    }

    @Test func zoneOffsetsConvertToUTC() throws {
        #expect(try parse("2025-03-09T12:00:00-08:00") == "2025-03-09T20:00:00.000000Z")
        #expect(try parse("2025-03-09T12:00:00+05:45") == "2025-03-09T06:15:00.000000Z")
        #expect(try parse("2025-03-09t12:00:00z") == "2025-03-09T12:00:00.000000Z")
        #expect(try parse("2025-01-01T00:30:00+01:00") == "2024-12-31T23:30:00.000000Z")
    }

    @Test func invalidTimesAreRejected() {
        let inputs = [
            "2025-03-09T12:00:00", "2024", "1733850000", "2025-02-29T00:00:00Z", "2025-13-01T00:00:00Z",
            "2025-01-01T24:00:00Z", "2025-01-01 00:00:00Z", "2025-01-01T00:00:00.Z", "2025-01-01T00:00:00+0100",
            "2025-01-01T00:00:00+24:00", "2025-01-01T00:00:00Z ", "0000-01-01T00:00:00Z", "２０２５-01-01T00:00:00Z",
            "2025-01-15T12:30:60Z", "2016-12-31T23:59:60+01:00", "2016-12-31T23:58:60Z",
        ]
        for input in inputs {
            #expect(throws: TimeFormatError.self, "\(input)") { try EventTime.parseRFC3339(input) }
        }
    }

    @Test func leapDayIsAccepted() throws {
        #expect(try parse("2024-02-29T00:00:00Z") == "2024-02-29T00:00:00.000000Z")
        #expect(try parse("2000-02-29T00:00:00Z") == "2000-02-29T00:00:00.000000Z")
    }

    @Test func unixEpochAndEarlierInstantsRoundTrip() throws {
        #expect(try EventTime.parseRFC3339("1970-01-01T00:00:00Z").microseconds == 0)
        #expect(try parse("1969-12-31T23:59:59.999999Z") == "1969-12-31T23:59:59.999999Z")
        #expect(try parse("0001-01-01T00:00:00Z") == "0001-01-01T00:00:00.000000Z")
        #expect(try parse("9999-12-31T23:59:59.999999Z") == "9999-12-31T23:59:59.999999Z")
    }

    @Test func everyDayOfFourHundredYearsRoundTrips() throws {
        let start = try EventTime.parseRFC3339("1900-01-01T00:00:00Z").microseconds
        var firstMismatch: String?
        for index in 0..<146_097 where firstMismatch == nil {
            let time = EventTime(microseconds: start + Int64(index) * EventTime.microsecondsPerDay + 45_296_789_012)
            let text = time.rfc3339
            if (try? EventTime.parseRFC3339(text)) != time { firstMismatch = text }
        }
        #expect(firstMismatch == nil)
    }

    @Test func minuteIsTheStartOfTheUTCMinute() throws {
        #expect(try EventTime.parseRFC3339("2024-12-10T17:36:52.356Z").minute.rfc3339 == "2024-12-10T17:36:00.000000Z")
        #expect(try EventTime.parseRFC3339("1969-12-31T23:59:30Z").minute.rfc3339 == "1969-12-31T23:59:00.000000Z")
    }
}
