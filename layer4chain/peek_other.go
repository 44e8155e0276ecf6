//go:build !linux

package layer4chain

import (
	"context"
	"time"
)

// peerWatch cannot tell on this platform without reading: a client that
// leaves during the dial is noticed once the connection is established.
type peerWatch struct{}

func watchPeer(tcpSocket, time.Duration, bool, context.CancelFunc) *peerWatch { return nil }

func (*peerWatch) stop() (left bool) { return false }
