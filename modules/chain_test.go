package modules

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// roundTrip writes msg on c and reads the same number of bytes back.
func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(got) != msg {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
	_ = c.SetDeadline(time.Time{})
}

// closedCount reads a close-reason counter of the process tracker.
func closedCount(reason layer4chain.CloseReason) int64 { return processTracker().Closed(reason) }

// waitClosedCount waits until the counter of reason reaches want: the
// record is removed just after the client sees its socket close.
func waitClosedCount(t *testing.T, reason layer4chain.CloseReason, want int64) {
	t.Helper()
	tr := processTracker()
	// The tracker signals only when it empties, and other connections may
	// stay open: poll the counter between those signals.
	deadline := time.After(3 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for tr.Closed(reason) < want {
		select {
		case <-tr.Empty():
			if tr.Closed(reason) < want {
				t.Fatalf("closed with %s: %d, want %d", reason, tr.Closed(reason), want)
			}
		case <-tick.C:
		case <-deadline:
			t.Fatalf("closed with %s: %d, want %d", reason, tr.Closed(reason), want)
		}
	}
}

// waitEmpty waits until no connection is tracked.
func waitEmpty(t *testing.T) {
	t.Helper()
	select {
	case <-processTracker().Empty():
	case <-time.After(5 * time.Second):
		t.Fatalf("records still tracked: %d", processTracker().Len())
	}
}

func TestEchoThroughOneHop(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})})

	before := closedCount(layer4chain.ReasonClientClosed)
	c := chaintest.Dial(t, addr)
	roundTrip(t, c, "hello through one hop")
	roundTrip(t, c, strings.Repeat("x", 200_000))
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	rest, _, err := chaintest.ReadUntilClosed(c, 3*time.Second)
	if err != nil || len(rest) != 0 {
		t.Fatalf("after half-close: read %q, %v; want a clean EOF", rest, err)
	}
	waitClosedCount(t, layer4chain.ReasonClientClosed, before+1)
}

// ppBackend reads the PROXY header every connection starts with (trusting
// loopback), answers with the original client it names, then echoes.
func ppBackend(t *testing.T, infos chan<- *layer4chain.ProxyInfo) *chaintest.Backend {
	acceptor := &layer4chain.ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, Timeout: 3 * time.Second}
	return chaintest.NewBackend(t, func(c *net.TCPConn) {
		info, rest, err := acceptor.Accept(c, netip.MustParseAddr("127.0.0.1"))
		if err != nil || info == nil {
			fmt.Fprintf(c, "no header: %v\n", err)
			return
		}
		infos <- info
		fmt.Fprintf(c, "%s\n", info.Source)
		_, _ = c.Write(rest)
		chaintest.Echo(c)
	})
}

func TestBackendSeesOriginalClientThroughTwoHops(t *testing.T) {
	for _, version := range []string{"v1", "v2"} {
		t.Run(version, func(t *testing.T) {
			checkLeaks(t)
			infos := make(chan *layer4chain.ProxyInfo, 1)
			backend := ppBackend(t, infos)
			outer, inner := chaintest.FreeAddr(t), chaintest.FreeAddr(t)
			startCaddy(t, map[string]any{
				"outer": server(outer, map[string]any{"upstreams": upstreams(inner), "proxy_protocol": "v2"}),
				"inner": server(inner, map[string]any{
					"upstreams":             upstreams(backend.Addr),
					"accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.1/32"}},
					"proxy_protocol":        version,
				}),
			})

			c := chaintest.Dial(t, outer)
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			line := make([]byte, 64)
			n, err := c.Read(line)
			if err != nil {
				t.Fatalf("reading the backend's answer: %v", err)
			}
			if got, want := strings.TrimSpace(string(line[:n])), c.LocalAddr().String(); got != want {
				t.Fatalf("backend saw original client %q, want the client's own address %q", got, want)
			}
			info := <-infos
			if version == "v2" && (info.Hops != 2 || info.ChainID == "") {
				t.Fatalf("backend got hops %d and chain ID %q, want 2 and an ID", info.Hops, info.ChainID)
			}

			// Both hops hold a record of this connection under one chain ID.
			records := processTracker().Records()
			if len(records) != 2 {
				t.Fatalf("tracked records: %d, want 2 (one per hop)", len(records))
			}
			a, b := records[0].Info(), records[1].Info()
			if a.ChainID != b.ChainID || a.ChainID == "" {
				t.Fatalf("chain IDs differ across hops: %q vs %q", a.ChainID, b.ChainID)
			}
			if a.Hop+b.Hop != 3 || a.OriginalClient != c.LocalAddr().String() || b.OriginalClient != a.OriginalClient {
				t.Fatalf("hop records: %+v and %+v", a, b)
			}
			if version == "v2" && info.ChainID != a.ChainID {
				t.Fatalf("backend got chain ID %q, hops have %q", info.ChainID, a.ChainID)
			}
			roundTrip(t, c, "still flowing")
		})
	}
}

