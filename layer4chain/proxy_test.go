package layer4chain

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// hop serves a loopback listener with a Proxy, the way the Caddy handler
// does, and waits for every connection when the test ends.
type hop struct {
	Addr    string
	Tracker *Tracker
	reasons chan CloseReason
}

func startHop(t testing.TB, p *Proxy, pending []byte) *hop {
	t.Helper()
	return startHopServing(t, p, func(h *hop, c net.Conn) (CloseReason, bool) {
		return p.Serve(c, pending, ClientMeta{Server: h.Addr}), true
	})
}

// startDetachedHop is startHop serving as the Caddy module does: each
// client socket is taken over and served detached, so the accept loop's
// goroutine returns (and closes its descriptor) once the connection is
// established. Reasons are not reported; the tracker's are.
func startDetachedHop(t testing.TB, p *Proxy) *hop {
	t.Helper()
	h := startHopServing(t, p, func(h *hop, c net.Conn) (CloseReason, bool) {
		own, err := TakeOver(c.(*net.TCPConn))
		if err != nil {
			t.Errorf("take over: %v", err)
			return ReasonNone, false
		}
		p.ServeDetached(own, nil, ClientMeta{Server: h.Addr})
		return ReasonNone, false
	})
	// Registered after startHopServing's, so it runs first: detached
	// connections end on goroutines of their own.
	t.Cleanup(func() {
		select {
		case <-p.Tracker.Empty():
		case <-time.After(5 * time.Second):
			t.Errorf("detached connections still open: %d", p.Tracker.Len())
		}
	})
	return h
}

// startHopServing runs an accept loop for p on a free loopback port; serve
// handles each accepted connection and reports its reason, if it served
// one. The hop checks, when the test ends, that no record outlived it.
func startHopServing(t testing.TB, p *Proxy, serve func(h *hop, c net.Conn) (CloseReason, bool)) *hop {
	t.Helper()
	if p.Tracker == nil {
		p.Tracker = NewTracker()
	}
	if p.Dialer == nil {
		p.Dialer = &Dialer{ConnectTimeout: time.Second}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &hop{Addr: ln.Addr().String(), Tracker: p.Tracker, reasons: make(chan CloseReason, 1024)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				if reason, ok := serve(h, c); ok {
					select {
					case h.reasons <- reason:
					default: // benchmarks do not read reasons
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		if n := p.Tracker.Len(); n != 0 {
			t.Errorf("records left: %d", n)
		}
	})
	return h
}

func balancerFor(t testing.TB, addrs ...string) *Balancer {
	ups := make([]*Upstream, len(addrs))
	for i, a := range addrs {
		ups[i] = NewUpstream(a)
	}
	b, err := NewBalancer("", ups, 0)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (h *hop) reason(t *testing.T) CloseReason {
	t.Helper()
	select {
	case r := <-h.reasons:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no connection ended")
		return ""
	}
}

func TestPendingBytesReachUpstreamFirstAfterTheHeader(t *testing.T) {
	infos := make(chan *ProxyInfo, 1)
	got := make(chan []byte, 1)
	acceptor := &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		info, rest, err := acceptor.Accept(c, netip.MustParseAddr("127.0.0.1"))
		if err != nil {
			return
		}
		infos <- info
		more, _ := io.ReadAll(c)
		got <- append(rest, more...)
	})
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr), EmitVersion: 2}, []byte("matched-"))
	c := chaintest.Dial(t, h.Addr)
	io.WriteString(c, "rest")
	c.CloseWrite()
	info := <-infos
	if info.Source.String() != c.LocalAddr().String() || info.Hops != 1 || len(info.ChainID) != 32 {
		t.Fatalf("header: %+v", info)
	}
	if b := <-got; string(b) != "matched-rest" {
		t.Fatalf("upstream got %q, want the matched bytes first", b)
	}
	c.Close()
	if r := h.reason(t); r != ReasonClientClosed {
		t.Fatalf("reason %s", r)
	}
}

func TestRecordCloseEndsBothSidesWithItsReason(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr)}, nil)
	c := chaintest.Dial(t, h.Addr)
	io.WriteString(c, "x")
	io.ReadFull(c, make([]byte, 1))
	recs := h.Tracker.Records()
	if len(recs) != 1 || recs[0].State() != StateEstablished {
		t.Fatalf("records: %v", recs)
	}
	recs[0].Close(ReasonAdmin)
	if _, elapsed, _ := chaintest.ReadUntilClosed(c, 3*time.Second); elapsed > time.Second {
		t.Fatalf("client closed after %v", elapsed)
	}
	if r := h.reason(t); r != ReasonAdmin {
		t.Fatalf("reason %s, want admin", r)
	}
}

