import Foundation
import Kafka
import Tally
import Testing

/// The worker end to end: messages produced to librdkafka's mock cluster, consumed as a
/// consumer group, written to a real PostgreSQL.
@Suite("Worker")
struct WorkerTests {
    @Test func everyReasonCodeKeepsTheRawBytes() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let t0 = "2025-01-15T12:00:10Z"
            func event(
                _ id: String, time: String = t0, data: String = #"{"quantity":1}"#, subject: String = #""cust-1""#
            ) -> [UInt8] {
                Array(
                    #"{"specversion":"1.0","id":"\#(id)","source":"test","type":"api.call","subject":\#(subject),"time":"\#(time)","data":\#(data)}"#
                        .utf8)
            }
            let cases: [(String, [UInt8]?)] = [
                ("null_value", nil),
                ("empty_value", []),
                (
                    "payload_too_large",
                    event("big", data: #"{"quantity":1,"pad":""# + String(repeating: "x", count: 3000) + #""}"#)
                ),
                ("invalid_utf8", Array(#"{"specversion":"1.0","id":"u"#.utf8) + [0xFF, 0xFE] + Array(#""}"#.utf8)),
                ("malformed_json", Array(#"{"id":"#.utf8)),
                ("duplicate_json_key", Array(#"{"id":"d2","id":"d3"}"#.utf8)),
                (
                    "missing_attribute",
                    Array(
                        #"{"specversion":"1.0","id":"m","type":"api.call","subject":"c","time":"2025-01-15T12:00:10Z"}"#
                            .utf8)
                ),
                ("invalid_attribute", event("ia", subject: #"["cust-1"]"#)),
                (
                    "unsupported_specversion",
                    Array(
                        #"{"specversion":"0.3","id":"sv","source":"test","type":"api.call","subject":"c","time":"2025-01-15T12:00:10Z"}"#
                            .utf8)
                ),
                ("invalid_time", event("it", time: "2024")),
                ("too_late", event("tl", time: "2024-01-15T12:00:10Z")),
                ("time_in_future", event("tf", time: "2099-01-01T00:00:00Z")),
                ("invalid_value", event("iv", data: #"{"quantity":"abc"}"#)),
                ("nul_character", event("nul", subject: #""acme\u0000x""#)),
                ("duplicate_id_conflict", event("ok", data: #"{"quantity":2}"#)),
            ]
            // The first "ok" is accepted; the second, with another payload, conflicts with it.
            try kafka.produce([event("ok")])
            let headers = [
                KafkaHeader(name: "trace", value: "abc"), KafkaHeader(name: [0x78, 0xFF], value: [0xFF]),
                KafkaHeader(name: "nothing", value: nil),
            ]
            for (_, value) in cases {
                try kafka.produce([value], key: Array("key-1".utf8), headers: headers)
            }
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0()) { configuration in
                configuration.ingest.maxPayloadBytes = 2048
            }

            let rows = try schema.connection.execute(
                "SELECT kafka_offset, reason, encode(message_value, 'hex'), message_value IS NULL, encode(message_key, 'hex'), headers::text FROM \(schema.name).dead_letters ORDER BY kafka_offset"
            )
            #expect(rows.rowCount == cases.count)
            for (index, (reason, value)) in cases.enumerated() where index < rows.rowCount {
                #expect(rows.int(row: index, column: 0) == Int64(index + 1))
                #expect(rows.string(row: index, column: 1) == reason)
                if let value {
                    #expect(rows.string(row: index, column: 2) == value.hexString, "\(reason) bytes")
                } else {
                    #expect(rows.string(row: index, column: 3) == "t", "\(reason) is a tombstone")
                }
                #expect(rows.string(row: index, column: 4) == Array("key-1".utf8).hexString)
                #expect(
                    rows.string(row: index, column: 5)
                        == #"[{"name": "trace", "value": "abc"}, {"name_hex": "78ff", "value_hex": "ff"}, {"name": "nothing", "value": null}]"#
                )
            }
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 1)
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == String(cases.count + 1))
            let counted = try schema.query("SELECT reason, count::text FROM {s}.dead_letter_counts ORDER BY reason")
            #expect(counted == cases.map { [$0.0, "1"] }.sorted { $0[0]! < $1[0]! })
            try schema.expectInvariants()
        }
    }

    @Test func duplicatesWithinABatchAcrossBatchesAndAcrossPartitions() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            let clock = try clockNearT0()
            try kafka.produce(
                [apiCall("e1", "cust-1", "2"), apiCall("e1", "cust-1", "2"), apiCall("e2", "cust-1", "3")], partition: 0
            )
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)

            try kafka.produce([apiCall("e2", "cust-1", "3")], partition: 0)
            try kafka.produce([apiCall("e1", "cust-1", "2"), apiCall("e3", "cust-1", "4")], partition: 1)
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)

            #expect(try schema.query("SELECT event_id FROM {s}.ledger ORDER BY event_id") == [["e1"], ["e2"], ["e3"]])
            let duplicates = try schema.query(
                "SELECT kafka_partition::text, kafka_offset::text, event_id FROM {s}.duplicates ORDER BY 1, 2")
            #expect(duplicates == [["0", "1", "e1"], ["0", "3", "e2"], ["1", "0", "e1"]])
            #expect(try schema.scalar("SELECT sum FROM {s}.rollups WHERE meter = 'api_calls'") == "9")
            #expect(try schema.scalar("SELECT event_count FROM {s}.rollups WHERE meter = 'calls'") == "3")
            #expect(
                try schema.query("SELECT partition::text, duplicates::text FROM {s}.partition_offsets ORDER BY 1") == [
                    ["0", "2"], ["1", "1"],
                ])
            try schema.expectInvariants()
        }
    }

    @Test func conflictingPayloadIsDeadLetteredAndTheFirstStaysCounted() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([apiCall("e1", "cust-1", "5"), apiCall("e1", "cust-1", "6")])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            #expect(try schema.scalar("SELECT reason FROM {s}.dead_letters") == "duplicate_id_conflict")
            #expect(try schema.scalar("SELECT detail LIKE '%ledger row %' FROM {s}.dead_letters") == "t")
            #expect(
                try schema.scalar("SELECT d.original_ledger_id = l.id FROM {s}.dead_letters d, {s}.ledger l") == "t")
            #expect(try schema.scalar("SELECT sum FROM {s}.rollups WHERE meter = 'api_calls'") == "5")
            try schema.expectInvariants()
        }
    }

    @Test func quantitiesAreExactDecimals() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                apiCall("a", "cust-1", "0.1"), apiCall("b", "cust-1", "0.2"), apiCall("c", "cust-2", "0.691"),
                apiCall("d", "cust-3", "9007199254740993"), apiCall("e", "cust-4", "0.027121761950711698"),
                apiCall("f", "cust-5", #""12.5""#), apiCall("g", "cust-6", "12.5"),
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            let sums = try schema.query(
                "SELECT subject, sum::text FROM {s}.rollups WHERE meter = 'api_calls' ORDER BY subject")
            #expect(
                sums == [
                    ["cust-1", "0.3"], ["cust-2", "0.691"], ["cust-3", "9007199254740993"],
                    ["cust-4", "0.027121761950711698"], ["cust-5", "12.5"], ["cust-6", "12.5"],
                ])
            let stored = try schema.query(
                "SELECT event_id, meters -> 'api_calls' ->> 'quantity' FROM {s}.ledger ORDER BY event_id")
            #expect(
                stored.map { $0[1] } == [
                    "0.1", "0.2", "0.691", "9007199254740993", "0.027121761950711698", "12.5", "12.5",
                ])
            try schema.expectInvariants()
        }
    }

    @Test func timesAreTruncatedToMicrosecondsAndLeapSecondsStayInTheirMinute() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([
                apiCall("t1", "cust-1", "1", time: "2016-12-31T23:59:58.9999999Z"),
                apiCall("t2", "cust-1", "1", time: "2016-12-31T23:59:60Z"),
                apiCall("t3", "cust-1", "1", time: "2016-12-31T15:59:60-08:00"),
            ])
            let clock = ManualClock(try EventTime.parseRFC3339("2017-01-02T00:00:00Z"))
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)

            let times = try schema.query(
                "SELECT event_id, to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM {s}.ledger ORDER BY event_id"
            )
            #expect(
                times == [
                    ["t1", "2016-12-31T23:59:58.999999"], ["t2", "2016-12-31T23:59:59.999999"],
                    ["t3", "2016-12-31T23:59:59.999999"],
                ])
            let minutes = try schema.query(
                "SELECT to_char(minute AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'), sum::text FROM {s}.rollups WHERE meter = 'api_calls'"
            )
            #expect(minutes == [["2016-12-31 23:59", "3"]])
            try schema.expectInvariants()
        }
    }

    @Test func oneEventFeedsThreeMeters() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            let meters = [
                Meter(
                    slug: "input_tokens", eventType: "llm.request", aggregation: .sum,
                    valuePath: try JSONPath("$.data.input_tokens"),
                    groupBy: [GroupBy(name: "model", path: try JSONPath("$.data.model"))]),
                Meter(
                    slug: "output_tokens", eventType: "llm.request", aggregation: .sum,
                    valuePath: try JSONPath("$.data.output_tokens")),
                Meter(slug: "requests", eventType: "llm.request", aggregation: .count, valuePath: nil),
            ]
            try kafka.produce([
                #"{"specversion":"1.0","id":"req-7f3a","source":"api-gateway","type":"llm.request","subject":"customer-42","time":"2025-01-15T12:15:30.123456Z","data":{"model":"gpt-x","input_tokens":1200,"output_tokens":340}}"#,
                #"{"specversion":"1.0","id":"img-1","source":"api-gateway","type":"image.generated","subject":"customer-42","time":"2025-01-15T12:15:31Z","data":{"size":"1024x1024"}}"#,
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0(), meters: meters)

            let rollups = try schema.query(
                "SELECT meter, subject, groups::text, value::text FROM {s}.usage_per_minute ORDER BY meter")
            #expect(
                rollups == [
                    ["input_tokens", "customer-42", #"{"model": "gpt-x"}"#, "1200"],
                    ["output_tokens", "customer-42", "{}", "340"],
                    ["requests", "customer-42", "{}", "1"],
                ])
            #expect(
                try schema.scalar(
                    "SELECT jsonb_object_keys(meters) FROM {s}.ledger WHERE event_id = 'req-7f3a' ORDER BY 1 LIMIT 1")
                    == "input_tokens")
            #expect(try schema.scalar("SELECT meters::text FROM {s}.ledger WHERE event_id = 'img-1'") == "{}")
            #expect(try schema.scalar("SELECT unmetered FROM {s}.partition_offsets") == "1")
            try schema.expectInvariants()
        }
    }

    @Test func lateEventUpdatesAnOlderMinute() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([apiCall("a", "cust-1", "1", time: "2025-01-15T12:05:10Z")])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            try kafka.produce([
                apiCall("b", "cust-1", "1", time: "2025-01-15T12:00:10Z"),
                apiCall("c", "cust-1", "1", time: "2025-01-13T12:00:10Z"),
                apiCall("d", "cust-1", "2", time: "2025-01-15T12:05:59.999999Z"),
            ])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            let rows = try schema.query(
                "SELECT to_char(minute AT TIME ZONE 'UTC', 'MM-DD HH24:MI'), sum::text FROM {s}.rollups WHERE meter = 'api_calls' ORDER BY minute"
            )
            #expect(rows == [["01-13 12:00", "1"], ["01-15 12:00", "1"], ["01-15 12:05", "3"]])
            #expect(try schema.count("SELECT count(*) FROM {s}.dead_letters") == 0)
            try schema.expectInvariants()
        }
    }

    @Test func restartResumesAtTheStoredOffsetWithoutNewRows() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            let clock = try clockNearT0()
            try kafka.produce([apiCall("a"), apiCall("b")], partition: 0)
            try kafka.produce([apiCall("c")], partition: 1)
            // Without copies in Kafka, a worker that trusted Kafka's offsets would read everything again.
            try await ingestAll(kafka: kafka, schema: schema, clock: clock) { $0.ingest.commitToKafka = false }
            try await ingestAll(kafka: kafka, schema: schema, clock: clock) { $0.ingest.commitToKafka = false }
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 3)
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 0)

            try kafka.produce([apiCall("d")], partition: 1)
            try await ingestAll(kafka: kafka, schema: schema, clock: clock)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 4)
            #expect(try schema.count("SELECT count(*) FROM {s}.duplicates") == 0)
            #expect(
                try schema.query("SELECT next_offset::text FROM {s}.partition_offsets ORDER BY partition") == [
                    ["2"], ["2"],
                ])
            try schema.expectInvariants()
        }
    }

    @Test func partitionWithoutStoredOffsetStartsAtTheLogStart() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            // Past 5 MiB per partition the 2.0.2 mock cluster drops the oldest message sets,
            // as retention would, so the log no longer starts at 0.
            let padding = String(repeating: "x", count: 4000)
            let events = (0..<1700).map { index in
                #"{"specversion":"1.0","id":"p\#(index)","source":"test","type":"api.call","subject":"cust-1","time":"2025-01-15T12:00:10Z","data":{"quantity":1,"pad":"\#(padding)"}}"#
            }
            try kafka.produce(events)
            let marks = try kafka.producer.watermarks(topic: "usage", partition: 0, timeoutMilliseconds: 10_000)
            #expect(marks.low > 0, "the mock cluster kept the whole log; the test needs a log start above 0")

            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            #expect(try schema.scalar("SELECT first_offset FROM {s}.partition_offsets") == String(marks.low))
            #expect(try schema.scalar("SELECT next_offset FROM {s}.partition_offsets") == String(marks.high))
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == Int(marks.high - marks.low))
            #expect(try schema.scalar("SELECT min(kafka_offset) FROM {s}.ledger") == String(marks.low))
            try schema.expectInvariants()
        }
    }

    @Test func passwordsNeverReachTheLogs() async throws {
        try await withTestSchema { schema in
            let sink = LogSink.capturing()
            let logger = Logger(level: .debug, sink: sink)
            let kafka = try TestKafka()
            try kafka.produce([apiCall("a")])

            // librdkafka logs its whole configuration with debug=conf; the worker must not let
            // the password through.
            var configuration = try testConfiguration(kafka: kafka, schema: schema)
            configuration.kafka.properties += [
                ("sasl.username", "tally"), ("sasl.password", "kafka-hunter2"), ("debug", "conf"), ("log_level", "7"),
            ]
            let worker = RunningWorker(configuration: configuration, clock: try clockNearT0(), logger: logger)
            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()
            #expect(sink.capturedLines.contains { $0.contains("sasl.username") })

            configuration.postgres.conninfo = "host=127.0.0.1 port=1 user=tally password=pg-hunter2"
            let failing = Worker(configuration: configuration, logger: logger, stopSignal: StopSignal())
            do {
                try failing.run()
                Issue.record("the worker started without a database")
            } catch {
                #expect(!String(describing: error).contains("hunter2"))
                #expect(String(describing: error).contains("cannot connect to PostgreSQL"))
            }
            #expect(!sink.capturedLines.contains { $0.contains("hunter2") })
        }
    }

    @Test func secondGroupOnOneSchemaIsReported() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka()
            try kafka.produce([apiCall("a")])
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())
            #expect(try schema.scalar("SELECT consumer_group FROM {s}.partition_offsets") == "tally-test")

            let sink = LogSink.capturing()
            var configuration = try testConfiguration(kafka: kafka, schema: schema)
            configuration.kafka.groupID = "other-group"
            let worker = RunningWorker(
                configuration: configuration, clock: try clockNearT0(), logger: Logger(level: .warning, sink: sink))
            try await worker.waitUntilCaughtUp(with: kafka)
            try worker.stop()
            let warning = sink.capturedLines.first { $0.contains("last written by another consumer group") }
            #expect(warning?.contains("kafka.other_group_id=tally-test") == true)
            #expect(try schema.count("SELECT count(*) FROM {s}.ledger") == 1)
        }
    }

    @Test func statsReportCountsPerPartitionAndMeter() async throws {
        try await withTestSchema { schema in
            let kafka = try TestKafka(partitions: 2)
            try kafka.produce([apiCall("a", "cust-1", "2"), apiCall("a", "cust-1", "2"), #"{"id":"#], partition: 0)
            try kafka.produce([apiCall("b", "cust-2", "3")], partition: 1)
            try await ingestAll(kafka: kafka, schema: schema, clock: try clockNearT0())

            let store = try LedgerStore(settings: schema.settings, logger: schema.logger)
            let report = try store.statsReport(meters: try standardMeters(), partitionCounts: ["usage": 2])
            #expect(report.partitions.map(\.storedOffset) == [3, 1])
            #expect(report.partitions.map(\.accepted) == [1, 1])
            #expect(report.partitions[0].duplicates == 1)
            #expect(report.partitions[0].deadLetters == ["malformed_json": 1])
            #expect(report.meters.map(\.total) == ["5", "2"])
            #expect(report.meters.map(\.subjects) == [2, 2])
        }
    }
}
