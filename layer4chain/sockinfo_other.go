//go:build !linux

package layer4chain

import (
	"syscall"
	"time"
)

// SocketInfo is the kernel's view of one TCP socket, from TCP_INFO.
type SocketInfo struct {
	RTT         time.Duration `json:"rtt"`
	RTTVar      time.Duration `json:"rtt_var"`
	Retransmits uint32        `json:"retransmits"`
	Unacked     uint32        `json:"unacked"`
}

func socketInfo(syscall.RawConn) *SocketInfo { return nil }

// bytesAcked is unknown here: a slow reader is seen only by what it takes.
func bytesAcked(syscall.Conn) (uint64, bool) { return 0, false }
