//go:build unix

package layer4chain

import (
	"net"
	"syscall"
)

// peerClosed reports whether c's peer has closed or reset the connection,
// without consuming any byte it sent: a one-byte MSG_PEEK that does not
// wait reads 0 at EOF. Bytes the peer sent before closing still count as
// closed only once read; a wrapped connection (TLS) is never reported.
func peerClosed(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	closed := false
	_ = rc.Control(func(fd uintptr) {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = (n == 0 && err == nil) || err == syscall.ECONNRESET
	})
	return closed
}