func TestUnreachableBackendClosesClientAfterConnectTimeout(t *testing.T) {
	checkLeaks(t)
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams":       upstreams(chaintest.BlackholeAddr(t)),
		"connect_timeout": "300ms",
	})})
	before := closedCount(layer4chain.ReasonConnectTimeout)

	c := chaintest.Dial(t, addr)
	_, elapsed, err := chaintest.ReadUntilClosed(c, 5*time.Second)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read: %v, want the connection closed", err)
	}
	if elapsed > 800*time.Millisecond {
		t.Fatalf("client closed after %v, want within connect_timeout 300ms + 500ms", elapsed)
	}
	waitClosedCount(t, layer4chain.ReasonConnectTimeout, before+1)
}

func TestRefusedFirstUpstreamFailsOverToSecond(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams": upstreams(chaintest.RefusedAddr(t), backend.Addr),
	})})
	before := processTracker().DialFailures(layer4chain.ReasonConnectRefused)

	c := chaintest.Dial(t, addr)
	roundTrip(t, c, "served by the second upstream")
	if got := processTracker().DialFailures(layer4chain.ReasonConnectRefused); got != before+1 {
		t.Fatalf("refused dials counted: %d, want %d", got, before+1)
	}
}

func TestRefusedOnlyUpstreamClosesClientAndCaddyServesOn(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	refusing, working := chaintest.FreeAddr(t), chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{
		"refusing": server(refusing, map[string]any{"upstreams": upstreams(chaintest.RefusedAddr(t))}),
		"working":  server(working, map[string]any{"upstreams": upstreams(backend.Addr)}),
	})
	before := closedCount(layer4chain.ReasonConnectRefused)

	for i := 0; i < 20; i++ {
		c := chaintest.Dial(t, refusing)
		_, elapsed, err := chaintest.ReadUntilClosed(c, 3*time.Second)
		if err != nil && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("client read: %v, want the connection closed", err)
		}
		if elapsed > 300*time.Millisecond {
			t.Fatalf("client closed after %v, want within 300ms", elapsed)
		}
	}
	waitClosedCount(t, layer4chain.ReasonConnectRefused, before+20)
	roundTrip(t, chaintest.Dial(t, working), "caddy still serves")
	roundTrip(t, chaintest.Dial(t, working), "and again")
}

func TestClientHalfCloseStillGetsLateLargeResponse(t *testing.T) {
	checkLeaks(t)
	const size = 1 << 20
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		req, err := io.ReadAll(c) // until the client's EOF arrives through the hop
		if err != nil || string(req) != "request" {
			return
		}
		_, _ = c.Write(bytes.Repeat([]byte{'r'}, size))
	})
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})})

	c := chaintest.Dial(t, addr)
	if _, err := io.WriteString(c, "request"); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, _, err := chaintest.ReadUntilClosed(c, 5*time.Second)
	if err != nil || len(got) != size {
		t.Fatalf("response: %d bytes, %v; want %d bytes then EOF", len(got), err, size)
	}
}

func TestHalfOpenStreamOutlivesHalfCloseTimeoutWhileActive(t *testing.T) {
	checkLeaks(t)
	const chunks = 16
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		if _, err := io.ReadAll(c); err != nil {
			return
		}
		tick := time.NewTicker(50 * time.Millisecond) // the stream's own pace
		defer tick.Stop()
		for i := 0; i < chunks; i++ {
			<-tick.C
			if _, err := c.Write([]byte{'s'}); err != nil {
				return
			}
		}
	})
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams":          upstreams(backend.Addr),
		"half_close_timeout": "250ms",
	})})
	before := closedCount(layer4chain.ReasonHalfCloseTimeout)

	c := chaintest.Dial(t, addr)
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, elapsed, err := chaintest.ReadUntilClosed(c, 5*time.Second)
	if err != nil || len(got) != chunks {
		t.Fatalf("stream: %d chunks in %v, %v; want all %d", len(got), elapsed, err, chunks)
	}
	if elapsed < 500*time.Millisecond {
		t.Fatalf("stream took %v, want it to outlive the 250ms half_close_timeout", elapsed)
	}
	if n := closedCount(layer4chain.ReasonHalfCloseTimeout); n != before {
		t.Fatalf("half_close_timeout cut %d connections, want none", n-before)
	}
}

