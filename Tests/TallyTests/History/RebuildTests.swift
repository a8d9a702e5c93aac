import Foundation
import Tally
import Testing

/// `rebuildRollups` over ledger rows written by the worker.
@Suite("Rebuild")
struct RebuildTests {
    /// Returns a meter added after ingest: the largest quantity per subject and model.
    static func largestCall() throws -> Meter {
        Meter(
            slug: "largest_call", eventType: "api.call", aggregation: .max, valuePath: try JSONPath("$.data.quantity"),
            groupBy: [GroupBy(name: "model", path: try JSONPath("$.data.model"))])
    }

    static func events() -> [String] {
        (0..<40).map { index in
            let minute = String(index % 4).leftPadded(2)
            return
                #"{"specversion":"1.0","id":"r\#(index)","source":"test","type":"api.call","subject":"cust-\#(index % 3)","time":"2025-01-15T12:\#(minute):\#(String(index).leftPadded(2))Z","data":{"quantity":\#(index % 7 + 1),"model":"m\#(index % 2)"}}"#
        }
    }

    static func rollups(_ schema: TestSchema, meter: String) throws -> [[String?]] {
        try schema.query(
            """
            SELECT subject, groups::text, minute::text, event_count::text, sum::text, min::text, max::text, latest::text,
                   latest_time::text
            FROM {s}.rollups WHERE meter = $1 ORDER BY 1, 2, 3
            """, [meter])
    }

    @Test func newMeterMatchesOneThatExistedFromTheStart() async throws {
        try await withTestSchema { fromTheStart in
            try await withTestSchema { addedLater in
                let kafka = try TestKafka()
                let clock = try clockNearT0()
                try kafka.produce(Self.events())
                let allMeters = try standardMeters() + [Self.largestCall()]
                try await ingestAll(kafka: kafka, schema: fromTheStart, clock: clock, meters: allMeters)
                try await ingestAll(kafka: kafka, schema: addedLater, clock: clock)
                #expect(try Self.rollups(addedLater, meter: "largest_call").isEmpty)

                let store = try LedgerStore(settings: addedLater.settings, logger: addedLater.logger)
                try store.recordMeters(allMeters)
                let summary = try store.rebuildRollups(
                    meter: Self.largestCall(), from: try EventTime.parseRFC3339("2025-01-15T00:00:00Z"),
                    to: try EventTime.parseRFC3339("2025-01-16T00:00:00Z"))

                #expect(summary.events == 40)
                #expect(summary.changedReadings == 40)
                #expect(summary.unreadable == 0)
                let expected = try Self.rollups(fromTheStart, meter: "largest_call")
                #expect(expected.count == 12)
                #expect(try Self.rollups(addedLater, meter: "largest_call") == expected)
                let readings = "SELECT event_id, meters::text FROM {s}.ledger ORDER BY event_id"
                #expect(try addedLater.query(readings) == (try fromTheStart.query(readings)))
                try addedLater.expectInvariants()

                // Running it again changes no reading and writes the same rows.
                let again = try store.rebuildRollups(
                    meter: Self.largestCall(), from: try EventTime.parseRFC3339("2025-01-15T00:00:00Z"),
                    to: try EventTime.parseRFC3339("2025-01-16T00:00:00Z"))
                #expect(again.changedReadings == 0)
                #expect(try Self.rollups(addedLater, meter: "largest_call") == expected)
            }
        }
    }

    @Test func rangeLeavesOtherMinutesAlone() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce(Self.events())
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            try store.recordMeters(try standardMeters() + [Self.largestCall()])
            // Minutes 12:01 and 12:02 only.
            let summary = try store.rebuildRollups(
                meter: Self.largestCall(), from: try EventTime.parseRFC3339("2025-01-15T12:01:00Z"),
                to: try EventTime.parseRFC3339("2025-01-15T12:03:00Z"))
            #expect(summary.events == 20)
            #expect(
                try schema.query(
                    "SELECT DISTINCT minute::text FROM {s}.rollups WHERE meter = 'largest_call' ORDER BY 1")
                    == [["2025-01-15 12:01:00+00"], ["2025-01-15 12:02:00+00"]])
            try schema.expectInvariants()
        }
    }

    @Test func rebuildDuringLiveIngestionLosesNoEvent() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            let clock = try clockNearT0()
            let worker = RunningWorker(configuration: try testConfiguration(kafka: kafka, schema: schema), clock: clock)
            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            let meter = try standardMeters()[0]
            let from = try EventTime.parseRFC3339("2025-01-15T12:00:00Z")
            let to = try EventTime.parseRFC3339("2025-01-15T13:00:00Z")

            func produceRound(_ round: Int) throws {
                let values = (0..<40).map { apiCall("l\(round)-\($0)", "cust-\($0 % 5)", "1.25") }
                try kafka.produce(Array(values[..<20]), partition: 0)
                try kafka.produce(Array(values[20...]), partition: 1)
            }
            // Once the worker writes, nine more rounds: produce 40 events, then rebuild
            // api_calls while the worker writes them.
            try produceRound(0)
            let deadline = Date().addingTimeInterval(30)
            while try schema.count("SELECT count(*) FROM {s}.ledger") == 0, Date() < deadline {
                try await Task.sleep(nanoseconds: 20_000_000)
            }
            for round in 1..<10 {
                try produceRound(round)
                _ = try store.rebuildRollups(meter: meter, from: from, to: to)
                try await Task.sleep(nanoseconds: 20_000_000)
            }
            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()
            _ = try store.rebuildRollups(meter: meter, from: from, to: to)

            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 400)
            #expect(try schema.scalar("SELECT sum(sum) FROM {s}.rollups WHERE meter = 'api_calls'") == "500.00")
            #expect(try schema.scalar("SELECT sum(event_count) FROM {s}.rollups WHERE meter = 'calls'") == "400")
            try schema.expectInvariants()
        }
    }
}

extension String {
    /// Pads with zeros on the left to `width` characters.
    fileprivate func leftPadded(_ width: Int) -> String {
        String(repeating: "0", count: max(0, width - count)) + self
    }
}
