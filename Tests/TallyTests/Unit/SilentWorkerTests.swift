import Testing

@testable import Tally

/// How `tally stats` treats a worker that stopped writing its status row without saying so.
@Suite("Silent workers")
struct SilentWorkerTests {
    func worker(_ id: String, _ status: String, _ partitions: String, seenSecondsAgo: Int64) -> WorkerStatusRow {
        WorkerStatusRow(
            workerID: id, consumerGroup: "tally", host: "host", pid: 1, status: status, detail: "",
            partitions: partitions, lag: 0, secondsSinceProgress: 0, secondsSinceHeartbeat: seenSecondsAgo)
    }

    func problems(_ workers: [WorkerStatusRow]) -> [String] {
        StatsReport(partitions: [], meters: [], workers: workers).problems(stalledAfterSeconds: 60)
    }

    @Test func recentRowIsNotSilent() {
        let row = worker("a", "consuming", "usage[0]", seenSecondsAgo: 6)
        #expect(!row.isSilent)
        #expect(row.shownStatus == "consuming")
        #expect(problems([row]).isEmpty)
    }

    @Test func stoppedWorkerIsNeverSilent() {
        let row = worker("a", "stopped", "", seenSecondsAgo: 3600)
        #expect(!row.isSilent)
        #expect(problems([row]).isEmpty)
    }

    @Test func silentWorkerWithOrphanedPartitionsIsAProblem() {
        let row = worker("a", "consuming", "usage[0],usage[1]", seenSecondsAgo: 45)
        #expect(row.isSilent)
        #expect(row.shownStatus == "silent")
        let found = problems([row, worker("b", "consuming", "usage[1]", seenSecondsAgo: 2)])
        #expect(found.count == 1)
        #expect(found.first?.contains("worker a has not reported for 45 s") == true)
        #expect(found.first?.contains("no live worker reports usage[0].") == true)
    }

    @Test func silentWorkerWhosePartitionsMovedIsNoProblem() {
        let found = problems([
            worker("a", "consuming", "usage[0],usage[1]", seenSecondsAgo: 900),
            worker("b", "consuming", "usage[0],usage[1]", seenSecondsAgo: 1),
        ])
        #expect(found.isEmpty)
    }
}
