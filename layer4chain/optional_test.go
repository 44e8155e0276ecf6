package layer4chain

import (
	"errors"
	"io"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// optionalHop trusts the test's clients (127.0.0.1) under the optional
// policy: they may send a PROXY header or none.
func optionalHop(t *testing.T, upstream string, timeout time.Duration) (*hop, closedRecords) {
	closed := closedRecords{make(chan RecordInfo, 16)}
	tr := NewTracker()
	tr.Observer = closed
	h := startHop(t, &Proxy{Tracker: tr, Balancer: balancerFor(t, upstream),
		Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}, Timeout: timeout, Optional: true}}, nil)
	return h, closed
}

// A load balancer in front of the hop sends a header; a health checker on
// the same machine connects to the same port without one. Under optional
// both are served, and only the header names another client.
func TestOptionalPolicyServesTrustedPeersWithAndWithoutAHeader(t *testing.T) {
	checkEngineLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	h, closed := optionalHop(t, backend.Addr, 5*time.Second)

	withHeader := chaintest.Dial(t, h.Addr)
	hdr := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:80"), ChainID: "lb-chain"})
	if _, err := withHeader.Write(append(hdr, "ping\n"...)); err != nil {
		t.Fatal(err)
	}
	echo(t, withHeader, "ping\n")
	withHeader.Close()
	if info := closedInfo(t, closed); info.OriginalClient != "198.51.100.7:4000" || info.ChainID != "lb-chain" {
		t.Fatalf("with a header: original client %s, chain ID %q; want the header's", info.OriginalClient, info.ChainID)
	}

	without := chaintest.Dial(t, h.Addr)
	if _, err := io.WriteString(without, "GET / HTTP/1.0\r\n"); err != nil {
		t.Fatal(err)
	}
	echo(t, without, "GET / HTTP/1.0\r\n")
	without.Close()
	info := closedInfo(t, closed)
	if info.OriginalClient != without.LocalAddr().String() || info.Reason != ReasonClientClosed {
		t.Fatalf("without a header: original client %s (want the socket's %s), reason %s", info.OriginalClient, without.LocalAddr(), info.Reason)
	}
	for _, reason := range ProxyRejectReasons {
		if n := h.Tracker.ProxyRejections(reason); n != 0 {
			t.Fatalf("%d rejections (%s) under optional", n, reason)
		}
	}
}

// A trusted peer whose first bytes start like a signature is held until
// they decide: "PRO" then "XY..." is a header that is used; "PRO" then
// "BE" is a client whose every byte reaches the upstream, in order.
func TestOptionalPolicyHoldsAPartialSignatureUntilDecided(t *testing.T) {
	checkEngineLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	h, closed := optionalHop(t, backend.Addr, 5*time.Second)

	header := chaintest.Dial(t, h.Addr)
	line := "PROXY TCP4 198.51.100.8 127.0.0.1 4001 80\r\n"
	if _, err := io.WriteString(header, line[:3]); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(header, line[3:]+"hi\n"); err != nil {
		t.Fatal(err)
	}
	echo(t, header, "hi\n")
	header.Close()
	if info := closedInfo(t, closed); info.OriginalClient != "198.51.100.8:4001" {
		t.Fatalf("split v1 header: original client %s, want 198.51.100.8:4001", info.OriginalClient)
	}

	probe := chaintest.Dial(t, h.Addr)
	if _, err := io.WriteString(probe, "PRO"); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(probe, "BE\n"); err != nil {
		t.Fatal(err)
	}
	echo(t, probe, "PROBE\n")
	probe.Close()
	if info := closedInfo(t, closed); info.OriginalClient != probe.LocalAddr().String() {
		t.Fatalf("PROBE: original client %s, want the socket's %s", info.OriginalClient, probe.LocalAddr())
	}
}

// A trusted peer that says nothing, such as a client waiting for an SMTP
// greeting, is dialed once the timeout has passed without a byte: that
// wait is what optional costs a server-speaks-first protocol.
func TestOptionalPolicyDialsASilentTrustedPeerAfterTheTimeout(t *testing.T) {
	checkEngineLeaks(t)
	backend, got := greetingBackend(t)
	const timeout = 300 * time.Millisecond
	h, _ := optionalHop(t, backend.Addr, timeout)
	// Before the dial: the hop's wait may start as soon as the kernel
	// completes the handshake, before Dial returns here.
	start := time.Now()
	c := chaintest.Dial(t, h.Addr)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len(greeting))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != greeting {
		t.Fatalf("greeting %q, %v", buf, err)
	}
	if waited := time.Since(start); waited < timeout {
		t.Fatalf("greeted after %v, before the %v timeout: the hop did not wait for a header", waited, timeout)
	}
	io.WriteString(c, "QUIT\r\n")
	c.CloseWrite()
	if b := received(t, got); string(b) != "QUIT\r\n" {
		t.Fatalf("backend got %q", b)
	}
	if r := h.reason(t); r != ReasonClientClosed {
		t.Fatalf("reason %s", r)
	}
	if n := h.Tracker.ProxyRejections(ProxyRejectTimeout); n != 0 {
		t.Fatalf("%d timeout rejections for a silent peer under optional", n)
	}
}

