import Synchronization

/// A request to stop, set from any thread (a signal handler's queue, a test) and read by
/// the worker's loop between polls.
public final class StopSignal: Sendable {
    private let requested = Atomic<Bool>(false)

    public init() {}

    public func request() {
        requested.store(true, ordering: .releasing)
    }

    public var isRequested: Bool {
        requested.load(ordering: .acquiring)
    }
}
