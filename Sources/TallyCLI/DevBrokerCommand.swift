import Foundation
import KafkaMock
import Tally

enum DevBrokerCommand: Command {
    static let help = """
        Usage: tally dev-broker [--topic NAME[:PARTITIONS]]... [--brokers N] [--bootstrap-file PATH]

        FOR DEMOS AND TESTS ONLY. Serves librdkafka's mock Kafka cluster on 127.0.0.1, creates
        the topics it is given, prints the bootstrap address (the bootstrap.servers value) on
        stdout, and runs until SIGTERM or SIGINT.

        The mock cluster speaks the real Kafka protocol but keeps everything in memory and
        loses it on exit. In librdkafka 2.0.2 it keeps at most 5 MiB of message sets per
        partition and drops the oldest past that, as retention would; produce with zstd
        compression to keep more. Consumer-group members need session.timeout.ms of at least
        6000.

        For fault tests, SIGUSR1 takes every broker down (it refuses connections and drops
        those it has) and SIGUSR2 brings them up again; the data is kept.

        Options:
          --topic NAME[:PARTITIONS]  A topic to create, with 4 partitions unless given; repeatable.
          --brokers N                The number of brokers (default: 1).
          --bootstrap-file PATH      Also write the bootstrap address to PATH, for scripts.
        """

    static let options = OptionSpec(options: ["topic": .repeated, "brokers": .value, "bootstrap-file": .value])

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let brokerCount: Int32 =
            try arguments.value("brokers").map { text throws -> Int32 in
                guard let count = Int32(text), (1...16).contains(count) else {
                    throw UsageError("--brokers must be a number from 1 to 16, not \(text)")
                }
                return count
            } ?? 1
        var topics: [(String, Int32)] = []
        for specification in arguments.all("topic") {
            let parts = specification.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).map(
                String.init)
            let name = parts[0]
            guard isValidKafkaTopicName(name) else {
                throw UsageError(
                    "--topic \(specification): the name must be 1 to 249 letters, digits, '.', '_' or '-'")
            }
            guard !topics.contains(where: { $0.0 == name }) else {
                throw UsageError("--topic \(name) is given twice")
            }
            var partitions: Int32 = 4
            if parts.count == 2 {
                guard let count = Int32(parts[1]), (1...1000).contains(count) else {
                    throw UsageError("--topic \(specification): the partition count must be a number from 1 to 1000")
                }
                partitions = count
            }
            topics.append((name, partitions))
        }

        let logger = Logger(level: .info)
        let cluster = try MockCluster(brokerCount: brokerCount)
        for (name, partitions) in topics {
            try cluster.createTopic(name, partitions: partitions)
        }
        if let path = arguments.value("bootstrap-file") {
            do {
                try (cluster.bootstrapServers + "\n").write(toFile: path, atomically: true, encoding: .utf8)
            } catch {
                throw CommandFailure("cannot write the bootstrap address to \(path): \(error.localizedDescription)")
            }
        }
        printNow(cluster.bootstrapServers)
        logger.info(
            "dev broker ready; for demos and tests only",
            [
                "kafka.bootstrap": cluster.bootstrapServers, "kafka.brokers": brokerCount,
                "kafka.topics": topics.map { "\($0.0):\($0.1)" }.joined(separator: ","),
            ])

        let stopSignal = StopSignal()
        let sources = handleStopSignals(stopSignal, timeoutMilliseconds: 10_000, logger: logger)
        defer { sources.forEach { $0.cancel() } }
        let faultSources = [(SIGUSR1, false), (SIGUSR2, true)].map { number, up in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                for broker in 1...brokerCount {
                    do {
                        if up { try cluster.setBrokerUp(broker) } else { try cluster.setBrokerDown(broker) }
                    } catch {
                        logger.error("changing a broker's state failed", ["kafka.broker": broker, "error": "\(error)"])
                    }
                }
                logger.info(up ? "brokers up" : "brokers down", ["kafka.brokers": brokerCount])
            }
            source.resume()
            return source
        }
        defer { faultSources.forEach { $0.cancel() } }
        while !stopSignal.isRequested {
            usleep(100_000)
        }
        logger.info("dev broker stopped")
        return 0
    }
}
