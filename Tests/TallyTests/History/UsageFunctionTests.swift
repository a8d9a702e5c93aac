import Tally
import Testing

/// `usage(...)`, the SQL function billing calls, over rollup rows written directly.
@Suite("UsageFunction")
struct UsageFunctionTests {
    /// Minutes around both 2025 daylight-saving changes of New York (9 March and 2 November)
    /// and Kathmandu's midnight (18:15 UTC), with values that are distinct powers of two so
    /// that each sum names the minutes it holds.
    static let readings: [(minute: String, value: Int)] = [
        ("2025-03-08T18:14:00Z", 1),
        ("2025-03-08T18:15:00Z", 2),
        ("2025-03-09T04:59:00Z", 4),
        ("2025-03-09T05:00:00Z", 8),
        ("2025-03-10T03:59:00Z", 16),
        ("2025-03-10T04:00:00Z", 32),
        ("2025-04-01T03:59:00Z", 2048),
        ("2025-11-02T04:00:00Z", 64),
        ("2025-11-02T05:30:00Z", 128),
        ("2025-11-02T06:30:00Z", 256),
        ("2025-11-03T04:59:00Z", 512),
        ("2025-11-03T05:00:00Z", 1024),
    ]

    func insertReadings(_ schema: TestSchema) throws {
        try schema.query(
            """
            INSERT INTO {s}.meters (slug, event_type, aggregation, value_path, group_by, updated_at) VALUES
                ('tokens', 'llm', 'sum', '$.data.tokens', '{"model": "$.data.model"}', now()),
                ('peak', 'llm', 'max', '$.data.tokens', '{}', now()),
                ('level', 'llm', 'latest', '$.data.tokens', '{}', now()),
                ('requests', 'llm', 'count', NULL, '{}', now())
            """)
        for (index, reading) in Self.readings.enumerated() {
            try schema.query(
                """
                INSERT INTO {s}.rollups
                    (meter, subject, groups, minute, event_count, sum, min, max, latest, latest_time, latest_ledger_id, updated_at)
                VALUES ('tokens', 'c1', '{"model": "a"}', $1, 1, $2, $2, $2, $2, $1, $3, now())
                """, [reading.minute, String(reading.value), String(index + 1)])
        }
    }

    /// Returns `start end value` lines of `usage` for meter tokens and subject c1.
    func usage(_ schema: TestSchema, window: String, zone: String, from: String, to: String) throws -> [String] {
        try schema.query(
            """
            SELECT window_start AT TIME ZONE 'UTC', window_end AT TIME ZONE 'UTC', value, event_count
            FROM {s}.usage('tokens', $1, $2, $3, $4, 'c1')
            """, [from, to, window, zone]
        ).map { row in row.map { $0 ?? "NULL" }.joined(separator: " ") }
    }

