package layer4chain

import (
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// A dial that something other than the upstream ends (the client leaving,
// max_lifetime) must end at once, with that reason, and blame no upstream:
// no dial failure counted, no step towards opening its circuit.

// breakerProxy dials addrs in order, each attempt bounded by timeout, with
// a circuit breaker that one failure opens.
func breakerProxy(t *testing.T, timeout time.Duration, addrs ...string) (*Proxy, []*Upstream) {
	b := balancerFor(t, addrs...)
	ups := b.Order(nil, client1.Addr()) // the first policy: each once, in order
	tr := NewTracker()
	return &Proxy{Balancer: b, Tracker: tr, Dialer: &Dialer{ConnectTimeout: timeout, OnAttempt: tr.ReportDial,
		Passive: &PassiveHealth{FailDuration: time.Hour, MaxFails: 1}}}, ups
}

// noUpstreamBlamed fails if a dial failure was counted or a circuit opened.
func noUpstreamBlamed(t *testing.T, h *hop, ups []*Upstream) {
	t.Helper()
	for _, r := range DialFailureReasons {
		if n := h.Tracker.DialFailures(r); n != 0 {
			t.Errorf("%d %s dial failures counted", n, r)
		}
	}
	for _, u := range ups {
		if got := u.Health(); got != HealthHealthy {
			t.Errorf("upstream %s is %s, want healthy", u.Addr, got)
		}
	}
}

func TestAClientThatLeavesDuringTheDialEndsIt(t *testing.T) {
	for _, tc := range []struct {
		name  string
		leave func(c *net.TCPConn)
	}{
		{"closes having sent nothing", func(c *net.TCPConn) { c.Close() }},
		{"resets having sent bytes", func(c *net.TCPConn) {
			c.Write([]byte("hello"))
			c.SetLinger(0)
			c.Close()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backend := chaintest.NewEchoBackend(t)
			p, ups := breakerProxy(t, 5*time.Second, chaintest.BlackholeAddr(t), backend.Addr)
			h := startHop(t, p, nil)
			start := time.Now()
			tc.leave(chaintest.Dial(t, h.Addr))
			if r := h.reason(t); r != ReasonClientClosed || time.Since(start) > time.Second {
				t.Fatalf("a client gone during a 5s dial ended after %v with %s", time.Since(start), r)
			}
			if n := backend.AcceptedCount(); n != 0 {
				t.Fatalf("the next upstream got %d connections for a client that had left", n)
			}
			noUpstreamBlamed(t, h, ups)
		})
	}
}

// A client that sent its request and half-closed has not left: it waits
// for the answer, however long the dial takes, whether its bytes are
// still in the socket or were read before (by a matcher: pending).
func TestAClientThatHalfClosesDuringTheDialIsServed(t *testing.T) {
	for _, tc := range []struct {
		name           string
		pending, sends string
	}{
		{"bytes unread", "", "request"},
		{"bytes read by a matcher", "request", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backend := chaintest.NewEchoBackend(t)
			p, _ := breakerProxy(t, 300*time.Millisecond, chaintest.BlackholeAddr(t), backend.Addr)
			h := startHop(t, p, []byte(tc.pending))
			c := chaintest.Dial(t, h.Addr)
			c.Write([]byte(tc.sends))
			c.CloseWrite()
			got, _, err := chaintest.ReadUntilClosed(c, 5*time.Second)
			if string(got) != "request" {
				t.Fatalf("the half-closed client got %q (%v), want its request echoed after the failover", got, err)
			}
			h.reason(t)
		})
	}
}

func TestMaxLifetimeCuttingADialBlamesNoUpstream(t *testing.T) {
	const clients = 10
	p, ups := breakerProxy(t, 5*time.Second, chaintest.BlackholeAddr(t))
	p.Timeouts.MaxLifetime = 200 * time.Millisecond
	h := startHop(t, p, nil)
	var wg sync.WaitGroup
	for range clients {
		c := chaintest.Dial(t, h.Addr) // held open: the lifetime ends it
		wg.Add(1)
		go func() {
			defer wg.Done()
			io.Copy(io.Discard, c)
		}()
	}
	for range clients {
		if r := h.reason(t); r != ReasonMaxLifetime {
			t.Errorf("a dial cut by max_lifetime ended with %s", r)
		}
	}
	wg.Wait()
	noUpstreamBlamed(t, h, ups)
}

// max_lifetime counts from admission, the wait for a trusted peer's
// header included: it ends that wait on time, and refuses no header.
func TestMaxLifetimeEndsTheWaitForAHeader(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	p := &Proxy{Balancer: balancerFor(t, backend.Addr),
		Accept:   &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}, Timeout: 5 * time.Second},
		Timeouts: Timeouts{MaxLifetime: 200 * time.Millisecond}}
	h := startHop(t, p, nil)
	start := time.Now()
	c := chaintest.Dial(t, h.Addr)
	defer c.Close()
	if r := h.reason(t); r != ReasonMaxLifetime || time.Since(start) > time.Second {
		t.Fatalf("a silent trusted peer with max_lifetime 200ms ended after %v with %s", time.Since(start), r)
	}
	for _, reason := range ProxyRejectReasons {
		if n := h.Tracker.ProxyRejections(reason); n != 0 {
			t.Errorf("%d headers refused (%s) for a wait the lifetime ended", n, reason)
		}
	}
}

// Behind TLS termination the socket cannot tell what the client sent: the
// TLS layer may already hold its request and close_notify, leaving only
// the FIN in the socket. Such a client is served, not taken for gone.
func TestATLSClientThatHalfClosesDuringTheDialIsServed(t *testing.T) {
	ca := chaintest.NewCA(t, "test CA")
	backend := chaintest.NewEchoBackend(t)
	p, _ := breakerProxy(t, 300*time.Millisecond, chaintest.BlackholeAddr(t), backend.Addr)
	h := startTLSHop(t, p, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "hop", "hop.test")}})
	for range 5 {
		raw := chaintest.Dial(t, h.Addr)
		c := tls.Client(raw, &tls.Config{RootCAs: ca.Pool, ServerName: "hop.test"})
		// The request and close_notify right behind the handshake, then
		// the FIN: all of it can reach the hop in the handshake's reads.
		if _, err := c.Write([]byte("request")); err != nil {
			t.Fatal(err)
		}
		c.CloseWrite()
		raw.CloseWrite()
		got, _, err := chaintest.ReadUntilClosed(c, 5*time.Second)
		if string(got) != "request" {
			t.Fatalf("the half-closed TLS client got %q (%v), want its request echoed after the failover", got, err)
		}
		h.reason(t)
		c.Close()
	}
}
