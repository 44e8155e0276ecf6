package modules

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

func TestBadProxyHeadersAreRejectedWithoutDialing(t *testing.T) {
	checkLeaks(t)
	valid, err := layer4chain.ProxyHeader{
		Version: 2,
		Source:  netip.MustParseAddrPort("127.0.0.9:4000"), Destination: netip.MustParseAddrPort("127.0.0.1:80"),
	}.AppendTo(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		allow  string
		send   []byte
		reason layer4chain.ProxyRejectReason
	}{
		{"untrusted source", "127.0.0.2/32", valid, layer4chain.ProxyRejectUntrusted},
		{"malformed header", "127.0.0.1/32", []byte("PROXY GARBAGE here\r\n"), layer4chain.ProxyRejectMalformed},
		{"slow header", "127.0.0.1/32", valid[:10], layer4chain.ProxyRejectTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			backend := chaintest.NewEchoBackend(t)
			addr := chaintest.FreeAddr(t)
			startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
				"upstreams":             upstreams(backend.Addr),
				"accept_proxy_protocol": map[string]any{"allow": []string{tc.allow}, "timeout": "300ms"},
			})})
			tr := processTracker()
			rejected := tr.ProxyRejections(tc.reason)
			closed := tr.Closed(layer4chain.ReasonProxyProtocolRejected)

			c := chaintest.Dial(t, addr)
			if _, err := c.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			got, elapsed, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
			if len(got) != 0 || elapsed > 1500*time.Millisecond {
				t.Fatalf("client got %q and was closed after %v, want nothing and a prompt close", got, elapsed)
			}
			waitClosedCount(t, layer4chain.ReasonProxyProtocolRejected, closed+1)
			if n := tr.ProxyRejections(tc.reason); n != rejected+1 {
				t.Fatalf("rejections for %s: %d, want %d", tc.reason, n, rejected+1)
			}
			if n := backend.AcceptedCount(); n != 0 {
				t.Fatalf("backend accepted %d connections, want none dialed", n)
			}
			// The hop goes on serving well-formed clients.
			good := chaintest.Dial(t, addr)
			if tc.reason != layer4chain.ProxyRejectUntrusted {
				if _, err := good.Write(valid); err != nil {
					t.Fatal(err)
				}
			}
			roundTrip(t, good, "still serving")
		})
	}
}

func TestLoopIsClosedByMaxHops(t *testing.T) {
	checkLeaks(t)
	// A hop whose upstream is itself: every pass adds one hop to the PROXY
	// header until max_hops stops it.
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"loop": server(addr, map[string]any{
		"upstreams":             upstreams(addr),
		"proxy_protocol":        "v2",
		"accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.1/32"}},
		"max_hops":              4,
	})})
	tr := processTracker()
	loops, total := closedCount(layer4chain.ReasonLoopDetected), tr.Total()

	// The client comes from 127.0.0.2, outside the allow list: a direct
	// client, whose first bytes tell the hop it sends no PROXY header.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 2 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "hello"); err != nil {
		t.Fatal(err)
	}
	got, elapsed, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
	if len(got) != 0 || elapsed > 2*time.Second {
		t.Fatalf("looping client got %q, closed after %v", got, elapsed)
	}
	waitClosedCount(t, layer4chain.ReasonLoopDetected, loops+1)
	// The hops pass the EOF back as a half-close; the client's close ends
	// the passes' remaining directions.
	c.Close()
	waitEmpty(t)
	// The client's connection plus four passes through the loop.
	if n := tr.Total() - total; n != 5 {
		t.Fatalf("the loop made %d connections, want 5", n)
	}
}

func TestPerClientLimitClosesTheExtraConnection(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams":                  upstreams(backend.Addr),
		"max_connections_per_client": 1,
	})})
	before := closedCount(layer4chain.ReasonLimitExceeded)

	first := chaintest.Dial(t, addr)
	roundTrip(t, first, "first is served")
	second := chaintest.Dial(t, addr)
	got, _, _ := chaintest.ReadUntilClosed(second, 3*time.Second)
	if len(got) != 0 {
		t.Fatalf("second connection got %q, want it closed", got)
	}
	waitClosedCount(t, layer4chain.ReasonLimitExceeded, before+1)
	roundTrip(t, first, "first still served")

	first.Close()
	waitEmpty(t)
	roundTrip(t, chaintest.Dial(t, addr), "a new one after the first closed")
}
