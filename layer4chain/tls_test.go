package layer4chain

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// tlsBackend is a TLS server on loopback that hands each handshaken
// connection to handle, and closes it after.
func tlsBackend(t testing.TB, cfg *tls.Config, handle func(*tls.Conn)) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				tc := c.(*tls.Conn)
				if tc.Handshake() == nil {
					handle(tc)
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

// startTLSHop serves p behind TLS termination, the way caddy-l4's tls
// handler runs before chain: the handshake first, then Serve with the
// session and the socket under it.
func startTLSHop(t testing.TB, p *Proxy, cfg *tls.Config) *hop {
	t.Helper()
	return startHopServing(t, p, func(h *hop, c net.Conn) (CloseReason, bool) {
		tc := tls.Server(c, cfg)
		if err := tc.Handshake(); err != nil {
			return ReasonNone, false
		}
		state := tc.ConnectionState()
		return p.Serve(tc, nil, ClientMeta{Server: h.Addr, TLS: &state, Socket: c.(*net.TCPConn)}), true
	})
}

// tapRelay forwards TCP connections to target and records every byte sent
// toward it: what anyone on the path between two hops can read.
func tapRelay(t testing.TB, target string) (addr string, seen func() []byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var buf bytes.Buffer
	var wg sync.WaitGroup
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			wg.Add(2)
			go func() {
				defer wg.Done()
				b := make([]byte, 4096)
				for {
					n, err := c.Read(b)
					mu.Lock()
					buf.Write(b[:n])
					mu.Unlock()
					if _, werr := u.Write(b[:n]); err != nil || werr != nil {
						u.(*net.TCPConn).CloseWrite()
						return
					}
				}
			}()
			go func() {
				defer wg.Done()
				// Hidden from io.Copy's splice, whose pipes outlive the test.
				io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{u})
				c.Close()
				u.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String(), func() []byte {
		mu.Lock()
		defer mu.Unlock()
		return bytes.Clone(buf.Bytes())
	}
}

// The outer hop dials the inner one over TLS with a client certificate:
// the PROXY header and the client's bytes travel inside the session, so a
// tap on the path sees neither; half-close crosses as close_notify both
// ways, and the byte counts are the client's bytes, not TLS records.
func TestTLSUpstreamCarriesHeaderAndBytesInsideTheSession(t *testing.T) {
	checkEngineLeaks(t)
	ca := chaintest.NewCA(t, "test CA")
	type seen struct {
		info    *ProxyInfo
		peerCN  string
		payload string
	}
	got := make(chan seen, 1)
	backend := tlsBackend(t, &tls.Config{
		Certificates: []tls.Certificate{ca.Issue(t, "inner", "inner.test")},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.Pool,
	}, func(c *tls.Conn) {
		acc := &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
		info, rest, err := acc.Accept(c, netip.MustParseAddr("127.0.0.1"))
		if err != nil {
			t.Errorf("backend: %v", err)
			return
		}
		more, err := io.ReadAll(c) // ends at the hop's close_notify
		if err != nil {
			t.Errorf("backend reading to EOF: %v", err)
		}
		payload := string(rest) + string(more)
		c.Write([]byte("reply after your EOF: " + payload))
		c.CloseWrite()
		got <- seen{info, c.ConnectionState().PeerCertificates[0].Subject.CommonName, payload}
	})
	tap, tapped := tapRelay(t, backend)
	closed := closedRecords{make(chan RecordInfo, 1)}
	tr := NewTracker()
	tr.Observer = closed
	clientCert := ca.Issue(t, "outer-hop")
	h := startHop(t, &Proxy{Tracker: tr, EmitVersion: 2, Balancer: balancerFor(t, tap),
		Dialer: &Dialer{ConnectTimeout: 2 * time.Second, TLS: func(*Upstream) *tls.Config {
			return &tls.Config{RootCAs: ca.Pool, ServerName: "inner.test", Certificates: []tls.Certificate{clientCert}}
		}}}, nil)

	c := chaintest.Dial(t, h.Addr)
	const secret = "the client's secret bytes"
	if _, err := c.Write([]byte(secret)); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	reply, _, err := chaintest.ReadUntilClosed(c, 5*time.Second)
	if err != nil {
		t.Fatalf("client: %v after %q", err, reply)
	}
	if want := "reply after your EOF: " + secret; string(reply) != want {
		t.Fatalf("client read %q, want %q", reply, want)
	}
	s := <-got
	if s.info == nil || s.info.Source != c.LocalAddr().(*net.TCPAddr).AddrPort() || s.info.Hops != 1 || len(s.info.ChainID) != 32 {
		t.Fatalf("backend got header %+v, want source %v, one hop and a chain ID", s.info, c.LocalAddr())
	}
	if s.peerCN != "outer-hop" || s.payload != secret {
		t.Fatalf("backend saw peer %q and payload %q", s.peerCN, s.payload)
	}
	wire := tapped()
	if bytes.Contains(wire, []byte(v2Sig)) || bytes.Contains(wire, []byte(secret)) || len(wire) == 0 {
		t.Fatalf("the path saw the PROXY header or the client's bytes in clear (%d bytes tapped)", len(wire))
	}
	info := closedInfo(t, closed)
	if info.Reason != ReasonClientClosed || info.BytesUp != int64(len(secret)) || info.BytesDown != int64(len(reply)) {
		t.Fatalf("closed with %s, %d bytes up, %d down; want client_closed, %d and %d", info.Reason, info.BytesUp, info.BytesDown, len(secret), len(reply))
	}
}

// An upstream whose certificate the hop cannot verify is a failed attempt
// like a refused connect: the next upstream gets the connection, and the
// failure says why.
func TestTLSUpstreamWithUnknownCAFailsOverToTheNext(t *testing.T) {
	ca := chaintest.NewCA(t, "trusted CA")
	other := chaintest.NewCA(t, "someone else's CA")
	echo := func(c *tls.Conn) { io.Copy(c, c) }
	bad := tlsBackend(t, &tls.Config{Certificates: []tls.Certificate{other.Issue(t, "impostor", "inner.test")}}, echo)
	good := tlsBackend(t, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "inner", "inner.test")}}, echo)
	var failures []*DialError
	d := &Dialer{ConnectTimeout: 2 * time.Second,
		OnFailure: func(e *DialError) { failures = append(failures, e) },
		TLS: func(*Upstream) *tls.Config {
			return &tls.Config{RootCAs: ca.Pool, ServerName: "inner.test"}
		}}
	c, used, err := d.Dial(context.Background(), []*Upstream{NewUpstream(bad), NewUpstream(good)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if used.Addr != good {
		t.Fatalf("connected to %s, want %s", used.Addr, good)
	}
	if _, ok := c.(*tls.Conn); !ok {
		t.Fatalf("dial returned %T, want *tls.Conn", c)
	}
	if len(failures) != 1 || failures[0].Reason != ReasonConnectFailed ||
		!strings.Contains(failures[0].Error(), "TLS handshake") || !strings.Contains(failures[0].Error(), "certificate") {
		t.Fatalf("failures %v, want one connect_failed naming the TLS handshake and the certificate", failures)
	}
}

// An upstream that accepts the TCP connection and never answers the
// handshake costs the client no more than connect_timeout.
func TestSilentTLSUpstreamTimesOutWithinConnectTimeout(t *testing.T) {
	silent := chaintest.NewBackend(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	const timeout = 300 * time.Millisecond
	d := &Dialer{ConnectTimeout: timeout, TLS: func(*Upstream) *tls.Config {
		return &tls.Config{InsecureSkipVerify: true}
	}}
	start := time.Now()
	_, _, err := d.Dial(context.Background(), []*Upstream{NewUpstream(silent.Addr)})
	took := time.Since(start)
	var de *DialError
	if !errors.As(err, &de) || de.Reason != ReasonConnectTimeout {
		t.Fatalf("got %v, want a connect_timeout DialError", err)
	}
	if took < timeout*9/10 || took > timeout+time.Second {
		t.Fatalf("took %v, want about %v", took, timeout)
	}
}

// Idle connections whose both sides are TLS (terminated before the hop,
// and dialed over TLS by it) hold no copy buffer: each direction waits in
// a one-byte read. The same connections read into a pooled buffer would
// hold two buffers each; the test measures both, so it could tell.
func TestIdleTLSConnectionsHoldNoCopyBuffer(t *testing.T) {
	if !tlsReadsBufferless {
		t.Fatal("this Go's crypto/tls.Conn has no input field laid out as expected: idle TLS connections would hold a copy buffer each")
	}
	checkEngineLeaks(t)
	const n = 100
	ca := chaintest.NewCA(t, "test CA")
	backend := tlsBackend(t, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "inner", "inner.test")}},
		func(c *tls.Conn) { io.Copy(c, c) })
	h := startTLSHop(t, &Proxy{Balancer: balancerFor(t, backend),
		Dialer: &Dialer{ConnectTimeout: 2 * time.Second, TLS: func(*Upstream) *tls.Config {
			return &tls.Config{RootCAs: ca.Pool, ServerName: "inner.test"}
		}}}, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "outer", "outer.test")}})
	perConn := func() int64 {
		before := heapInUse()
		var conns []*tls.Conn
		for range n {
			c, err := tls.Dial("tcp", h.Addr, &tls.Config{RootCAs: ca.Pool, ServerName: "outer.test"})
			if err != nil {
				t.Fatal(err)
			}
			// A round trip: both handshakes and the session tickets are
			// behind us, so what is left is the idle cost.
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
		}
		cost := (heapInUse() - before) / n
		for _, c := range conns {
			c.Close()
		}
		for h.Tracker.Len() > 0 {
			<-h.reasons
		}
		return cost
	}
	bufferless := perConn()
	tlsReadsBufferless = false
	buffered := perConn()
	tlsReadsBufferless = true
	// Both include crypto/tls's own state of four TLS connections (client,
	// the hop's two, backend); the difference is what the hop's copy
	// buffers cost: two per connection when they wait in Read, none when
	// idle reads wait in one byte.
	t.Logf("heap per idle TLS connection (client, hop both sides, backend): %d bytes; %d reading into pooled buffers", bufferless, buffered)
	if saved := buffered - bufferless; saved < 2*bufSize*15/16 {
		t.Fatalf("bufferless reads save %d bytes per idle connection, want two %d-byte copy buffers: a direction still holds one while idle", saved, bufSize)
	}
}

