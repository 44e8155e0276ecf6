//go:build !unix

package layer4chain

import "net"

// peerClosed cannot tell on this platform.
func peerClosed(net.Conn) bool { return false }
