import Foundation
import JSON
import Kafka
import Postgres
import Tally

enum StatsCommand: Command {
    static let help = """
        Usage: tally stats --config FILE [--json] [--offline] [--check] [--log-level LEVEL]

        Prints, per partition, the stored offset (the next offset Tally reads), the Kafka log
        start and end, the lag, and the counts of accepted events, unmetered events, duplicates,
        offsets without a message (GAPS; LOST: of those, deleted by retention before Tally read
        them) and dead letters by reason; then, per meter, its total over all rollups, its event
        count and its number of subjects; then the retention gaps, the workers and their status,
        and a STATUS line: ok, or each problem found.

        Options:
          --config FILE      The YAML configuration of the worker.
          --json             Print one JSON document instead of tables.
          --offline          Do not ask Kafka for log starts and ends; show PostgreSQL's view only.
          --check            Exit with status 3 when the STATUS line reports a problem, for health checks.
          --log-level LEVEL  debug, info, warning or error (default: warning).

        Problems are: a worker that reports no progress while its partitions have lag; a silent
        worker (no status for 30 s, killed or blocked) whose partitions no live worker reports; a
        partition with lag whose stored offset has not moved for ingest.no_progress_timeout; a
        partition whose log starts beyond its stored offset (retention deleted unread messages).

        A meter's total is over all subjects and minutes: the sum for sum and count meters,
        the lowest or highest value for min and max, and the value of the latest event for
        latest. In --json output, totals are strings holding exact decimals, because JSON
        readers that use binary floating point would round them. Accepted events include the
        unmetered ones. Without --offline, the command waits up to 10 s for the brokers.
        """

