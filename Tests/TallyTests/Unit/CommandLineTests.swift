import Testing

@testable import TallyCLI

@Suite("Command line")
struct CommandLineTests {
    func status(_ arguments: String...) -> Int32 {
        TallyCommand.main(["tally"] + arguments)
    }

    @Test func helpExitsWithZero() {
        #expect(status("--help") == 0)
        for command in ["run", "migrate", "stats", "dev-broker"] {
            #expect(status(command, "--help") == 0, "\(command) --help")
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