func heapInUse() int64 {
	runtime.GC()
	runtime.GC() // the second empties sync.Pool's victim cache
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse)
}

// A previous hop whose client certificate is verified and named in
// AllowCertificates is trusted whatever its address; a peer of the same CA
// with another name is not, and its forged header is refused.
func TestPeerTrustedByCertificateNameWhateverItsAddress(t *testing.T) {
	checkEngineLeaks(t)
	ca := chaintest.NewCA(t, "chain CA")
	sources := make(chan netip.AddrPort, 2)
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		acc := &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
		info, rest, err := acc.Accept(c, netip.MustParseAddr("127.0.0.1"))
		if err == nil && info != nil {
			sources <- info.Source
		}
		c.Write(rest)
		chaintest.Echo(c)
	})
	closed := closedRecords{make(chan RecordInfo, 2)}
	tr := NewTracker()
	tr.Observer = closed
	h := startTLSHop(t, &Proxy{Tracker: tr, EmitVersion: 2, Balancer: balancerFor(t, backend.Addr),
		Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, AllowCertificates: []string{"Outer-Hop"}}},
		&tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "inner", "inner.test")},
			ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool})
	forged := netip.MustParseAddrPort("203.0.113.7:4242")
	hdr, err := (&ProxyHeader{Version: 2, Source: forged, Destination: netip.MustParseAddrPort("198.51.100.1:443")}).AppendTo(nil)
	if err != nil {
		t.Fatal(err)
	}
	send := func(cn string) *tls.Conn {
		c, err := tls.Dial("tcp", h.Addr, &tls.Config{RootCAs: ca.Pool, ServerName: "inner.test",
			Certificates: []tls.Certificate{ca.Issue(t, cn)}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Write(append(hdr, "ping"...)); err != nil {
			t.Fatal(err)
		}
		return c
	}

	trusted := send("outer-hop")
	if b := make([]byte, 4); func() error { _, err := io.ReadFull(trusted, b); return err }() != nil || string(b) != "ping" {
		t.Fatal("the trusted hop's bytes did not come back")
	}
	if got := <-sources; got != forged {
		t.Fatalf("backend saw client %v, want the trusted hop's %v", got, forged)
	}

	stranger := send("stranger")
	rest, _, _ := chaintest.ReadUntilClosed(stranger, 5*time.Second)
	if len(rest) != 0 {
		t.Fatalf("the stranger read %q", rest)
	}
	info := closedInfo(t, closed)
	if info.Reason != ReasonProxyProtocolRejected || !strings.Contains(info.Detail, "untrusted") {
		t.Fatalf("stranger closed with %s (%q), want proxy_protocol_rejected, untrusted", info.Reason, info.Detail)
	}
	select {
	case got := <-sources:
		if got == forged {
			t.Fatal("the stranger's forged client reached the backend")
		}
	default:
	}
}

// A reset passes through a TLS leg as a reset: the hop resets the socket
// under the session instead of closing the session (close_notify), which
// the peer would read as a clean end of a stream that was cut.
func TestAResetCrossesATLSLegAsAReset(t *testing.T) {
	ca := chaintest.NewCA(t, "test CA")
	isReset := func(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

	t.Run("upstream resets, the TLS client sees it", func(t *testing.T) {
		resetter := chaintest.NewBackend(t, func(c *net.TCPConn) {
			io.ReadFull(c, make([]byte, 4))
			c.SetLinger(0)
			c.Close()
		})
		h, c := tlsHopAndClient(t, ca, &Proxy{Balancer: balancerFor(t, resetter.Addr)})
		c.Write([]byte("ping"))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !isReset(err) {
			t.Fatalf("the TLS client read %v after its upstream reset, want a reset", err)
		}
		if r := h.reason(t); r != ReasonUpstreamReset {
			t.Fatalf("reason %s", r)
		}
	})

	t.Run("client resets, the TLS upstream sees it", func(t *testing.T) {
		got, flowing := make(chan error, 1), make(chan struct{})
		backend := tlsBackend(t, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "up", "up.test")}}, func(c *tls.Conn) {
			io.ReadFull(c, make([]byte, 4))
			close(flowing) // the client's bytes came through the pipe
			_, err := c.Read(make([]byte, 1))
			got <- err
		})
		p := &Proxy{Balancer: balancerFor(t, backend), Dialer: &Dialer{ConnectTimeout: 2 * time.Second,
			TLS: func(*Upstream) *tls.Config { return &tls.Config{RootCAs: ca.Pool, ServerName: "up.test"} }}}
		h := startHop(t, p, nil)
		c := chaintest.Dial(t, h.Addr)
		c.Write([]byte("ping"))
		select {
		case <-flowing:
		case <-time.After(5 * time.Second):
			t.Fatal("the client's bytes never reached the TLS upstream")
		}
		c.SetLinger(0)
		c.Close()
		select {
		case err := <-got:
			if !isReset(err) {
				t.Fatalf("the TLS upstream read %v after the client reset, want a reset", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the TLS upstream saw nothing of the client's reset")
		}
		if r := h.reason(t); r != ReasonClientReset {
			t.Fatalf("reason %s", r)
		}
	})
}

// An active probe of an upstream dialed over TLS completes the handshake
// and sends its LOCAL header inside the session, where the next hop reads
// headers: in clear, it would reach a TLS port as a broken handshake.
func TestActiveProbeOfATLSUpstreamSpeaksTLS(t *testing.T) {
	checkEngineLeaks(t)
	ca := chaintest.NewCA(t, "test CA")
	headers := make(chan *ProxyInfo, 4)
	backend := tlsBackend(t, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "inner", "inner.test")}}, func(c *tls.Conn) {
		acc := &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
		info, _, err := acc.Accept(c, netip.MustParseAddr("127.0.0.1"))
		if err != nil {
			t.Errorf("the probe's header: %v", err)
		}
		headers <- info
	})
	u := NewUpstream(backend)
	stop := StartHealthChecks([]*Upstream{u}, ActiveHealth{Interval: time.Hour, Timeout: 2 * time.Second, SendProxyHeader: true,
		TLS: func(*Upstream) *tls.Config { return &tls.Config{RootCAs: ca.Pool, ServerName: "inner.test"} }})
	select {
	case info := <-headers:
		if info == nil || !info.Local {
			t.Fatalf("the probe's header inside the session: %+v, want LOCAL", info)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no probe completed a TLS handshake")
	}
	stop() // waits for the probe's verdict
	if h := u.Health(); h != HealthHealthy {
		t.Fatalf("health %s after a passing TLS probe", h)
	}
}

