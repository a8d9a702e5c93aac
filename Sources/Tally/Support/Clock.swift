import Synchronization

/// The worker's notion of now, which decides `too_late`, `time_in_future` and the dedupe
/// partitions. Tests set it to replay events from any date.
public protocol TallyClock: Sendable {
    func now() -> EventTime
}

/// The system's real-time clock.
public struct SystemClock: TallyClock {
    public init() {}

    public func now() -> EventTime { EventTime.systemNow() }
}

/// A clock that stays where it is set. Thread-safe.
public final class ManualClock: TallyClock {
    private let current: Mutex<EventTime>

    public init(_ time: EventTime) {
        current = Mutex(time)
    }

    public func now() -> EventTime { current.withLock { $0 } }

    public func set(_ time: EventTime) {
        current.withLock { $0 = time }
    }
}

/// The system clock moved by a fixed amount, so that it read `start` when it was created
/// and advances in real time from there. It lets a worker process replay old events as if
/// they were recent, and its time does not depend on the time zone.
public struct ShiftedClock: TallyClock {
    private let shiftMicroseconds: Int64

    public init(startingAt start: EventTime) {
        shiftMicroseconds = start.microseconds - EventTime.systemNow().microseconds
    }

    public func now() -> EventTime {
        EventTime.systemNow().adding(microseconds: shiftMicroseconds)
    }
}
