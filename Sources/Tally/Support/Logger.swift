import Glibc
import Synchronization

/// A structured logger that writes one logfmt line per record to stderr:
///
///     ts=2026-12-04T10:15:30.123456Z level=info msg="batch committed" kafka.topic=usage ledger.accepted=812
///
/// Messages are constant text; the data goes into the metadata under dotted keys. Components
/// receive a logger and add their own metadata with `with(_:)`. Loggers are values and may be
/// used from any thread; the lines of concurrent records never interleave.
public struct Logger: Sendable {
    public enum Level: Int, Comparable, Sendable, CaseIterable {
        case debug, info, warning, error

        public static func < (lhs: Level, rhs: Level) -> Bool { lhs.rawValue < rhs.rawValue }

        public var name: String {
            switch self {
            case .debug: return "debug"
            case .info: return "info"
            case .warning: return "warning"
            case .error: return "error"
            }
        }

        public init?(name: String) {
            guard let level = Level.allCases.first(where: { $0.name == name }) else { return nil }
            self = level
        }
    }

    private let sink: LogSink
    private let context: [(String, String)]

    /// Creates a logger that writes records at `level` and above to `sink`.
    public init(level: Level = .info, sink: LogSink = .standardError) {
        self.sink = sink
        self.context = []
        sink.setLevel(level)
    }

    private init(sink: LogSink, context: [(String, String)]) {
        self.sink = sink
        self.context = context
    }

    /// Returns a logger that adds `metadata` to every record.
    public func with(_ metadata: KeyValuePairs<String, CustomStringConvertible>) -> Logger {
        Logger(sink: sink, context: context + metadata.map { ($0.key, $0.value.description) })
    }

    public var level: Level { sink.level }

    public func isEnabled(_ level: Level) -> Bool { level >= sink.level }

    public func debug(_ message: String, _ metadata: KeyValuePairs<String, CustomStringConvertible> = [:]) {
        log(.debug, message, metadata)
    }

    public func info(_ message: String, _ metadata: KeyValuePairs<String, CustomStringConvertible> = [:]) {
        log(.info, message, metadata)
    }

    public func warning(_ message: String, _ metadata: KeyValuePairs<String, CustomStringConvertible> = [:]) {
        log(.warning, message, metadata)
    }

    public func error(_ message: String, _ metadata: KeyValuePairs<String, CustomStringConvertible> = [:]) {
        log(.error, message, metadata)
    }

    /// Logs at most one record per `intervalSeconds` for `message`, and reports how many were
    /// left out in the key `log.suppressed` of the next one written.
    public func rateLimited(
        _ level: Level, _ message: String, intervalSeconds: Int64 = 10,
        _ metadata: KeyValuePairs<String, CustomStringConvertible> = [:]
    ) {
        guard isEnabled(level) else { return }
        guard let suppressed = sink.admit(key: message, intervalMicroseconds: intervalSeconds * 1_000_000) else {
            return
        }
        var fields = metadata.map { ($0.key, $0.value.description) }
        if suppressed > 0 { fields.append(("log.suppressed", String(suppressed))) }
        sink.write(level: level, message: message, fields: context + fields)
    }

    public func log(_ level: Level, _ message: String, _ metadata: KeyValuePairs<String, CustomStringConvertible> = [:])
    {
        guard isEnabled(level) else { return }
        sink.write(level: level, message: message, fields: context + metadata.map { ($0.key, $0.value.description) })
    }
}

/// The destination of log lines. It is thread-safe, because a mutex orders whole lines.
public final class LogSink: Sendable {
    /// The process's standard error.
    public static let standardError = LogSink(descriptor: 2)

    private struct State {
        var level = Logger.Level.info
        /// Per rate-limited message: when it was last written and how many were left out since.
        var rateLimits: [String: (lastWritten: Int64, suppressed: Int)] = [:]
    }

    private let descriptor: Int32
    private let state = Mutex(State())
    /// True for a sink that keeps lines in `captured` instead of writing them.
    private let isCapturing: Bool
    private let captured = Mutex<[String]>([])

    private init(descriptor: Int32, capturing: Bool = false) {
        self.descriptor = descriptor
        self.isCapturing = capturing
    }

    /// Creates a sink that keeps lines in memory instead of writing them, for tests.
    public static func capturing() -> LogSink {
        LogSink(descriptor: -1, capturing: true)
    }

    /// The lines a capturing sink has kept.
    public var capturedLines: [String] {
        captured.withLock { $0 }
    }

    var level: Logger.Level { state.withLock { $0.level } }

    func setLevel(_ level: Logger.Level) {
        state.withLock { $0.level = level }
    }

    /// Returns nil when a record for `key` was written less than the interval ago. Otherwise it
    /// marks this record as written and returns the number left out since the last one.
    func admit(key: String, intervalMicroseconds: Int64) -> Int? {
        let now = EventTime.systemNow().microseconds
        return state.withLock { state in
            if let entry = state.rateLimits[key], now - entry.lastWritten < intervalMicroseconds {
                state.rateLimits[key] = (entry.lastWritten, entry.suppressed + 1)
                return nil
            }
            let suppressed = state.rateLimits[key]?.suppressed ?? 0
            state.rateLimits[key] = (now, 0)
            return suppressed
        }
    }

    func write(level: Logger.Level, message: String, fields: [(String, String)]) {
        var line = "ts=\(EventTime.systemNow().rfc3339) level=\(level.name) msg=\(logfmtValue(message))"
        for (key, value) in fields {
            line += " \(key)=\(logfmtValue(value))"
        }
        line += "\n"
        if isCapturing {
            captured.withLock { $0.append(line) }
            return
        }
        state.withLock { _ in
            var bytes = Array(line.utf8)
            bytes.withUnsafeMutableBytes { buffer in
                var offset = 0
                while offset < buffer.count {
                    let written = Glibc.write(descriptor, buffer.baseAddress! + offset, buffer.count - offset)
                    if written < 0 && errno == EINTR { continue }
                    if written <= 0 { return }  // stderr is gone; there is nowhere left to report it
                    offset += written
                }
            }
        }
    }
}

/// Formats a logfmt value: bare when it is a plain token, otherwise quoted with `"`, `\` and
/// control characters escaped, so that every record stays on one line.
func logfmtValue(_ value: String) -> String {
    let needsQuotes =
        value.isEmpty
        || value.unicodeScalars.contains { scalar in
            scalar == " " || scalar == "=" || scalar == "\"" || scalar == "\\" || scalar.value < 0x20
                || scalar.value == 0x7F
        }
    guard needsQuotes else { return value }
    var quoted = "\""
    for scalar in value.unicodeScalars {
        switch scalar {
        case "\"": quoted += "\\\""
        case "\\": quoted += "\\\\"
        case "\n": quoted += "\\n"
        case "\r": quoted += "\\r"
        case "\t": quoted += "\\t"
        default:
            if scalar.value < 0x20 || scalar.value == 0x7F {
                quoted += "\\u" + String(scalar.value, radix: 16).leftPadded(to: 4)
            } else {
                quoted.unicodeScalars.append(scalar)
            }
        }
    }
    return quoted + "\""
}

extension String {
    /// Returns the string with `pad` added in front up to `width` characters.
    func leftPadded(to width: Int, with pad: Character = "0") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}
