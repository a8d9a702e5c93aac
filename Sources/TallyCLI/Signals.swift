import Dispatch
import Glibc
import Tally

/// Turns SIGTERM and SIGINT into a stop request. A second signal ends the process at once,
/// which is safe because every batch is one transaction. After the first signal, a timer
/// ends the process if the stop takes longer than `timeoutMilliseconds`.
///
/// The returned sources must be kept alive for as long as the handling is wanted.
func handleStopSignals(_ stopSignal: StopSignal, timeoutMilliseconds: Int, logger: Logger) -> [DispatchSourceSignal] {
    [SIGTERM, SIGINT].map { number in
        // Ignoring the default action lets the dispatch source receive the signal instead.
        signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
        source.setEventHandler {
            let name = number == SIGTERM ? "SIGTERM" : "SIGINT"
            if stopSignal.isRequested {
                logger.warning("second stop signal; exiting at once", ["signal": name])
                _exit(1)
            }
            logger.info("stop requested", ["signal": name, "shutdown.timeout_ms": timeoutMilliseconds])
            stopSignal.request()
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(timeoutMilliseconds)) {
                logger.error(
                    "stopping took longer than the shutdown timeout; exiting",
                    ["shutdown.timeout_ms": timeoutMilliseconds])
                _exit(1)
            }
        }
        source.resume()
        return source
    }
}
