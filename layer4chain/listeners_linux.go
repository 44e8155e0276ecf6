package layer4chain

import (
	"net/netip"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// ListeningSocket is one of this process's listening TCP sockets, found by
// its descriptor because the listeners belong to another module (caddy-l4)
// that does not expose them.
type ListeningSocket struct {
	// FD is its descriptor, owned by whoever opened the socket.
	FD int
	// Local is the address it is bound to.
	Local netip.AddrPort
	// Queued counts the connections the kernel completed and nobody has
	// accepted yet (its accept queue).
	Queued uint32
}

// ListeningSockets returns this process's listening TCP sockets whose
// local address match accepts.
func ListeningSockets(match func(netip.AddrPort) bool) ([]ListeningSocket, error) {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	var out []ListeningSocket
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		local, ok := listeningOn(fd)
		if !ok || !match(local) {
			continue
		}
		s := ListeningSocket{FD: fd, Local: local}
		s.Queued, _ = acceptQueue(fd)
		out = append(out, s)
	}
	return out, nil
}

// ShutdownListeners stops every listening TCP socket of this process whose
// local address match accepts, without closing its descriptor: shutdown(2)
// takes the socket out of the kernel's lookup (and out of its SO_REUSEPORT
// group) at once, so new connections go to another process bound to the
// same port or are refused, while whoever owns the listener closes it later
// as usual. It returns how many sockets it stopped.
func ShutdownListeners(match func(netip.AddrPort) bool) (int, error) {
	sockets, err := ListeningSockets(match)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, s := range sockets {
		if err := unix.Shutdown(s.FD, unix.SHUT_RD); err == nil {
			n++
		}
	}
	return n, nil
}

// Refresh reads s's accept queue again; false when its descriptor no
// longer holds a listening socket bound to s.Local (its owner closed it,
// and the number may name another file now).
func (s ListeningSocket) Refresh() (ListeningSocket, bool) {
	if local, ok := listeningOn(s.FD); !ok || local != s.Local {
		return s, false
	}
	q, ok := acceptQueue(s.FD)
	s.Queued = q
	return s, ok
}

// listeningOn returns the local address of fd if it is a listening TCP
// socket.
func listeningOn(fd int) (netip.AddrPort, bool) {
	if listening, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || listening != 1 {
		return netip.AddrPort{}, false // not a socket, or not listening
	}
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
		return netip.AddrPort{}, false
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}, false
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), true
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port)), true
	}
	return netip.AddrPort{}, false
}

// acceptQueue reads a listening socket's accept queue: for one, TCP_INFO's
// unacked counts the connections waiting there.
func acceptQueue(fd int) (uint32, bool) {
	ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, false
	}
	return ti.Unacked, true
}
