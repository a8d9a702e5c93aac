/// The choice of `dedupe_keys` partitions for claims and lookups.
///
/// Partitions cover fixed periods of the worker clock (7 days by default). A key is claimed in
/// the partition of the current period. When the next period starts within `claimMargin`,
/// it is claimed there too: two workers whose clocks differ by less than the margin then
/// always write one common row, and the primary key makes one of them lose. Lookups read
/// every partition that can hold a key accepted within the dedupe window plus the future skew.
struct DedupePeriods: Sendable {
    /// Clock difference between workers plus transaction time that the claims tolerate.
    static let claimMarginSeconds: Int64 = 3600

    let periodSeconds: Int64

    func period(of time: EventTime) -> Int64 {
        floorDivide(floorDivide(time.microseconds, EventTime.microsecondsPerSecond), periodSeconds)
    }

    /// Returns the partitions that a key accepted at `now` is written to: one, or two near a period's end.
    func claimPeriods(now: EventTime) -> [Int64] {
        let current = period(of: now)
        let ahead = period(of: now.adding(microseconds: Self.claimMarginSeconds * EventTime.microsecondsPerSecond))
        return current == ahead ? [current] : [current, ahead]
    }

    /// Returns the partitions that a lookup at `now` reads.
    func lookupRange(now: EventTime, limits: ValidationLimits) -> ClosedRange<Int64> {
        let margin = Self.claimMarginSeconds * EventTime.microsecondsPerSecond
        let oldest = now.adding(
            microseconds: -(limits.dedupeWindowMicroseconds + limits.maxFutureSkewMicroseconds + margin))
        return period(of: oldest)...period(of: now.adding(microseconds: margin))
    }

    /// Returns the partitions that must exist at `now`: every one a lookup reads, and two periods ahead.
    func requiredRange(now: EventTime, limits: ValidationLimits) -> ClosedRange<Int64> {
        let lookup = lookupRange(now: now, limits: limits)
        return lookup.lowerBound...lookup.upperBound + 2
    }
}
