//go:build !linux

package layer4chain

import (
	"errors"
	"net"
)

// RescueListener is not supported on this platform.
func RescueListener(fd int, serve func(net.Conn), onError func(error)) (stop func(), err error) {
	return nil, errors.ErrUnsupported
}