func TestMaxLifetimeEndsABusyConnection(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr),
		Timeouts: Timeouts{Idle: time.Hour, MaxLifetime: 300 * time.Millisecond}}, nil)
	c := chaintest.Dial(t, h.Addr)
	start := time.Now()
	buf := make([]byte, 4)
	for {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, "ping"); err != nil {
			break
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			break
		}
	}
	if elapsed := time.Since(start); elapsed < 250*time.Millisecond || elapsed > 1500*time.Millisecond {
		t.Fatalf("busy connection ended after %v, want about 300ms", elapsed)
	}
	if r := h.reason(t); r != ReasonMaxLifetime {
		t.Fatalf("reason %s, want max_lifetime", r)
	}
}

func TestUpstreamHalfCloseReachesClientAndClientKeepsSending(t *testing.T) {
	received := make(chan []byte, 1)
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		io.WriteString(c, "greeting")
		c.CloseWrite() // the upstream is done talking, still listening
		b, _ := io.ReadAll(c)
		received <- b
	})
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr)}, nil)
	c := chaintest.Dial(t, h.Addr)
	got, _, err := chaintest.ReadUntilClosed(c, 3*time.Second)
	if err != nil || string(got) != "greeting" {
		t.Fatalf("client read %q, %v; want the greeting then EOF", got, err)
	}
	payload := bytes.Repeat([]byte("u"), 300_000)
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if b := <-received; !bytes.Equal(b, payload) {
		t.Fatalf("upstream got %d bytes after its half-close, want %d", len(b), len(payload))
	}
	if r := h.reason(t); r != ReasonUpstreamClosed {
		t.Fatalf("reason %s, want upstream_closed (it ended first)", r)
	}
}

func TestAHopBehindAV1HeaderCountsItselfSecond(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr),
		Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}}, nil)
	c := chaintest.Dial(t, h.Addr)
	hdr, err := ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("127.0.0.9:1234"),
		Destination: netip.MustParseAddrPort("127.0.0.1:80")}.AppendTo(nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Write(append(hdr, "x"...))
	io.ReadFull(c, make([]byte, 1))
	info := h.Tracker.Records()[0].Info()
	if info.Hop != 2 || info.OriginalClient != "127.0.0.9:1234" {
		t.Fatalf("record behind a v1 header: hop %d, original client %s", info.Hop, info.OriginalClient)
	}
}

// closedRecords is an Observer that keeps the final snapshot of each
// removed record.
type closedRecords struct{ infos chan RecordInfo }

func (c closedRecords) StateChanged(*Record, State, State)                  {}
func (c closedRecords) Dialed(string, time.Duration, error)                 {}
func (c closedRecords) Swept(SweepResult)                                   {}
func (c closedRecords) Closed(r *Record)                                    { c.infos <- r.Info() }
func (c closedRecords) Refused(string, netip.AddrPort, CloseReason, string) {}

func TestCloseDetailSaysWhatTheReasonCannot(t *testing.T) {
	for _, tc := range []struct {
		name   string
		proxy  func(t *testing.T) *Proxy
		send   string
		reason CloseReason
		detail string
	}{
		{"refused dial", func(t *testing.T) *Proxy {
			return &Proxy{Balancer: balancerFor(t, chaintest.RefusedAddr(t))}
		}, "x", ReasonConnectRefused, "connection refused"},
		{"untrusted header", func(t *testing.T) *Proxy {
			// An untrusted peer is dialed at once; its header is refused
			// when it comes.
			return &Proxy{Balancer: balancerFor(t, chaintest.NewEchoBackend(t).Addr),
				Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}}
		}, "PROXY TCP4 127.0.0.9 127.0.0.1 1 2\r\n", ReasonProxyProtocolRejected, "untrusted"},
		{"loop", func(t *testing.T) *Proxy {
			return &Proxy{Balancer: balancerFor(t, chaintest.RefusedAddr(t)), MaxHops: 2,
				Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}}
		}, loopHeader(t), ReasonLoopDetected, "2 hops before this one, max_hops is 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			closed := closedRecords{make(chan RecordInfo, 1)}
			p := tc.proxy(t)
			p.Tracker = NewTracker()
			p.Tracker.Observer = closed
			h := startHop(t, p, nil)
			c := chaintest.Dial(t, h.Addr)
			io.WriteString(c, tc.send)
			info := <-closed.infos
			if info.Reason != tc.reason || !strings.Contains(info.Detail, tc.detail) {
				t.Fatalf("closed with %s (%q), want %s with a detail mentioning %q", info.Reason, info.Detail, tc.reason, tc.detail)
			}
			if tc.reason == ReasonLoopDetected && (info.ChainID != "feedc0de" || info.OriginalClient != "127.0.0.9:1") {
				t.Fatalf("a loop's record has chain ID %q and client %q, want the rejected header's", info.ChainID, info.OriginalClient)
			}
		})
	}
}