// A reset reads the same in the close detail whether it came through a raw
// read or through a TLS session's.
func TestAResetThroughTLSHasThePlainDetail(t *testing.T) {
	ca := chaintest.NewCA(t, "test CA")
	closed := closedRecords{make(chan RecordInfo, 1)}
	tr := NewTracker()
	tr.Observer = closed
	_, c := tlsHopAndClient(t, ca, &Proxy{Tracker: tr, Balancer: balancerFor(t, chaintest.NewEchoBackend(t).Addr)})
	c.Write([]byte("ping"))
	echo(t, c, "ping")
	c.NetConn().(*net.TCPConn).SetLinger(0)
	c.NetConn().Close()
	if info := closedInfo(t, closed); info.Reason != ReasonClientReset || info.Detail != "connection reset by peer" {
		t.Fatalf("closed with %s %q, want client_reset \"connection reset by peer\"", info.Reason, info.Detail)
	}
}

// tlsHopAndClient serves p behind TLS termination with a certificate for
// hop.test from ca, and returns the hop and a TLS client connected to it
// (closed when the test ends).
func tlsHopAndClient(t *testing.T, ca *chaintest.CA, p *Proxy) (*hop, *tls.Conn) {
	t.Helper()
	h := startTLSHop(t, p, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "hop", "hop.test")}})
	c, err := tls.Dial("tcp", h.Addr, &tls.Config{RootCAs: ca.Pool, ServerName: "hop.test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return h, c
}
