package layer4chain

import "math"

// A proxied connection holds two file descriptors (client and upstream
// sockets), and a third when its upstream is served by the same process
// (the quickstart's HTTP backend, or the next hop of a chain run by one
// Caddy), which the tracker cannot tell apart. A process that runs out of descriptors fails accept(2) with
// EMFILE, and caddy-l4's accept loop stops for good on that error, so the
// process's connection limit must keep proxied connections below the file
// limit, with room for everything else the process opens: listeners, log
// files, the admin API, health probes, and sockets accepted but not yet
// admitted or already refused.
const (
	// fdsPerConnection is the most one admitted connection holds.
	fdsPerConnection = 3
	// minFileReserve and maxFileReserve bound the descriptors left for the
	// process's other files: a quarter of the limit, within these bounds.
	minFileReserve = 64
	maxFileReserve = 4096
)

// ConnectionLimitForFiles is the connection limit that keeps a process with
// the file limit nofile (RLIMIT_NOFILE) clear of EMFILE, as HAProxy derives
// maxconn from `ulimit -n`. It returns 0, no limit, when nofile is unlimited
// or so large that the limit could never be reached.
func ConnectionLimitForFiles(nofile uint64) int {
	reserve := min(max(nofile/4, minFileReserve), maxFileReserve)
	if nofile <= reserve+fdsPerConnection {
		return 1
	}
	n := (nofile - reserve) / fdsPerConnection
	if n > math.MaxInt32 {
		return 0
	}
	return int(n)
}