    @Test func dayWindowsInUTC() async throws {
        try await withTestSchema { schema in
            try insertReadings(schema)
            let rows = try usage(schema, window: "day", zone: "UTC", from: "2025-03-01Z", to: "2025-12-01Z")
            #expect(
                rows == [
                    "2025-03-08 00:00:00 2025-03-09 00:00:00 3 2",
                    "2025-03-09 00:00:00 2025-03-10 00:00:00 12 2",
                    "2025-03-10 00:00:00 2025-03-11 00:00:00 48 2",
                    "2025-04-01 00:00:00 2025-04-02 00:00:00 2048 1",
                    "2025-11-02 00:00:00 2025-11-03 00:00:00 448 3",
                    "2025-11-03 00:00:00 2025-11-04 00:00:00 1536 2",
                ])
        }
    }

    @Test func dayWindowsInKathmandu() async throws {
        try await withTestSchema { schema in
            try insertReadings(schema)
            let rows = try usage(schema, window: "day", zone: "Asia/Kathmandu", from: "2025-03-01Z", to: "2025-12-01Z")
            #expect(
                rows == [
                    "2025-03-07 18:15:00 2025-03-08 18:15:00 1 1",
                    "2025-03-08 18:15:00 2025-03-09 18:15:00 14 3",
                    "2025-03-09 18:15:00 2025-03-10 18:15:00 48 2",
                    "2025-03-31 18:15:00 2025-04-01 18:15:00 2048 1",
                    "2025-11-01 18:15:00 2025-11-02 18:15:00 448 3",
                    "2025-11-02 18:15:00 2025-11-03 18:15:00 1536 2",
                ])
        }
    }

    @Test func dayWindowsInNewYorkAcrossDaylightSaving() async throws {
        try await withTestSchema { schema in
            try insertReadings(schema)
            let rows = try usage(
                schema, window: "day", zone: "America/New_York", from: "2025-03-01Z", to: "2025-12-01Z")
            // 9 March has 23 hours and 2 November has 25; each is one row.
            #expect(
                rows == [
                    "2025-03-08 05:00:00 2025-03-09 05:00:00 7 3",
                    "2025-03-09 05:00:00 2025-03-10 04:00:00 24 2",
                    "2025-03-10 04:00:00 2025-03-11 04:00:00 32 1",
                    "2025-03-31 04:00:00 2025-04-01 04:00:00 2048 1",
                    "2025-11-02 04:00:00 2025-11-03 05:00:00 960 4",
                    "2025-11-03 05:00:00 2025-11-04 05:00:00 1024 1",
                ])
        }
    }

    @Test func monthWindowsInThreeZones() async throws {
        try await withTestSchema { schema in
            try insertReadings(schema)
            let range = (from: "2025-01-01Z", to: "2026-01-01Z")
            #expect(
                try usage(schema, window: "month", zone: "UTC", from: range.from, to: range.to) == [
                    "2025-03-01 00:00:00 2025-04-01 00:00:00 63 6",
                    "2025-04-01 00:00:00 2025-05-01 00:00:00 2048 1",
                    "2025-11-01 00:00:00 2025-12-01 00:00:00 1984 5",
                ])
            #expect(
                try usage(schema, window: "month", zone: "Asia/Kathmandu", from: range.from, to: range.to) == [
                    "2025-02-28 18:15:00 2025-03-31 18:15:00 63 6",
                    "2025-03-31 18:15:00 2025-04-30 18:15:00 2048 1",
                    "2025-10-31 18:15:00 2025-11-30 18:15:00 1984 5",
                ])
            #expect(
                try usage(schema, window: "month", zone: "America/New_York", from: range.from, to: range.to) == [
                    "2025-03-01 05:00:00 2025-04-01 04:00:00 2111 7",
                    "2025-11-01 04:00:00 2025-12-01 05:00:00 1984 5",
                ])
        }
    }

    @Test func hourWindowsKeepTheRepeatedHourApart() async throws {
        try await withTestSchema { schema in
            try insertReadings(schema)
            let newYork = try usage(
                schema, window: "hour", zone: "America/New_York", from: "2025-11-02T05:00Z", to: "2025-11-02T07:00Z")
            #expect(
                newYork == [
                    "2025-11-02 05:00:00 2025-11-02 06:00:00 128 1",
                    "2025-11-02 06:00:00 2025-11-02 07:00:00 256 1",
                ])
            let kathmandu = try usage(
                schema, window: "hour", zone: "Asia/Kathmandu", from: "2025-03-08T18:00Z", to: "2025-03-08T19:00Z")
            #expect(
                kathmandu == [
                    "2025-03-08 17:15:00 2025-03-08 18:15:00 1 1",
                    "2025-03-08 18:15:00 2025-03-08 19:15:00 2 1",
                ])
        }
    }

    @Test func aggregationsCombineMinutes() async throws {
        try await withTestSchema { schema in
            try insertReadings(schema)
            // Two minutes of one hour for each meter. The later minute has the lower latest
            // value, and its max is lower than the earlier one's.
            for (meter, minute, count, sum, low, high, latest, latestTime) in [
                ("peak", "2025-05-01T10:01Z", 2, "12", "3", "9", "3", "2025-05-01T10:01:30Z"),
                ("peak", "2025-05-01T10:02Z", 1, "5", "5", "5", "5", "2025-05-01T10:02:10Z"),
                ("level", "2025-05-01T10:01Z", 2, "12", "3", "9", "9", "2025-05-01T10:01:50Z"),
                ("level", "2025-05-01T10:02Z", 3, "6", "1", "4", "2", "2025-05-01T10:02:40Z"),
                ("requests", "2025-05-01T10:01Z", 2, "2", "1", "1", "1", "2025-05-01T10:01:50Z"),
                ("requests", "2025-05-01T10:02Z", 3, "3", "1", "1", "1", "2025-05-01T10:02:40Z"),
            ] {
                try schema.query(
                    """
                    INSERT INTO {s}.rollups
                        (meter, subject, groups, minute, event_count, sum, min, max, latest, latest_time, latest_ledger_id, updated_at)
                    VALUES ($1, 'c2', '{}', $2, $3, $4, $5, $6, $7, $8, 1, now())
                    """, [meter, minute, String(count), sum, low, high, latest, latestTime])
            }
            func value(_ meter: String) throws -> String? {
                try schema.scalar(
                    "SELECT value FROM {s}.usage($1, '2025-05-01Z', '2025-05-02Z', 'hour', 'Europe/Paris', 'c2')",
                    [meter])
            }
            #expect(try value("peak") == "9")
            #expect(try value("level") == "2")
            #expect(try value("requests") == "5")
        }
    }

    @Test func groupKeysSelectTheGroups() async throws {
        try await withTestSchema { schema in
            try insertReadings(schema)
            try schema.query(
                """
                INSERT INTO {s}.rollups
                    (meter, subject, groups, minute, event_count, sum, min, max, latest, latest_time, latest_ledger_id, updated_at)
                VALUES ('tokens', 'c1', '{"model": "b"}', '2025-03-08T18:20Z', 1, 100, 100, 100, 100, '2025-03-08T18:20Z', 99, now())
                """)
            let byModel = try schema.query(
                "SELECT groups::text, value FROM {s}.usage('tokens', '2025-03-08T18:00Z', '2025-03-08T19:00Z', 'hour', 'UTC', 'c1')"
            )
            #expect(byModel == [[#"{"model": "a"}"#, "3"], [#"{"model": "b"}"#, "100"]])
            let total = try schema.query(
                "SELECT groups::text, value FROM {s}.usage('tokens', '2025-03-08T18:00Z', '2025-03-08T19:00Z', 'hour', 'UTC', 'c1', '{}')"
            )
            #expect(total == [["{}", "103"]])
        }
    }

    @Test func invalidWindowAndZoneAreRejected() async throws {
        try await withTestSchema { schema in
            try insertReadings(schema)
            #expect(throws: (any Error).self) {
                try schema.query("SELECT * FROM {s}.usage('tokens', '2025-01-01Z', '2025-02-01Z', 'week')")
            }
            #expect(throws: (any Error).self) {
                try schema.query(
                    "SELECT * FROM {s}.usage('tokens', '2025-01-01Z', '2025-02-01Z', 'day', 'Mars/Olympus')")
            }
            #expect(throws: (any Error).self) {
                try schema.query("SELECT * FROM {s}.usage('unknown', '2025-01-01Z', '2025-02-01Z', 'day')")
            }
        }
    }
}
