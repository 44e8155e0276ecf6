package layer4chain

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// memConn is an in-memory DeadlineReader: it hands out data in reads of at
// most chunk bytes (0: as much as fits), then returns end (io.EOF when nil)
// forever. Deadlines are recorded, not enforced, so tests can simulate a
// deadline by setting end to os.ErrDeadlineExceeded.
type memConn struct {
	data      []byte
	chunk     int
	end       error
	deadlines []time.Time
	reads     int
}

func (c *memConn) Read(p []byte) (int, error) {
	c.reads++
	if len(c.data) == 0 {
		if c.end == nil {
			return 0, io.EOF
		}
		return 0, c.end
	}
	n := len(p)
	if c.chunk > 0 && n > c.chunk {
		n = c.chunk
	}
	n = copy(p[:n], c.data)
	c.data = c.data[n:]
	return n, nil
}

func (c *memConn) SetReadDeadline(t time.Time) error {
	c.deadlines = append(c.deadlines, t)
	return nil
}

// deadlineCleared reports whether the last deadline set was the zero time.
func (c *memConn) deadlineCleared() bool {
	return len(c.deadlines) > 0 && c.deadlines[len(c.deadlines)-1].IsZero()
}

// tcpPair returns both ends of a loopback TCP connection and the client's
// address as the server sees it. Dial returns once the handshake is done, so
// Accept does not block and no goroutine is needed.
func tcpPair(t testing.TB) (server, client *net.TCPConn, peer netip.Addr) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		s.Close()
	})
	return s.(*net.TCPConn), c.(*net.TCPConn), s.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
}
