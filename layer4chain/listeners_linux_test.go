package layer4chain

import (
	"context"
	"errors"
	"io"
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

// TestRescueListenerServesAQueueNobodyAccepts: connections wait in the
// queue of a listener whose owner no longer accepts, ListeningSockets
// counts them, a rescue serves them on a duplicate of the socket, and
// stopping the rescue leaves the owner's listener as it was.
func TestRescueListenerServesAQueueNobodyAccepts(t *testing.T) {
	ln := listenReusePort(t, "127.0.0.1:0")
	local := netip.MustParseAddrPort(ln.Addr().String())
	var clients []net.Conn
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for range 3 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	var sock ListeningSocket
	for deadline := time.Now().Add(2 * time.Second); sock.Queued != 3; {
		socks, err := ListeningSockets(func(a netip.AddrPort) bool { return a == local })
		if err != nil || len(socks) != 1 {
			t.Fatalf("ListeningSockets: %v, %v; want the one listener", socks, err)
		}
		if sock = socks[0]; time.Now().After(deadline) {
			t.Fatalf("the listener's queue holds %d connections, want 3", sock.Queued)
		}
	}
	stop, err := RescueListener(sock.FD, func(c net.Conn) {
		c.Write([]byte("r"))
		c.Close()
	}, func(err error) { t.Errorf("accept: %v", err) })
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if b, err := io.ReadAll(c); err != nil || string(b) != "r" {
			t.Fatalf("client %d read %q, %v; want the rescue's answer", i, b, err)
		}
	}
	stop()
	if s, ok := sock.Refresh(); !ok || s.Queued != 0 {
		t.Fatalf("after the rescue stopped: %+v, listening %v; want the owner's listener, its queue empty", s, ok)
	}
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := <-accepted; err != nil {
		t.Fatalf("the owner's listener after the rescue stopped: %v", err)
	}
}
