package layer4chain

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listenReusePort listens on addr with SO_REUSEPORT, as Caddy does.
func listenReusePort(t *testing.T, addr string) net.Listener {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// TestShutdownListenersRefusesNewConnectionsAtOnce stops one of two
// listeners: new connections to it are refused (not accepted and reset),
// its Accept returns, its owner can still close it, and the other listener
// goes on. (That a replacement process sharing the port then gets every new
// connection is tested across real processes in integration/.)
func TestShutdownListenersRefusesNewConnectionsAtOnce(t *testing.T) {
	stopped := listenReusePort(t, "127.0.0.1:0")
	other := listenReusePort(t, "127.0.0.1:0")
	acceptErr := make(chan error, 1)
	go func() {
		for {
			c, err := stopped.Accept()
			if err != nil {
				acceptErr <- err
				return
			}
			c.Close()
		}
	}()

	target := netip.MustParseAddrPort(stopped.Addr().String())
	n, err := ShutdownListeners(func(local netip.AddrPort) bool { return local == target })
	if err != nil || n != 1 {
		t.Fatalf("ShutdownListeners: %d, %v; want 1", n, err)
	}
	select {
	case err := <-acceptErr:
		if err == nil {
			t.Fatal("Accept on the stopped listener returned no error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept on the stopped listener did not return")
	}
	if _, err := net.DialTimeout("tcp", stopped.Addr().String(), time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dialing the stopped listener: %v, want connection refused", err)
	}
	if err := stopped.Close(); err != nil {
		t.Fatalf("closing the stopped listener: %v", err)
	}
	c, err := net.DialTimeout("tcp", other.Addr().String(), time.Second)
	if err != nil {
		t.Fatalf("the other listener stopped too: %v", err)
	}
	c.Close()
}
