import JSON
import Kafka
import Tally

enum ReconcileCommand: Command {
    static let help = """
        Usage: tally reconcile --config FILE [--from TIME] [--to TIME] [--offline] [--json]

        Proves that what Kafka delivered is what billing sees. Per partition it prints Kafka's
        log start and end, the stored offset and the lag, then the accounting: offsets processed
        = accepted + duplicates + dead letters + recorded gaps, which must equal the offsets
        below the stored offset, with each offset accounted for exactly once. Missing and
        doubled offsets are listed, and the chain of live batch records is checked for holes
        and overlaps. Then the per-minute rollups of [--from, --to) (default: the last 24
        hours) are recomputed from the ledger and compared with the stored ones, by meter,
        subject and minute. Duplicate-id conflicts and too_late dead letters are counted.
        Duplicates and dead letters that refer to a ledger row that no longer exists fail the
        check: the event they stand for is not counted until a backfill restores that row.

        The exit status is 0 when every check passes and 1 otherwise, so it can run from cron or
        CI. Conflicts and late events are reported but are not failures.

        Options:
          --from TIME        The start of the rollup check, RFC 3339 (default: 24 hours ago).
          --to TIME          Its end, exclusive (default: now).
          --offline          Do not ask Kafka for log starts and ends.
          --json             Print one JSON document.
          --log-level LEVEL  debug, info, warning or error (default: warning).
        """

    static let options = OptionSpec(options: [
        "config": .value, "from": .value, "to": .value, "offline": .flag, "json": .flag, "log-level": .value,
    ])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let configuration = try requiredConfiguration(arguments)
        let logger = try commandLogger(arguments, fallback: .warning)
        let now = EventTime.systemNow()
        let to = try timeOption(arguments, "to") ?? now
        let from = try timeOption(arguments, "from") ?? to.adding(microseconds: -EventTime.microsecondsPerDay)
        guard from < to else { throw UsageError("--to must be after --from") }

        let store = try openStore(configuration, logger: logger)
        defer { store.connection.close() }
        var report = try store.reconcile(from: from, to: to)

        if !arguments.has("offline") {
            let consumer: KafkaConsumer
            do {
                consumer = try KafkaConsumer(properties: configuration.kafka.consumerProperties)
            } catch {
                throw CommandFailure("cannot create a Kafka client: \(error)")
            }
            for index in report.partitions.indices {
                let partition = report.partitions[index].partition
                do {
                    report.partitions[index].watermarks = try consumer.watermarks(
                        topic: partition.topic, partition: partition.partition, timeoutMilliseconds: 10_000)
                } catch {
                    throw CommandFailure(
                        "cannot read the log start and end of \(partition) from \(configuration.kafka.brokers): \(error); use --offline to skip Kafka"
                    )
                }
            }
        }

