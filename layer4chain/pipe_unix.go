//go:build unix

package layer4chain

import (
	"io"
	"syscall"
)

const rawReadSupported = true

// readFd is the RawConn read callback: it takes a buffer, reads, and on
// EAGAIN gives the buffer back before asking the poller to wait.
func (d *direction) readFd(fd uintptr) bool {
	if d.buf == nil {
		d.buf = getBuf()
	}
	for {
		n, err := syscall.Read(int(fd), *d.buf)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			putBuf(d.buf)
			d.buf = nil
			return false
		case err != nil:
			d.err = err
		case n == 0:
			d.err = io.EOF
		default:
			d.n = n
		}
		return true
	}
}
