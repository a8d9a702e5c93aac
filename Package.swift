// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Tally",
    products: [
        .executable(name: "tally", targets: ["tally"]),
        .library(name: "Tally", targets: ["Tally"]),
    ],
    targets: [
        // C libraries from Debian, found through pkg-config.
        .systemLibrary(
            name: "CRdKafka", pkgConfig: "rdkafka",
            providers: [.apt(["librdkafka-dev"])]),
        .systemLibrary(
            name: "CLibPQ", pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"])]),
        .systemLibrary(
            name: "CYAML", pkgConfig: "yaml-0.1",
            providers: [.apt(["libyaml-dev"])]),
        .systemLibrary(
            name: "CYajl", pkgConfig: "yajl",
            providers: [.apt(["libyajl-dev"])]),
        .systemLibrary(
            name: "CLibCrypto", pkgConfig: "libcrypto",
            providers: [.apt(["libssl-dev"])]),

        // One thin Swift layer per C library. Only these targets touch C pointers.
        .target(name: "Kafka", dependencies: ["CRdKafka"]),
        .target(name: "KafkaMock", dependencies: ["CRdKafka", "Kafka"]),
        .target(name: "Postgres", dependencies: ["CLibPQ"]),
        .target(name: "YAML", dependencies: ["CYAML"]),
        .target(name: "JSON", dependencies: ["CYajl"]),
        .target(name: "Hashing", dependencies: ["CLibCrypto"]),

        // The metering logic: events, meters, configuration, ledger and the worker.
        .target(name: "Tally", dependencies: ["Kafka", "Postgres", "YAML", "JSON", "Hashing"]),
        // The commands, kept in a library so that tests can run them in-process.
        .target(name: "TallyCLI", dependencies: ["Tally", "KafkaMock"]),
        .executableTarget(name: "tally", dependencies: ["TallyCLI"]),

        .testTarget(name: "TallyTests", dependencies: ["Tally", "TallyCLI", "KafkaMock"]),
    ]
)