// The acceptor's own outcomes under optional, for a trusted peer.
func TestAcceptOptionalOutcomes(t *testing.T) {
	hdr := mustAppend(t, ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("198.51.100.7:1"),
		Destination: netip.MustParseAddrPort("203.0.113.9:2")})
	a := &ProxyAcceptor{Allow: loopbackAllow, Optional: true}
	for _, tc := range []struct {
		name     string
		data     string
		end      error
		header   bool
		rest     string
		err      error
		rejected ProxyRejectReason
	}{
		{name: "header", data: string(hdr) + "x", header: true, rest: "x"},
		{name: "direct client", data: "GET /", rest: "GET"}, // decided on the first 3-byte read
		{name: "half-close before a byte", err: io.EOF},
		{name: "prefix then EOF", data: "PROX", rest: "PROX", err: io.EOF},
		{name: "header cut by EOF", data: string(hdr[:10]), rejected: ProxyRejectMalformed},
		{name: "malformed header", data: "PROXY NONSENSE\r\n", rejected: ProxyRejectMalformed},
		{name: "silent until the deadline", end: os.ErrDeadlineExceeded},
		{name: "prefix until the deadline", data: "\r\n\r\n", end: os.ErrDeadlineExceeded, rejected: ProxyRejectTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := &memConn{data: []byte(tc.data), chunk: 3, end: tc.end}
			info, rest, err := a.Accept(conn, trustedPeer)
			if tc.rejected != "" {
				if reasonOf(err) != tc.rejected {
					t.Fatalf("err %v, want a %s rejection", err, tc.rejected)
				}
				return
			}
			if (info != nil) != tc.header || string(rest) != tc.rest || !errors.Is(err, tc.err) || (tc.err == nil && err != nil) {
				t.Fatalf("info %+v, rest %q, err %v; want header %v, rest %q, err %v", info, rest, err, tc.header, tc.rest, tc.err)
			}
			if !conn.deadlineCleared() {
				t.Fatal("deadline left set")
			}
		})
	}
}

// echo reads len(want) bytes from c and checks they are want.
func echo(t *testing.T, c interface {
	io.Reader
	SetReadDeadline(time.Time) error
}, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != want {
		t.Fatalf("echo %q, %v; want %q", buf, err, want)
	}
	c.SetReadDeadline(time.Time{})
}

// A trusted client under optional whose only words are "PRO" before its
// half-close is a direct client: the server gets "PRO" then the EOF, and
// its answer comes back.
func TestOptionalPolicyForwardsAPrefixThatEndsInEOF(t *testing.T) {
	checkEngineLeaks(t)
	backend, got := greetingBackend(t)
	h, closed := optionalHop(t, backend.Addr, 5*time.Second)
	c := chaintest.Dial(t, h.Addr)
	if _, err := io.WriteString(c, "PRO"); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if b := received(t, got); string(b) != "PRO" {
		t.Fatalf("backend got %q, want PRO then EOF", b)
	}
	if all, _, err := chaintest.ReadUntilClosed(c, 5*time.Second); err != nil || string(all) != greeting+farewell {
		t.Fatalf("client read %q, %v; want the greeting and the farewell", all, err)
	}
	if info := closedInfo(t, closed); info.Reason != ReasonClientClosed {
		t.Fatalf("reason %s, want client_closed", info.Reason)
	}
}

// Under optional, a header that a trusted peer cut short with EOF is
// refused as under require: counted, and no upstream dialed for it.
func TestOptionalPolicyRefusesAHeaderCutShort(t *testing.T) {
	checkEngineLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	h, _ := optionalHop(t, backend.Addr, 5*time.Second)
	hdr := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:80")})
	c := chaintest.Dial(t, h.Addr)
	c.Write(hdr[:20])
	c.CloseWrite()
	if r := h.reason(t); r != ReasonProxyProtocolRejected {
		t.Fatalf("a header cut short under optional ended with %s", r)
	}
	if n := h.Tracker.ProxyRejections(ProxyRejectMalformed); n != 1 {
		t.Fatalf("%d malformed rejections, want 1", n)
	}
	if n := backend.AcceptedCount(); n != 0 {
		t.Fatalf("the upstream was dialed %d times for a refused header", n)
	}
	c.Close()
}
