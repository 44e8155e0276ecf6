package modules

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// A bad header is refused, and nothing of it reaches the backend. A trusted
// peer is read before the dial, so its bad header costs no dial; an
// untrusted peer is dialed at once (it may be waiting for the server to
// speak first) and its header refused when it comes.
func TestBadProxyHeadersAreRejectedWithoutReachingTheBackend(t *testing.T) {
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
		dialed bool
	}{
		{"untrusted source", "127.0.0.2/32", valid, layer4chain.ProxyRejectUntrusted, true},
		{"untrusted slow header", "127.0.0.2/32", valid[:10], layer4chain.ProxyRejectTimeout, true},
		{"malformed header", "127.0.0.1/32", []byte("PROXY GARBAGE here\r\n"), layer4chain.ProxyRejectMalformed, false},
		{"slow header", "127.0.0.1/32", valid[:10], layer4chain.ProxyRejectTimeout, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			received := make(chan []byte, 4)
			backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
				b, _ := io.ReadAll(io.TeeReader(c, c))
				received <- b
			})
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
			if !tc.dialed {
				if n := backend.AcceptedCount(); n != 0 {
					t.Fatalf("backend accepted %d connections, want none dialed", n)
				}
			} else if b := receivedBy(t, received); len(b) != 0 {
				t.Fatalf("backend received %q of a rejected header", b)
			}
			// The hop goes on serving well-formed clients.
			good := chaintest.Dial(t, addr)
			if !tc.dialed {
				if _, err := good.Write(valid); err != nil {
					t.Fatal(err)
				}
			}
			roundTrip(t, good, "still serving")
		})
	}
}

func receivedBy(t *testing.T, ch <-chan []byte) []byte {
	t.Helper()
	select {
	case b := <-ch:
		return b
	case <-time.After(5 * time.Second):
		t.Fatal("the backend never finished reading")
		return nil
	}
}

// Behind a hop that accepts PROXY headers from its previous hop only, a
// client that connects directly to a mail server waits for the greeting
// before saying anything. It gets the greeting at once, not after the
// header timeout; a header it sends afterwards is still refused, and the
// server never sees it. A client whose last words are "PRO" is a direct
// client too: the server gets them and its answer comes back.
func TestServerSpeaksFirstToAnUntrustedClient(t *testing.T) {
	checkLeaks(t)
	const greeting, farewell = "220 mail.example ESMTP\r\n", "221 bye\r\n"
	received := make(chan []byte, 4)
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		io.WriteString(c, greeting)
		b, _ := io.ReadAll(c)
		received <- b
		io.WriteString(c, farewell)
	})
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams":             upstreams(backend.Addr),
		"accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.2/32"}, "timeout": "5s"},
	})})
	tr := processTracker()
	untrusted := tr.ProxyRejections(layer4chain.ProxyRejectUntrusted)
	rejected := closedCount(layer4chain.ReasonProxyProtocolRejected)

	readGreeting := func(c net.Conn) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(time.Second))
		buf := make([]byte, len(greeting))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != greeting {
			t.Fatalf("greeting %q, %v; want it within 1s (the header timeout is 5s)", buf, err)
		}
	}

	spoofer := chaintest.Dial(t, addr)
	readGreeting(spoofer)
	hdr, err := layer4chain.ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:25")}.AppendTo(nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := spoofer.Write(append(hdr, "MAIL FROM:<x>\r\n"...)); err != nil {
		t.Fatal(err)
	}
	if rest, elapsed, _ := chaintest.ReadUntilClosed(spoofer, 5*time.Second); len(rest) != 0 || elapsed > 2*time.Second {
		t.Fatalf("spoofing client read %q, closed after %v", rest, elapsed)
	}
	if b := receivedBy(t, received); len(b) != 0 {
		t.Fatalf("the server received %q of an untrusted header", b)
	}
	waitClosedCount(t, layer4chain.ReasonProxyProtocolRejected, rejected+1)
	if n := tr.ProxyRejections(layer4chain.ProxyRejectUntrusted); n != untrusted+1 {
		t.Fatalf("untrusted rejections: %d, want %d", n, untrusted+1)
	}

	short := chaintest.Dial(t, addr)
	if _, err := io.WriteString(short, "PRO"); err != nil {
		t.Fatal(err)
	}
	short.CloseWrite()
	if b := receivedBy(t, received); string(b) != "PRO" {
		t.Fatalf("the server received %q, want PRO then EOF", b)
	}
	if all, _, err := chaintest.ReadUntilClosed(short, 5*time.Second); err != nil || string(all) != greeting+farewell {
		t.Fatalf("client read %q, %v; want the greeting and the farewell", all, err)
	}
	waitEmpty(t)
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