    static let options = OptionSpec(options: [
        "config": .value, "json": .flag, "offline": .flag, "check": .flag, "log-level": .value,
    ])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .warning)

        let store: LedgerStore
        do {
            store = try LedgerStore(settings: configuration.postgres, logger: logger)
        } catch let error as PostgresError where error.kind == .connectionFailed {
            throw CommandFailure("cannot connect to PostgreSQL: \(error.message)")
        }

        var partitionCounts: [String: Int] = [:]
        var consumer: KafkaConsumer?
        if !arguments.has("offline") {
            do {
                let client = try KafkaConsumer(properties: configuration.kafka.consumerProperties)
                partitionCounts = try client.partitionCounts(
                    topics: configuration.kafka.topics, timeoutMilliseconds: 10_000)
                consumer = client
            } catch {
                throw CommandFailure(
                    "cannot reach the Kafka brokers at \(configuration.kafka.brokers): \(error); use --offline to skip Kafka"
                )
            }
        }

        var report = try store.statsReport(meters: configuration.meters, partitionCounts: partitionCounts)
        if let consumer {
            for index in report.partitions.indices
            where partitionCounts[report.partitions[index].partition.topic] != nil {
                let partition = report.partitions[index].partition
                report.partitions[index].watermarks = try consumer.watermarks(
                    topic: partition.topic, partition: partition.partition, timeoutMilliseconds: 10_000)
            }
        }

        let problems = report.problems(
            stalledAfterSeconds: Int64(configuration.ingest.noProgressTimeoutMilliseconds / 1000))
        print(arguments.has("json") ? renderJSON(report, problems: problems) : renderTables(report, problems: problems))
        return arguments.has("check") && !problems.isEmpty ? 3 : 0
    }

    static func renderTables(_ report: StatsReport, problems: [String] = []) -> String {
        var partitionRows = [
            [
                "PARTITION", "FIRST", "STORED", "LOG START", "LOG END", "LAG", "ACCEPTED", "UNMETERED", "DUPLICATES",
                "GAPS", "LOST", "DEAD LETTERS",
            ]
        ]
        for row in report.partitions {
            let deadLetters = row.deadLetters.keys.sorted().map { "\($0)=\(row.deadLetters[$0]!)" }.joined(
                separator: " ")
            partitionRows.append([
                row.partition.description,
                row.firstOffset.map(String.init) ?? "-",
                row.storedOffset.map(String.init) ?? "-",
                row.watermarks.map { String($0.low) } ?? "-",
                row.watermarks.map { String($0.high) } ?? "-",
                row.lag.map(String.init) ?? "-",
                String(row.accepted), String(row.unmetered), String(row.duplicates), String(row.gapOffsets),
                String(row.retentionGapOffsets), deadLetters.isEmpty ? "0" : deadLetters,
            ])
        }

        var meterRows = [["METER", "AGGREGATION", "TOTAL", "EVENTS", "SUBJECTS"]]
        for meter in report.meters {
            meterRows.append([
                meter.slug, meter.aggregation, meter.total ?? "-", String(meter.events), String(meter.subjects),
            ])
        }

        let deadLetters = report.deadLettersByReason
        let reasons = deadLetters.keys.sorted().map { "\($0)=\(deadLetters[$0]!)" }.joined(separator: " ")
        let totals =
            "accepted=\(report.totalAccepted) unmetered=\(report.totalUnmetered) duplicates=\(report.totalDuplicates) "
            + "dead_letters=\(deadLetters.values.reduce(0, +))" + (reasons.isEmpty ? "" : " (\(reasons))")
        var text = table(partitionRows) + "\n\n" + table(meterRows) + "\n\nTOTAL " + totals
        if !report.retentionGaps.isEmpty {
            var gapRows = [["LOST TO RETENTION", "FROM", "TO", "OFFSETS", "DETECTED AT"]]
            for gap in report.retentionGaps {
                gapRows.append([
                    gap.partition.description, String(gap.fromOffset), String(gap.toOffset),
                    String(gap.toOffset - gap.fromOffset + 1), gap.detectedAt,
                ])
            }
            text += "\n\n" + table(gapRows)
        }
        if !report.workers.isEmpty {
            var workerRows = [["WORKER", "GROUP", "STATUS", "PARTITIONS", "LAG", "PROGRESS AGO", "SEEN AGO", "DETAIL"]]
            for worker in report.workers {
                workerRows.append([
                    worker.workerID, worker.consumerGroup, worker.shownStatus,
                    worker.partitions.isEmpty ? "-" : worker.partitions, worker.lag.map(String.init) ?? "-",
                    worker.secondsSinceProgress.map { "\($0)s" } ?? "-", "\(worker.secondsSinceHeartbeat)s",
                    worker.detail.isEmpty ? "-" : worker.detail,
                ])
            }
            text += "\n\n" + table(workerRows)
        }
        text += "\n\nSTATUS " + (problems.isEmpty ? "ok" : problems.joined(separator: "\nSTATUS "))
        return text
    }

    static func renderJSON(_ report: StatsReport, problems: [String] = []) -> String {
        let writer = JSONWriter()
        writer.beginObject()
        writer.key("partitions")
        writer.beginArray()
        for row in report.partitions {
            writer.beginObject()
            writer.field("topic", row.partition.topic)
            writer.field("partition", Int64(row.partition.partition))
            writer.field("first_offset", row.firstOffset)
            writer.field("stored_offset", row.storedOffset)
            writer.field("log_start", row.watermarks?.low)
            writer.field("log_end", row.watermarks?.high)
            writer.field("lag", row.lag)
            writer.field("accepted", row.accepted)
            writer.field("unmetered", row.unmetered)
            writer.field("duplicates", row.duplicates)
            writer.field("gap_offsets", row.gapOffsets)
            writer.field("retention_gap_offsets", row.retentionGapOffsets)
            writer.field("seconds_since_update", row.secondsSinceUpdate)
            writer.key("dead_letters")
            writer.beginObject()
            for reason in row.deadLetters.keys.sorted() {
                writer.key(reason)
                writer.number(row.deadLetters[reason]!)
            }
            writer.endObject()
            writer.endObject()
        }
        writer.endArray()

        writer.key("meters")
        writer.beginArray()
        for meter in report.meters {
            writer.beginObject()
            writer.field("slug", meter.slug)
            writer.field("aggregation", meter.aggregation)
            // A string, because many JSON readers would round a long decimal number.
            writer.field("total", meter.total)
            writer.field("events", meter.events)
            writer.field("subjects", meter.subjects)
            writer.endObject()
        }
        writer.endArray()

        writer.key("totals")
        writer.beginObject()
        writer.field("accepted", report.totalAccepted)
        writer.field("unmetered", report.totalUnmetered)
        writer.field("duplicates", report.totalDuplicates)
        writer.key("dead_letters")
        writer.beginObject()
        let deadLetters = report.deadLettersByReason
        for reason in deadLetters.keys.sorted() {
            writer.key(reason)
            writer.number(deadLetters[reason]!)
        }
        writer.endObject()
        writer.endObject()

        writer.key("retention_gaps")
        writer.beginArray()
        for gap in report.retentionGaps {
            writer.beginObject()
            writer.field("topic", gap.partition.topic)
            writer.field("partition", Int64(gap.partition.partition))
            writer.field("from_offset", gap.fromOffset)
            writer.field("to_offset", gap.toOffset)
            writer.field("detected_at", gap.detectedAt)
            writer.endObject()
        }
        writer.endArray()

        writer.key("workers")
        writer.beginArray()
        for worker in report.workers {
            writer.beginObject()
            writer.field("worker_id", worker.workerID)
            writer.field("consumer_group", worker.consumerGroup)
            writer.field("host", worker.host)
            writer.field("pid", worker.pid)
            writer.field("status", worker.status)
            writer.key("silent")
            writer.bool(worker.isSilent)
            writer.field("detail", worker.detail)
            writer.field("partitions", worker.partitions)
            writer.field("lag", worker.lag)
            writer.field("seconds_since_progress", worker.secondsSinceProgress)
            writer.field("seconds_since_heartbeat", worker.secondsSinceHeartbeat)
            writer.endObject()
        }
        writer.endArray()

        writer.key("status")
        writer.beginObject()
        writer.key("ok")
        writer.bool(problems.isEmpty)
        writer.key("problems")
        writer.beginArray()
        for problem in problems { writer.string(problem) }
        writer.endArray()
        writer.endObject()
        writer.endObject()
        return writer.text
    }

    /// Left-aligned columns separated by two spaces.
    static func table(_ rows: [[String]]) -> String {
        let widths = rows[0].indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        return rows.map { row in
            row.enumerated().map { column, cell in
                column == row.count - 1 ? cell : cell.padding(toLength: widths[column], withPad: " ", startingAt: 0)
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}
