//go:build unix

package layer4chain

import "golang.org/x/sys/unix"

// FileLimit returns the process's soft limit on open files (RLIMIT_NOFILE),
// which Go raises to the hard limit at startup. ok is false where the
// platform cannot tell.
func FileLimit() (nofile uint64, ok bool) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur == unix.RLIM_INFINITY {
		return 0, false
	}
	return rl.Cur, true
}
