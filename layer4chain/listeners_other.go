//go:build !linux

package layer4chain

import (
	"errors"
	"net/netip"
)

// ListeningSocket is one of this process's listening TCP sockets.
type ListeningSocket struct {
	FD     int
	Local  netip.AddrPort
	Queued uint32
}

// Refresh is not supported on this platform.
func (s ListeningSocket) Refresh() (ListeningSocket, bool) { return s, false }

// ListeningSockets is not supported on this platform.
func ListeningSockets(match func(netip.AddrPort) bool) ([]ListeningSocket, error) {
	return nil, errors.ErrUnsupported
}

// ShutdownListeners is not supported on this platform: listeners stay open
// until their owner closes them.
func ShutdownListeners(match func(netip.AddrPort) bool) (int, error) {
	return 0, errors.ErrUnsupported
}