        print(arguments.has("json") ? renderJSON(report) : renderText(report))
        return report.passes ? 0 : 1
    }

    static func rangesText(_ ranges: [ClosedRange<Int64>]) -> String {
        ranges.prefix(20).map {
            $0.lowerBound == $0.upperBound ? "\($0.lowerBound)" : "\($0.lowerBound)-\($0.upperBound)"
        }
        .joined(separator: ",") + (ranges.count > 20 ? ",…" : "")
    }

    static func renderText(_ report: ReconcileReport) -> String {
        var rows = [
            [
                "PARTITION", "LOG START", "LOG END", "STORED", "LAG", "EXPECTED", "PROCESSED", "ACCEPTED", "DUPLICATES",
                "DEAD LETTERS", "GAPS", "MISSING", "DOUBLED", "CHECK",
            ]
        ]
        var lines: [String] = []
        for partition in report.partitions {
            rows.append([
                partition.partition.description, partition.watermarks.map { String($0.low) } ?? "-",
                partition.watermarks.map { String($0.high) } ?? "-", String(partition.storedOffset),
                partition.lag.map(String.init) ?? "-", String(partition.expected), String(partition.processed),
                String(partition.accepted), String(partition.duplicates), String(partition.deadLetters),
                String(partition.gapOffsets), partition.missing.isEmpty ? "-" : rangesText(partition.missing),
                partition.doubled.isEmpty ? "-" : rangesText(partition.doubled), partition.passes ? "ok" : "FAILED",
            ])
            for problem in partition.batchProblems {
                lines.append("FAILED \(partition.partition): \(problem)")
            }
            if partition.isBeyondLogEnd {
                lines.append("FAILED \(partition.partition): the stored offset is past the log end")
            }
        }
        var text = StatsCommand.table(rows)
        if !lines.isEmpty { text += "\n" + lines.joined(separator: "\n") }

        text +=
            "\n\nRollups from \(report.rollupFrom) to \(report.rollupTo): \(report.rollupRowsChecked) rows checked, "
        text += "\(report.rollupDifferenceCount) differ from the ledger"
        if !report.rollupDifferences.isEmpty {
            var differences = [["MINUTE", "METER", "SUBJECT", "GROUPS", "STORED", "FROM LEDGER"]]
            for difference in report.rollupDifferences {
                differences.append([
                    difference.minute, difference.meter, difference.subject, difference.groups,
                    difference.stored ?? "missing", difference.fromLedger ?? "missing",
                ])
            }
            text += "\n" + StatsCommand.table(differences)
        }
        text += "\n\nConflicts (duplicate_id_conflict): \(report.conflicts)   Late events (too_late): \(report.tooLate)"
        if report.duplicatesWithoutOriginal > 0 || report.deadLettersWithoutOriginal > 0 {
            text +=
                "\nFAILED \(report.duplicatesWithoutOriginal) duplicates and \(report.deadLettersWithoutOriginal) dead letters "
                + "refer to ledger rows that no longer exist; run tally backfill over the offsets of the original events"
        }
        text += "\n\n" + (report.passes ? "RESULT ok: every check passed" : "RESULT FAILED")
        return text
    }

    static func renderJSON(_ report: ReconcileReport) -> String {
        let writer = JSONWriter()
        writer.beginObject()
        writer.key("ok")
        writer.bool(report.passes)
        writer.key("partitions")
        writer.beginArray()
        for partition in report.partitions {
            writer.beginObject()
            writer.field("topic", partition.partition.topic)
            writer.field("partition", Int64(partition.partition.partition))
            writer.field("log_start", partition.watermarks?.low)
            writer.field("log_end", partition.watermarks?.high)
            writer.field("first_offset", partition.firstOffset)
            writer.field("stored_offset", partition.storedOffset)
            writer.field("lag", partition.lag)
            writer.field("expected", partition.expected)
            writer.field("processed", partition.processed)
            writer.field("accepted", partition.accepted)
            writer.field("duplicates", partition.duplicates)
            writer.field("dead_letters", partition.deadLetters)
            writer.field("gap_offsets", partition.gapOffsets)
            for (name, ranges) in [("missing", partition.missing), ("doubled", partition.doubled)] {
                writer.key(name)
                writer.beginArray()
                for range in ranges {
                    writer.beginArray()
                    writer.number(range.lowerBound)
                    writer.number(range.upperBound)
                    writer.endArray()
                }
                writer.endArray()
            }
            writer.key("batch_problems")
            writer.beginArray()
            for problem in partition.batchProblems { writer.string(problem) }
            writer.endArray()
            writer.key("ok")
            writer.bool(partition.passes)
            writer.endObject()
        }
        writer.endArray()

        writer.key("rollups")
        writer.beginObject()
        writer.field("from", report.rollupFrom.rfc3339)
        writer.field("to", report.rollupTo.rfc3339)
        writer.field("rows_checked", Int64(report.rollupRowsChecked))
        writer.field("differences", Int64(report.rollupDifferenceCount))
        writer.key("first_differences")
        writer.beginArray()
        for difference in report.rollupDifferences {
            writer.beginObject()
            writer.field("minute", difference.minute)
            writer.field("meter", difference.meter)
            writer.field("subject", difference.subject)
            writer.field("groups", difference.groups)
            writer.field("stored", difference.stored)
            writer.field("from_ledger", difference.fromLedger)
            writer.endObject()
        }
        writer.endArray()
        writer.endObject()

        writer.field("duplicate_id_conflicts", report.conflicts)
        writer.field("too_late", report.tooLate)
        writer.field("duplicates_without_original", report.duplicatesWithoutOriginal)
        writer.field("dead_letters_without_original", report.deadLettersWithoutOriginal)
        writer.endObject()
        return writer.text
    }
}
