import Glibc
import TallyCLI

exit(TallyCommand.main(CommandLine.arguments))
