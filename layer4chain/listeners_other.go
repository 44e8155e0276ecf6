//go:build !linux

package layer4chain

import (
	"errors"
	"net/netip"
)

// ShutdownListeners is not supported on this platform: listeners stay open
// until their owner closes them.
func ShutdownListeners(match func(netip.AddrPort) bool) (int, error) {
	return 0, errors.ErrUnsupported
}
