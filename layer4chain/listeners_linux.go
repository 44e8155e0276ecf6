package layer4chain

import (
	"net/netip"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// ShutdownListeners stops every listening TCP socket of this process whose
// local address match accepts, without closing its descriptor: shutdown(2)
// takes the socket out of the kernel's lookup (and out of its SO_REUSEPORT
// group) at once, so new connections go to another process bound to the
// same port or are refused, while whoever owns the listener closes it later
// as usual. It returns how many sockets it stopped.
//
// It finds the sockets by their descriptors because the listeners belong to
// another module (caddy-l4) that does not expose them.
func ShutdownListeners(match func(netip.AddrPort) bool) (int, error) {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if listening, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || listening != 1 {
			continue // not a socket, or not listening
		}
		if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
			continue
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			continue
		}
		var local netip.AddrPort
		switch sa := sa.(type) {
		case *unix.SockaddrInet4:
			local = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
		case *unix.SockaddrInet6:
			local = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
		default:
			continue
		}
		if !match(local) {
			continue
		}
		if err := unix.Shutdown(fd, unix.SHUT_RD); err == nil {
			n++
		}
	}
	return n, nil
}