func TestConnectPhaseSaturatesInsteadOfOverflowing(t *testing.T) {
	b, err := NewBalancer("", []*Upstream{NewUpstream("127.0.0.1:9")}, 100)
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Balancer: b, Dialer: &Dialer{ConnectTimeout: 100 * 365 * 24 * time.Hour}}
	if got := p.connectPhase(); got != maxConnectPhase {
		t.Fatalf("connectPhase = %v, want the cap %v", got, maxConnectPhase)
	}
	if end := time.Now().Add(p.connectPhase()).UnixNano(); end < time.Now().UnixNano() {
		t.Fatal("the connect deadline lies in the past")
	}
}

// loopHeader is a PROXY v2 header that has been through 2 hops already.
func loopHeader(t *testing.T) string {
	b, err := ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("127.0.0.9:1"),
		Destination: netip.MustParseAddrPort("127.0.0.1:2"), ChainID: "feedc0de", Hops: 2}.AppendTo(nil)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestBehindATrustedHopTheLinksTLSSessionIsNotTheClients: a hop that
// terminated TLS from a previous hop (the link) and read that hop's header
// passes on the header's authority and describes no TLS session: the
// link's server name and its client certificate are not the client's.
func TestBehindATrustedHopTheLinksTLSSessionIsNotTheClients(t *testing.T) {
	infos := make(chan *ProxyInfo, 1)
	acceptor := &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		info, _, err := acceptor.Accept(c, netip.MustParseAddr("127.0.0.1"))
		if err == nil {
			infos <- info
		}
	})
	p := &Proxy{Tracker: NewTracker(), Balancer: balancerFor(t, backend.Addr), EmitVersion: 2,
		Dialer: &Dialer{ConnectTimeout: time.Second}, ForwardTLVs: []byte{0x01, 0x20},
		Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan CloseReason, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		link := &tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_128_GCM_SHA256,
			NegotiatedProtocol: "h2", HandshakeComplete: true, ServerName: "inner.chain.test"}
		done <- p.Serve(c, nil, ClientMeta{Server: ln.Addr().String(), SNI: "inner.chain.test", TLS: link})
	}()
	hdr, err := ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("192.0.2.7:4000"),
		Destination: netip.MustParseAddrPort("192.0.2.1:443"), Authority: "client.example", Hops: 1}.AppendTo(nil)
	if err != nil {
		t.Fatal(err)
	}
	c := chaintest.Dial(t, ln.Addr().String())
	c.Write(hdr)
	info := <-infos
	if info.Authority != "client.example" {
		t.Fatalf("authority %q reached the next hop, want the client's from the header", info.Authority)
	}
	for _, tlv := range info.TLVs {
		if tlv.Type == proxyproto.PP2_TYPE_SSL || tlv.Type == proxyproto.PP2_TYPE_ALPN {
			t.Fatalf("the link's TLS session was described to the next hop as the client's: TLV %#x", tlv.Type)
		}
	}
	c.Close()
	<-done
}

func TestAnUpstreamResetSaysWhyInTheDetail(t *testing.T) {
	closed := closedRecords{make(chan RecordInfo, 1)}
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		c.Read(make([]byte, 1))
		c.SetLinger(0)
		c.Close()
	})
	p := &Proxy{Balancer: balancerFor(t, backend.Addr)}
	p.Tracker = NewTracker()
	p.Tracker.Observer = closed
	h := startHop(t, p, nil)
	c := chaintest.Dial(t, h.Addr)
	io.WriteString(c, "x")
	info := <-closed.infos
	if info.Reason != ReasonUpstreamReset || !strings.Contains(info.Detail, "reset") {
		t.Fatalf("closed with %s (%q), want upstream_reset with the error in the detail", info.Reason, info.Detail)
	}
}

