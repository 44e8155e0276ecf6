//go:build !unix

package layer4chain

import (
	"errors"
	"net"
)

// TakeOver is not supported here: serve such connections with Serve.
func TakeOver(c *net.TCPConn) (net.Conn, error) {
	return nil, errors.New("taking a socket over is supported on Unix only")
}
