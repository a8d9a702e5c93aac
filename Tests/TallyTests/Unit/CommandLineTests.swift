import Foundation
import Tally
import Testing

@testable import TallyCLI

@Suite("Command line")
struct CommandLineTests {
    func status(_ arguments: String...) -> Int32 {
        TallyCommand.main(["tally"] + arguments)
    }

    @Test func helpExitsWithZero() {
        #expect(status("--help") == 0)
        for command in ["run", "migrate", "stats", "dev-broker", "backfill", "rebuild", "reconcile", "usage", "events"]
        {
            #expect(status(command, "--help") == 0, "\(command) --help")
        }
        #expect(status("dead-letters", "--help") == 0)
        for subcommand in ["list", "show", "replay"] {
            #expect(status("dead-letters", subcommand, "--help") == 0, "dead-letters \(subcommand) --help")
        }
    }

    @Test func wrongArgumentsExitWithTwo() {
        #expect(status() == 2)
        #expect(status("frobnicate") == 2)
        #expect(status("run") == 2)
        #expect(status("run", "--bogus") == 2)
        #expect(status("run", "--config") == 2)
        #expect(status("stats", "--config", "a.yaml", "--config", "b.yaml") == 2)
        #expect(status("stats", "--json=yes") == 2)
        #expect(status("migrate", "--schema", "Bad-Name") == 2)
        #expect(status("dev-broker", "--topic", ":3") == 2)
        #expect(status("dev-broker", "--topic", "usage:0") == 2)
        #expect(status("dev-broker", "--topic", "a:2", "--topic", "a:3") == 2)
        #expect(status("dev-broker", "--brokers", "0") == 2)
        #expect(status("dead-letters") == 2)
        #expect(status("dead-letters", "purge") == 2)
        #expect(status("backfill", "--from-offset", "1", "--from-time", "2025-01-01T00:00:00Z") == 2)
    }

    @Test func unreadableConfigurationExitsWithOne() {
        #expect(status("run", "--config", "/nonexistent/tally.yaml") == 1)
        #expect(status("stats", "--config", "/tmp") == 1)
    }

    @Test func optionsAcceptTheEqualsForm() throws {
        let parsed = try ParsedArguments.parse(
            ["--config=a.yaml", "--json", "--topic", "x:1", "--topic=y"],
            spec: OptionSpec(options: ["config": .value, "json": .flag, "topic": .repeated]))
        #expect(parsed.value("config") == "a.yaml")
        #expect(parsed.has("json"))
        #expect(parsed.all("topic") == ["x:1", "y"])
    }
}

@Suite("History command lines")
struct HistoryCommandLineTests {
    func backfillRequest(_ arguments: String...) throws -> BackfillRequest {
        try BackfillCommand.request(ParsedArguments.parse(arguments, spec: BackfillCommand.options))
    }

    @Test func backfillRangeOptions() throws {
        let request = try backfillRequest(
            "--topic", "usage", "--partition", "2", "--partition", "0", "--from-offset", "10", "--to-offset", "end",
            "--event-time-from", "2025-03-09T02:00:00Z")
        #expect(request.partitions == [2, 0])
        #expect(request.from == .offset(10))
        #expect(request.to == .end)
        #expect(request.eventTimeFrom == (try EventTime.parseRFC3339("2025-03-09T02:00:00Z")))
        #expect(!request.dryRun)

        let byTime = try backfillRequest("--topic", "usage", "--from-time", "2025-03-09T02:00:00-05:00", "--dry-run")
        #expect(byTime.from == .time(try EventTime.parseRFC3339("2025-03-09T07:00:00Z")))
        #expect(byTime.to == .end)
        #expect(byTime.dryRun)
    }