// A connection closed from outside (admin, shutdown) while its trusted
// peer's header is awaited ends with that reason, and no header was
// refused: no rejection counted, no rejection in the detail (a drain used
// to count one per waiting connection).
func TestClosedWhileAwaitingTheHeaderIsNoRejection(t *testing.T) {
	checkEngineLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	closed := closedRecords{make(chan RecordInfo, 2)}
	tr := NewTracker()
	tr.Observer = closed
	h := startHop(t, &Proxy{Tracker: tr, Balancer: balancerFor(t, backend.Addr),
		Accept: &ProxyAcceptor{Allow: loopbackAllow, Timeout: time.Minute}}, nil)
	silent, partial := chaintest.Dial(t, h.Addr), chaintest.Dial(t, h.Addr)
	partial.Write([]byte(v2Sig + "\x21"))
	for tr.Len() != 2 {
		runtime.Gosched()
	}
	for _, r := range tr.Records() {
		r.Close(ReasonAdmin)
	}
	for range 2 {
		if info := closedInfo(t, closed); info.Reason != ReasonAdmin || info.Detail != "" {
			t.Fatalf("closed with %s (%q), want admin and no detail", info.Reason, info.Detail)
		}
	}
	for _, reason := range ProxyRejectReasons {
		if n := tr.ProxyRejections(reason); n != 0 {
			t.Fatalf("%d rejections counted as %s", n, reason)
		}
	}
	silent.Close()
	partial.Close()
}

// TestASlowSteadyReaderIsNeverCutByAnInactivityLimit: a client that reads
// a large answer slowly but without pause is active, in the half-closed
// state (it sent its request and FIN) and the established one alike. The
// writer towards it blocks on a full socket buffer, and the kernel wakes
// it only once a third of that buffer has drained, which here takes longer
// than the limit (the buffer is fixed at 256 KiB, as an operator's sysctl
// or a slower client would make it): bytes the client acknowledged
// meanwhile count as activity, and the answer arrives whole, counted
// exactly.
func TestASlowSteadyReaderIsNeverCutByAnInactivityLimit(t *testing.T) {
	const total = 3 << 19
	for _, halfClose := range []bool{true, false} {
		name := "established"
		if halfClose {
			name = "half-closed"
		}
		t.Run(name, func(t *testing.T) {
			backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
				if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
					return
				}
				c.Write(bytes.Repeat([]byte("d"), total))
			})
			limits := Timeouts{Idle: 100 * time.Millisecond}
			if halfClose {
				// The established state's long limit armed the first
				// write; the half-closed state's short one must apply.
				limits = Timeouts{Idle: time.Hour, HalfClose: 100 * time.Millisecond}
			}
			p := &Proxy{Balancer: balancerFor(t, backend.Addr), Timeouts: limits}
			h := startHopServing(t, p, func(h *hop, c net.Conn) (CloseReason, bool) {
				c.(*net.TCPConn).SetWriteBuffer(256 << 10)
				return p.Serve(c, nil, ClientMeta{Server: h.Addr}), true
			})
			c := dialSmallReceiveBuffer(t, h.Addr)
			defer c.Close()
			io.WriteString(c, "GET\n")
			if halfClose {
				c.(*net.TCPConn).CloseWrite()
			}
			got, buf := 0, make([]byte, 16<<10)
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			for got < total {
				n, err := c.Read(buf)
				got += n
				if err != nil {
					break
				}
				time.Sleep(20 * time.Millisecond) // about 800 KB/s, never a pause near the limit
			}
			if got != total {
				t.Fatalf("client read %d of %d bytes before the hop closed it", got, total)
			}
			c.Close()
			h.reason(t)
			if s := h.Tracker.Stats(); s.BytesDown != total {
				t.Errorf("bytes_down %d, want the %d the client read", s.BytesDown, total)
			}
		})
	}
}

