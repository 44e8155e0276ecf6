// Package chaintest provides loopback peers for tests of caddy-layer4chain:
// backends that echo or report the PROXY header they received, an address
// that refuses connections and one that never answers. Every address it
// hands out is on 127.0.0.1.
package chaintest

import (
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Backend is a loopback TCP server run by a test. Its connections are
// handled by a function and all of them are closed, and their goroutines
// awaited, when the test ends.
type Backend struct {
	// Addr is the "127.0.0.1:port" the backend listens on.
	Addr string

	ln       net.Listener
	wg       sync.WaitGroup // the accept loop and every handler
	handlers sync.WaitGroup // the handlers alone
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	accepted chan net.Conn
}

// NewBackend starts a backend that runs handle for each connection. handle
// owns the connection (the backend closes it after handle returns).
func NewBackend(t testing.TB, handle func(*net.TCPConn)) *Backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("backend listen: %v", err)
	}
	b := &Backend{Addr: ln.Addr().String(), ln: ln, conns: map[net.Conn]struct{}{},
		accepted: make(chan net.Conn, 1024)}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.conns[c] = struct{}{}
			b.mu.Unlock()
			select {
			case b.accepted <- c:
			default:
			}
			b.wg.Add(1)
			b.handlers.Add(1)
			go func() {
				defer b.wg.Done()
				defer b.handlers.Done()
				defer func() {
					b.mu.Lock()
					delete(b.conns, c)
					b.mu.Unlock()
					c.Close()
				}()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(b.Close)
	return b
}

// Close stops the backend, closes its connections and waits for their
// handlers.
func (b *Backend) Close() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// WaitIdle waits until every connection accepted so far has been handled.
// Call it only while no new connection can arrive.
func (b *Backend) WaitIdle() { b.handlers.Wait() }

// Accepted delivers the backend's connections as they are accepted.
func (b *Backend) Accepted() <-chan net.Conn { return b.accepted }

// AcceptedCount returns how many connections are waiting in Accepted.
func (b *Backend) AcceptedCount() int { return len(b.accepted) }

// Echo writes back what it reads and passes the client's EOF on. It copies
// through a buffer rather than splice(2), whose pipes Go keeps pooled and
// would show up as open file descriptors in leak checks.
func Echo(c *net.TCPConn) {
	_, _ = io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{c})
	_ = c.CloseWrite()
}

// NewEchoBackend starts an echoing backend.
func NewEchoBackend(t testing.TB) *Backend { return NewBackend(t, Echo) }

// RefusedAddr returns a loopback address where nothing listens, so a
// connect gets "connection refused" at once.
func RefusedAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// FreeAddr returns a loopback address that was free a moment ago, for a
// server the test is about to start.
func FreeAddr(t testing.TB) string { return RefusedAddr(t) }

// BlackholeAddr returns the address of a loopback listener that never
// accepts and whose accept queue is already full, so the kernel drops new
// SYNs and connects to it time out: an unreachable upstream without
// touching any non-loopback address. Linux only.
func BlackholeAddr(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socket: %v", err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatalf("bind: %v", err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatalf("listen: %v", err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatalf("getsockname: %v", err)
	}
	sa4, ok := sa.(*syscall.SockaddrInet4)
	if !ok {
		t.Fatalf("getsockname returned %T", sa)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa4.Port))

	// Backlog 0 still queues a connection or two; fill the queue until the
	// kernel starts dropping SYNs, which shows up as a dial timeout.
	for i := 0; ; i++ {
		if i == 16 {
			t.Fatalf("black-hole listener %s still accepts connections after %d dials", addr, i)
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			break
		}
		t.Fatalf("filling black-hole listener %s: %v", addr, err)
	}
	return addr
}

// Dial connects to addr on loopback and fails the test on error. The
// connection is closed when the test ends.
func Dial(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// ReadUntilClosed reads c until EOF or an error, at most until timeout,
// and returns what it read, how long it took and the error that ended it
// (nil for EOF).
func ReadUntilClosed(c net.Conn, timeout time.Duration) ([]byte, time.Duration, error) {
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(timeout))
	b, err := io.ReadAll(c)
	return b, time.Since(start), err
}

// EchoRound opens a connection to addr, has msg echoed back into got (as
// long as msg) and closes it: one connection's whole life, for the
// connection-rate benchmarks.
func EchoRound(tb testing.TB, addr string, msg, got []byte) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(msg); err != nil {
		tb.Fatal(err)
	}
	if _, err := io.ReadFull(c, got); err != nil {
		tb.Fatal(err)
	}
}
