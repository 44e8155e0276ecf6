//go:build !unix

package layer4chain

// FileLimit reports that this platform's file limit is unknown.
func FileLimit() (nofile uint64, ok bool) { return 0, false }