// TestClosedFromOutsideDuringTheDialBlamesNoUpstream: an admin close while
// the upstream is being dialed ends the connection with reason admin, and
// the dial it cancelled is no failure: no detail says connect_failed, no
// dial failure is counted.
func TestClosedFromOutsideDuringTheDialBlamesNoUpstream(t *testing.T) {
	closed := closedRecords{make(chan RecordInfo, 1)}
	p := &Proxy{Balancer: balancerFor(t, chaintest.BlackholeAddr(t)), Dialer: &Dialer{ConnectTimeout: 5 * time.Second}}
	p.Tracker = NewTracker()
	p.Tracker.Observer = closed
	h := startHop(t, p, nil)
	c := chaintest.Dial(t, h.Addr)
	io.WriteString(c, "x")
	var r *Record
	for deadline := time.Now().Add(3 * time.Second); r == nil || r.State() != StateConnecting; {
		if time.Now().After(deadline) {
			t.Fatal("no record dialing")
		}
		if rs := p.Tracker.Records(); len(rs) == 1 {
			r = rs[0]
		}
		runtime.Gosched()
	}
	r.Close(ReasonAdmin)
	info := <-closed.infos
	if info.Reason != ReasonAdmin || info.Detail != "" {
		t.Fatalf("closed with %s (%q), want admin with no detail", info.Reason, info.Detail)
	}
	for _, reason := range DialFailureReasons {
		if n := p.Tracker.DialFailures(reason); n != 0 {
			t.Errorf("%d %s dial failures counted", n, reason)
		}
	}
}

// TestAReaderThatNeverReadsIsCutAtTheLimitWithoutSpinning: a client that
// takes nothing (its window stays shut, though its kernel keeps answering
// probes) leaves the hop's write blocked; the connection ends at the limit
// after the last byte moved, not later, and the blocked write waits for it
// without burning the CPU: when nothing else moves; when a byte the client
// sends moves the expiry to just after one of the write's checks; and when
// the client half-closes, which applies the shorter half-close limit to
// the blocked write at once.
func TestAReaderThatNeverReadsIsCutAtTheLimitWithoutSpinning(t *testing.T) {
	answer := bytes.Repeat([]byte("d"), 8<<20) // far more than the buffers hold
	for _, tc := range []struct {
		name     string
		limits   Timeouts
		client   func(c net.Conn) // what the client does while it never reads
		reason   CloseReason
		min, max time.Duration // when the connection must end, from the dial
	}{
		{"silent", Timeouts{Idle: time.Second}, func(net.Conn) {}, ReasonIdleTimeout, time.Second, 1250 * time.Millisecond},
		// The write checks every half second (a quarter of the limit);
		// the byte at 0.7 s makes the expiry 2.7 s, a fifth of a second
		// after the check at 2.5 s.
		{"a byte moves the expiry", Timeouts{Idle: 2 * time.Second}, func(c net.Conn) {
			time.Sleep(700 * time.Millisecond)
			c.Write([]byte{'x'})
		}, ReasonIdleTimeout, 2700 * time.Millisecond, 3 * time.Second},
		{"half-closed while blocked", Timeouts{Idle: time.Hour, HalfClose: 300 * time.Millisecond}, func(c net.Conn) {
			time.Sleep(200 * time.Millisecond) // the buffers are full by then
			c.(*net.TCPConn).CloseWrite()
		}, ReasonHalfCloseTimeout, 500 * time.Millisecond, 900 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
				c.Write(answer)
				io.Copy(io.Discard, c) // until the hop closes
			})
			p := &Proxy{Balancer: balancerFor(t, backend.Addr), Timeouts: tc.limits}
			h := startHopServing(t, p, func(h *hop, c net.Conn) (CloseReason, bool) {
				c.(*net.TCPConn).SetWriteBuffer(64 << 10) // full within milliseconds
				return p.Serve(c, nil, ClientMeta{Server: h.Addr}), true
			})
			var before syscall.Rusage
			syscall.Getrusage(syscall.RUSAGE_SELF, &before)
			start := time.Now()
			c := dialSmallReceiveBuffer(t, h.Addr)
			defer c.Close()
			tc.client(c)
			if r := h.reason(t); r != tc.reason {
				t.Fatalf("closed with %s, want %s", r, tc.reason)
			}
			elapsed := time.Since(start)
			var after syscall.Rusage
			syscall.Getrusage(syscall.RUSAGE_SELF, &after)
			cpu := time.Duration(after.Utime.Nano() + after.Stime.Nano() - before.Utime.Nano() - before.Stime.Nano())
			if elapsed < tc.min || elapsed > tc.max {
				t.Errorf("cut after %v, want between %v and %v", elapsed, tc.min, tc.max)
			}
			if cpu > 100*time.Millisecond {
				t.Errorf("the blocked write used %v of CPU while it waited %v", cpu, elapsed)
			}
		})
	}
}

// dialSmallReceiveBuffer connects to addr with a 16 KiB receive buffer, set
// before the handshake so the window never grows past it: a slow reader's
// backpressure reaches the hop at once.
func dialSmallReceiveBuffer(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10)
		})
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