func TestSilentHalfOpenConnectionClosedByHalfCloseTimeout(t *testing.T) {
	checkLeaks(t)
	silent := make(chan struct{})
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		_, _ = io.ReadAll(c) // reads the client's EOF, then says nothing
		<-silent
	})
	t.Cleanup(func() { close(silent) })
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams":          upstreams(backend.Addr),
		"half_close_timeout": "250ms",
	})})
	before := closedCount(layer4chain.ReasonHalfCloseTimeout)

	c := chaintest.Dial(t, addr)
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_, elapsed, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
	if elapsed < 200*time.Millisecond || elapsed > 1500*time.Millisecond {
		t.Fatalf("half-open connection closed after %v, want about 250ms", elapsed)
	}
	waitClosedCount(t, layer4chain.ReasonHalfCloseTimeout, before+1)
}

func TestIdleConnectionClosedByIdleTimeout(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams":    upstreams(backend.Addr),
		"idle_timeout": "300ms",
	})})
	before := closedCount(layer4chain.ReasonIdleTimeout)

	c := chaintest.Dial(t, addr)
	roundTrip(t, c, "one exchange, then silence")
	_, elapsed, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
	if elapsed < 250*time.Millisecond || elapsed > 1500*time.Millisecond {
		t.Fatalf("idle connection closed after %v, want about 300ms", elapsed)
	}
	waitClosedCount(t, layer4chain.ReasonIdleTimeout, before+1)
}

func TestBackendResetEndsClientPromptly(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		_, _ = c.Read(make([]byte, 16))
		_ = c.SetLinger(0) // close sends RST
	})
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})})
	before := closedCount(layer4chain.ReasonUpstreamReset)

	c := chaintest.Dial(t, addr)
	if _, err := io.WriteString(c, "trigger"); err != nil {
		t.Fatal(err)
	}
	_, elapsed, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
	if elapsed > 500*time.Millisecond {
		t.Fatalf("client ended %v after the backend's reset, want promptly", elapsed)
	}
	waitClosedCount(t, layer4chain.ReasonUpstreamReset, before+1)
}

func TestClientResetEndsUpstreamPromptly(t *testing.T) {
	checkLeaks(t)
	ended := make(chan time.Time, 1)
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		_, _ = io.Copy(io.Discard, struct{ io.Reader }{c})
		ended <- time.Now()
	})
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})})
	before := closedCount(layer4chain.ReasonClientReset)

	c := chaintest.Dial(t, addr)
	if _, err := io.WriteString(c, "some bytes"); err != nil {
		t.Fatal(err)
	}
	waitEstablished(t, 1)
	_ = c.SetLinger(0)
	reset := time.Now()
	c.Close()
	select {
	case at := <-ended:
		if d := at.Sub(reset); d > 500*time.Millisecond {
			t.Fatalf("upstream ended %v after the client's reset", d)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("upstream still open 3s after the client's reset")
	}
	waitClosedCount(t, layer4chain.ReasonClientReset, before+1)
}

// waitEstablished waits until n connections are established.
func waitEstablished(t *testing.T, n int64) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for processTracker().CountInState(layer4chain.StateEstablished) < n {
		if time.Now().After(deadline) {
			t.Fatalf("established connections: %d, want %d", processTracker().CountInState(layer4chain.StateEstablished), n)
		}
		<-time.After(5 * time.Millisecond) // the tracker has no per-state event
	}
}

func TestHandlerAndAppConnectionLimits(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler map[string]any
		app     map[string]any
	}{
		{"handler max_connections", map[string]any{"max_connections": 2}, nil},
		{"app max_connections", map[string]any{}, map[string]any{"max_connections": 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			backend := chaintest.NewEchoBackend(t)
			addr := chaintest.FreeAddr(t)
			tc.handler["upstreams"] = upstreams(backend.Addr)
			startCaddyWithAdmin(t, map[string]any{"hop": server(addr, tc.handler)}, tc.app)
			before := closedCount(layer4chain.ReasonLimitExceeded)

			a, b := chaintest.Dial(t, addr), chaintest.Dial(t, addr)
			roundTrip(t, a, "first")
			roundTrip(t, b, "second")
			extra := chaintest.Dial(t, addr)
			if got, _, _ := chaintest.ReadUntilClosed(extra, 3*time.Second); len(got) != 0 {
				t.Fatalf("third connection got %q, want it closed", got)
			}
			waitClosedCount(t, layer4chain.ReasonLimitExceeded, before+1)
			a.Close()
			b.Close()
			waitEmpty(t)
			roundTrip(t, chaintest.Dial(t, addr), "room again")
		})
	}
}