    @Test func backfillRejectsWrongRanges() {
        for arguments in [
            ["--from-offset", "0"],
            ["--topic", "usage", "--from-offset", "-3"],
            ["--topic", "usage", "--to-offset", "beginning"],
            ["--topic", "usage", "--partition", "x"],
            ["--topic", "usage", "--to-offset", "5", "--to-time", "2025-01-01T00:00:00Z"],
            ["--topic", "usage", "--from-time", "yesterday"],
            [
                "--topic", "usage", "--event-time-from", "2025-01-02T00:00:00Z", "--event-time-to",
                "2025-01-01T00:00:00Z",
            ],
            ["--topic", "usage", "--from-offset", "10", "--to-offset", "5"],
            ["--topic", "usage", "--from-time", "2025-01-02T00:00:00Z", "--to-time", "2025-01-01T00:00:00Z"],
        ] {
            #expect(throws: UsageError.self, "\(arguments)") {
                try BackfillCommand.request(ParsedArguments.parse(arguments, spec: BackfillCommand.options))
            }
        }
    }

    @Test func backfillRejectsOptionsItWouldIgnore() throws {
        // The configuration is never read: the combination is rejected first, with exit 2.
        let config = ["--config", "/nonexistent/tally.yaml"]
        #expect(TallyCommand.main(["tally", "backfill"] + config + ["--resume", "22", "--dry-run"]) == 2)
        #expect(TallyCommand.main(["tally", "backfill"] + config + ["--resume", "22", "--topic", "usage"]) == 2)
        #expect(TallyCommand.main(["tally", "backfill"] + config + ["--resume", "22", "--list"]) == 2)
        #expect(TallyCommand.main(["tally", "backfill"] + config + ["--list", "--topic", "usage"]) == 2)
        #expect(TallyCommand.main(["tally", "backfill"] + config + ["--topic", "usage", "--json"]) == 2)
        #expect(
            TallyCommand.main(
                ["tally", "backfill"] + config + ["--topic", "usage", "--from-offset", "10", "--to-offset", "5"]) == 2)
        // A valid combination gets as far as reading the configuration.
        #expect(TallyCommand.main(["tally", "backfill"] + config + ["--resume", "22"]) == 1)
        #expect(TallyCommand.main(["tally", "backfill"] + config + ["--list", "--json"]) == 1)
        #expect(try backfillRequest("--topic", "usage", "--from-offset", "5", "--to-offset", "5").from == .offset(5))
    }

    @Test func helpNamesEveryOption() {
        let commands: [(String, Command.Type)] = [
            ("backfill", BackfillCommand.self), ("rebuild", RebuildCommand.self), ("reconcile", ReconcileCommand.self),
            ("usage", UsageCommand.self), ("events", EventsCommand.self),
            ("dead-letters list", DeadLettersListCommand.self), ("dead-letters show", DeadLettersShowCommand.self),
            ("dead-letters replay", DeadLettersReplayCommand.self),
        ]
        for (name, command) in commands {
            // The id of `dead-letters show ID` is positional; the parser turns it into --id.
            for option in command.options.options.keys where option != "id" {
                #expect(command.help.contains("--\(option)"), "tally \(name) --help does not name --\(option)")
            }
        }
        for usage in ["list --config FILE", "show --config FILE", "replay --config FILE"] {
            #expect(DeadLettersCommand.help.contains(usage), "tally dead-letters --help lacks \(usage)")
        }
    }

    @Test func configurationDocNamesEveryCommand() throws {
        let docs = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
            "../../../docs/configuration.md")
        let text = try String(contentsOf: docs, encoding: .utf8)
        let intro = text.components(separatedBy: "\n\n").prefix(2).joined(separator: " ")
        let commands: [(String, Command.Type)] = [
            ("run", RunCommand.self), ("migrate", MigrateCommand.self), ("stats", StatsCommand.self),
            ("dev-broker", DevBrokerCommand.self), ("backfill", BackfillCommand.self), ("rebuild", RebuildCommand.self),
            ("reconcile", ReconcileCommand.self), ("usage", UsageCommand.self), ("events", EventsCommand.self),
            ("dead-letters", DeadLettersListCommand.self),
        ]
        for (name, command) in commands where command.options.options["config"] != nil {
            #expect(intro.contains("`\(name)`") || intro.contains("`tally \(name)`"), "configuration.md omits \(name)")
        }
    }

    @Test func showPrintsTextOrHex() {
        #expect(DeadLettersShowCommand.rendered("value", Array("{}".utf8)) == "value (2 bytes, text):\n{}")
        #expect(DeadLettersShowCommand.rendered("value", [0x7B, 0xFF, 0x0A]) == "value (3 bytes, hex):\n7bff0a")
        #expect(DeadLettersShowCommand.rendered("key", nil) == "key: null")
    }

    @Test func csvQuotesWhereNeeded() {
        #expect(csv([["a", "b,c", #"say "hi""#], ["1", "2\n3", ""]]) == "a,\"b,c\",\"say \"\"hi\"\"\"\n1,\"2\n3\",")
    }
}
