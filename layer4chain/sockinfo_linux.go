package layer4chain

import (
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// SocketInfo is the kernel's view of one TCP socket, from TCP_INFO.
type SocketInfo struct {
	// RTT is the smoothed round-trip time.
	RTT time.Duration `json:"rtt"`
	// RTTVar is the round-trip time's variance.
	RTTVar time.Duration `json:"rtt_var"`
	// Retransmits counts retransmitted segments over the socket's life.
	Retransmits uint32 `json:"retransmits"`
	// Unacked counts segments sent and not yet acknowledged.
	Unacked uint32 `json:"unacked"`
}

// socketInfo reads TCP_INFO; nil when the socket is closed or not TCP.
func socketInfo(rc syscall.RawConn) *SocketInfo {
	if rc == nil {
		return nil
	}
	var ti *unix.TCPInfo
	var err error
	if cerr := rc.Control(func(fd uintptr) {
		ti, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); cerr != nil || err != nil {
		return nil
	}
	return &SocketInfo{
		RTT:         time.Duration(ti.Rtt) * time.Microsecond,
		RTTVar:      time.Duration(ti.Rttvar) * time.Microsecond,
		Retransmits: ti.Total_retrans,
		Unacked:     ti.Unacked,
	}
}

// bytesAcked reads how many bytes the peer of sock has acknowledged over
// the socket's life (TCP_INFO's bytes_acked); false when sock is nil,
// closed or not TCP.
func bytesAcked(sock syscall.Conn) (uint64, bool) {
	if sock == nil {
		return 0, false
	}
	rc, err := sock.SyscallConn()
	if err != nil {
		return 0, false
	}
	var ti *unix.TCPInfo
	if cerr := rc.Control(func(fd uintptr) {
		ti, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); cerr != nil || err != nil {
		return 0, false
	}
	return ti.Bytes_acked, true
}
