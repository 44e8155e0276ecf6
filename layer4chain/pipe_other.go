//go:build !unix

package layer4chain

const rawReadSupported = false

func (d *direction) readFd(fd uintptr) bool { return true }