// Each option of the header between hops fails a bad config naming the
// field and the value.
func TestBadProxyHeaderOptionsFailTheConfig(t *testing.T) {
	accept := map[string]any{"allow": []string{"127.0.0.1"}}
	for _, tc := range []struct {
		name    string
		handler map[string]any
		want    string
	}{
		{"unknown policy", map[string]any{"accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.1"}, "policy": "sometimes"}},
			`accept_proxy_protocol.policy: unknown policy "sometimes" (want require or optional)`},
		{"generated type", map[string]any{"proxy_protocol": "v2", "accept_proxy_protocol": accept, "forward_tlvs": []int{0x20, 5}},
			"forward_tlvs[1]: type 5 (0x05) is sent by chain itself"},
		{"hop count", map[string]any{"proxy_protocol": "v2", "accept_proxy_protocol": accept, "forward_tlvs": []int{0xE0}},
			"forward_tlvs[0]: type 224 (0xE0) is sent by chain itself"},
		{"CRC32C", map[string]any{"proxy_protocol": "v2", "accept_proxy_protocol": accept, "forward_tlvs": []int{3}},
			"forward_tlvs[0]: type 3 (0x03) is sent by chain itself"},
		{"out of range", map[string]any{"proxy_protocol": "v2", "accept_proxy_protocol": accept, "forward_tlvs": []int{256}},
			"forward_tlvs[0]: 256 is not a TLV type (0 to 255)"},
		{"twice", map[string]any{"proxy_protocol": "v2", "accept_proxy_protocol": accept, "forward_tlvs": []int{0xE5, 0xE5}},
			"forward_tlvs[1]: type 229 (0xE5) is listed twice"},
		{"hex string", map[string]any{"proxy_protocol": "v2", "accept_proxy_protocol": accept, "forward_tlvs": []string{"0x20"}},
			"forward_tlvs"},
		{"forward with v1", map[string]any{"proxy_protocol": "v1", "accept_proxy_protocol": accept, "forward_tlvs": []int{0xE5}},
			"forward_tlvs: TLVs travel in PROXY v2 only"},
		{"forward without accepting", map[string]any{"proxy_protocol": "v2", "forward_tlvs": []int{0xE5}},
			"forward_tlvs: there is no header to forward TLVs from"},
		{"CRC32C without v2", map[string]any{"proxy_protocol": "v1", "proxy_protocol_crc32c": true},
			"proxy_protocol_crc32c: the checksum is a v2 TLV"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.handler["upstreams"] = upstreams("127.0.0.1:1")
			assertLoadError(t, tc.handler, tc.want)
		})
	}
}

// Under policy optional, a client from a trusted address that sends no
// header (a health checker beside the load balancer) is served; under the
// default policy the same client is refused as missing its header.
func TestOptionalPolicyServesATrustedClientWithoutAHeader(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	for _, policy := range []string{"optional", ""} {
		addr := chaintest.FreeAddr(t)
		if err := caddy.Load(caddyConfig(map[string]any{"hop": server(addr, map[string]any{
			"upstreams":             upstreams(backend.Addr),
			"accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.1/32"}, "policy": policy},
		})}), true); err != nil {
			t.Fatal(err)
		}
		missing := processTracker().ProxyRejections(layer4chain.ProxyRejectMissing)
		c := chaintest.Dial(t, addr)
		if policy == "optional" {
			roundTrip(t, c, "health check")
		} else {
			io.WriteString(c, "health check")
			if got, _, _ := chaintest.ReadUntilClosed(c, 5*time.Second); len(got) != 0 {
				t.Fatalf("require: a trusted client without a header read %q", got)
			}
		}
		c.Close()
		waitEmpty(t)
		// The rejection is counted before the record is removed.
		if n := processTracker().ProxyRejections(layer4chain.ProxyRejectMissing) - missing; (policy == "") != (n == 1) || n > 1 {
			t.Fatalf("policy %q: %d missing-header rejections", policy, n)
		}
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
	}
}
