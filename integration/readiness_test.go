package integration

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// TestWaitingForCaddyCountsNoConnection: once a test's Caddy is ready, the
// first connection a client makes is the first the hop counts and the
// first its backend sees. A readiness dial would be one more.
func TestWaitingForCaddyCountsNoConnection(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	hop, adminAddr := freeAddr(t), freeAddr(t)
	cfg := fmt.Sprintf(`{"admin": {"listen": %q},
		"apps": {"layer4": {"servers": {"hop": {"listen": [%q],
			"routes": [{"handle": [{"handler": "chain", "upstreams": [{"dial": [%q]}]}]}]}}}}}`,
		adminAddr, hop, backend.Addr)
	path := filepath.Join(t.TempDir(), "caddy.json")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	startCaddy(t, []string{hop, adminAddr}, "--config", path)

	c, err := net.Dial("tcp", hop)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "x"); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("echo through the hop: %v", err)
	}
	c.Close()

	// A probe made before our connection was accepted before it: once no
	// connection is active, any probe has been counted too.
	deadline := time.Now().Add(5 * time.Second)
	s := stats(t, adminAddr)
	for s.ActiveTotal != 0 || s.ConnectionsTotal == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the hop still holds %d connections", s.ActiveTotal)
		}
		<-time.After(20 * time.Millisecond) // another process's state: polled through its admin API
		s = stats(t, adminAddr)
	}
	if s.ConnectionsTotal != 1 || backend.AcceptedCount() != 1 {
		t.Fatalf("after one client the hop counted %d connections (closed: %v) and the backend accepted %d",
			s.ConnectionsTotal, s.Closed, backend.AcceptedCount())
	}
}

// TestListeningSocketBelongsToItsProcess: the readiness wait finds a
// listening socket by its owner, on an exact or a resolved address, and
// not in another process that shares nothing with it.
func TestListeningSocketBelongsToItsProcess(t *testing.T) {
	ln4, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln4.Close()
	addr := ln4.Addr().String()
	_, port, _ := net.SplitHostPort(addr)
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()

	for _, tc := range []struct {
		pid  int
		addr string
		want bool
	}{
		{os.Getpid(), addr, true},
		{os.Getpid(), "localhost:" + port, true},
		{os.Getpid(), freeAddr(t), false},
		{other.Process.Pid, addr, false},
	} {
		if got, err := listensOn(tc.pid, tc.addr); err != nil || got != tc.want {
			t.Errorf("listensOn(%d, %s) = %v, %v; want %v", tc.pid, tc.addr, got, err, tc.want)
		}
	}
	if ln6, err := net.Listen("tcp", "[::1]:0"); err == nil {
		defer ln6.Close()
		if got, err := listensOn(os.Getpid(), ln6.Addr().String()); err != nil || !got {
			t.Errorf("listensOn on IPv6 %s = %v, %v", ln6.Addr(), got, err)
		}
	}
}