func TestLeastConnCountsConnectionsOfTheConfigBeforeAReload(t *testing.T) {
	checkLeaks(t)
	a, b := chaintest.NewEchoBackend(t), chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	servers := func(idle string) map[string]any {
		return map[string]any{"hop": server(addr, map[string]any{
			"upstreams":      upstreams(a.Addr, b.Addr),
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "least_conn"}},
			"idle_timeout":   idle,
		})}
	}
	startCaddy(t, servers("1h"))
	first := chaintest.Dial(t, addr)
	roundTrip(t, first, "to a")
	if err := caddy.Load(caddyConfig(servers("2h")), true); err != nil {
		t.Fatal(err)
	}
	second := chaintest.Dial(t, addr)
	roundTrip(t, second, "to b")
	got := map[string]int{}
	for _, r := range processTracker().Records() {
		got[r.Info().Upstream]++
	}
	if got[a.Addr] != 1 || got[b.Addr] != 1 {
		t.Fatalf("connections by upstream %v: the new config's least_conn did not see the old config's connection", got)
	}
}

// helloReaches sends a TLS hello for "localhost" to addr and waits until
// backend (an echo backend, the hello's end) accepts a connection. The
// echo answers the hello with itself: the handshake fails, and the
// connection, returned, stays open.
func helloReaches(t *testing.T, addr string, backend *chaintest.Backend) net.Conn {
	t.Helper()
	raw := chaintest.Dial(t, addr)
	_ = raw.SetDeadline(time.Now().Add(3 * time.Second))
	if err := tls.Client(raw, &tls.Config{ServerName: "localhost", InsecureSkipVerify: true}).Handshake(); err == nil {
		t.Fatal("a TLS handshake with an echo backend succeeded")
	}
	select {
	case <-backend.Accepted():
	case <-time.After(3 * time.Second):
		t.Fatalf("no connection reached the backend %s for the SNI localhost", backend.Addr)
	}
	return raw
}

// An upstream address with a placeholder only the connection knows is
// filled per connection, as caddy-l4's proxy does: the SNI a tls matcher
// found picks the host. The record names the address dialed and the
// template; a connection that leaves the placeholder empty fails its dial
// (connect_failed) without dialing anything.
func TestDialPlaceholderIsFilledPerConnection(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	_, port, _ := net.SplitHostPort(backend.Addr)
	template := "{l4.tls.server_name}:" + port
	withSNI, without := chaintest.FreeAddr(t), chaintest.FreeAddr(t)
	sniServer := server(withSNI, map[string]any{"upstreams": upstreams(template)})
	sniServer["routes"].([]any)[0].(map[string]any)["match"] = []any{map[string]any{"tls": map[string]any{"sni": []string{"localhost"}}}}
	admin := startCaddyWithAdmin(t, map[string]any{"sni": sniServer, "plain": server(without, map[string]any{"upstreams": upstreams(template)})}, nil)

	raw := helloReaches(t, withSNI, backend)
	// The record names the address dialed and the template it filled; a
	// filter takes either, as /upstreams and the metrics know the template.
	for _, filter := range []string{"", "?upstream=" + url.QueryEscape(template), "?upstream=localhost:" + port} {
		list := admin.connections(filter)
		if len(list) != 1 || list[0].Upstream != "localhost:"+port || list[0].UpstreamTemplate != template {
			t.Fatalf("connections%s: %+v, want one with upstream localhost:%s from the template %q", filter, list, port, template)
		}
	}
	if list := admin.connections("?upstream=127.0.0.1:" + port); len(list) != 0 {
		t.Fatalf("a filter on another address matched the template's connection: %+v", list)
	}
	raw.Close()

	before := closedCount(layer4chain.ReasonConnectFailed)
	c := chaintest.Dial(t, without)
	if got, _, _ := chaintest.ReadUntilClosed(c, 3*time.Second); len(got) != 0 {
		t.Fatalf("read %q", got)
	}
	waitEmpty(t)
	if closedCount(layer4chain.ReasonConnectFailed) != before+1 || backend.AcceptedCount() != 0 {
		t.Fatalf("connect_failed %d (before %d), backend dials %d: want one more and none",
			closedCount(layer4chain.ReasonConnectFailed), before, backend.AcceptedCount())
	}
}

// Behind a previous hop, {l4.tls.server_name} is the SNI that hop's tls
// matcher found, carried in the PROXY v2 header's authority: an inner hop
// routes by it as the first could.
func TestInnerHopFillsTheServerNameFromTheHeader(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	_, port, _ := net.SplitHostPort(backend.Addr)
	outer, inner := chaintest.FreeAddr(t), chaintest.FreeAddr(t)
	outerServer := server(outer, map[string]any{"upstreams": upstreams(inner), "proxy_protocol": "v2"})
	outerServer["routes"].([]any)[0].(map[string]any)["match"] = []any{map[string]any{"tls": map[string]any{"sni": []string{"localhost"}}}}
	startCaddy(t, map[string]any{
		"outer": outerServer,
		"inner": server(inner, map[string]any{"upstreams": upstreams("{l4.tls.server_name}:" + port),
			"accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.1/32"}}}),
	})
	helloReaches(t, outer, backend).Close()
	waitEmpty(t)
}
