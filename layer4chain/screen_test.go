package layer4chain

import (
	"bufio"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// checkEngineLeaks asserts, when the test ends, that its goroutines and file
// descriptors are gone. Call it first in a test, so that its check runs
// after every later cleanup (hops, backends, clients).
func checkEngineLeaks(t *testing.T) {
	t.Helper()
	// The runtime's poller keeps descriptors of its own once started.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	getParker() // the parker too: its epoll instance and goroutine live as long as the process
	goroutines := goleak.IgnoreCurrent()
	fds := countFDs(t)
	t.Cleanup(func() {
		goleak.VerifyNone(t, goroutines)
		if now := countFDs(t); now > fds {
			t.Errorf("open file descriptors: %d after the test, %d before", now, fds)
		}
	})
}

func countFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("counting file descriptors: %v", err)
	}
	return len(entries)
}

const (
	greeting = "220 mail.example ESMTP\r\n"
	farewell = "221 bye\r\n"
)

// greetingBackend is a server that speaks first, as SMTP, MySQL and SSH
// servers do: it greets, reads until the client's EOF, reports what it
// received and says goodbye.
func greetingBackend(t *testing.T) (*chaintest.Backend, <-chan []byte) {
	received := make(chan []byte, 16)
	b := chaintest.NewBackend(t, func(c *net.TCPConn) {
		io.WriteString(c, greeting)
		got, _ := io.ReadAll(c)
		select {
		case received <- got:
		default: // a test with many connections does not read them all
		}
		io.WriteString(c, farewell)
	})
	return b, received
}

// untrustingHop is a hop that accepts PROXY headers from 127.0.0.2 alone,
// so that the test's clients (from 127.0.0.1) are direct clients.
func untrustingHop(t *testing.T, upstream string, timeout time.Duration, pending []byte) (*hop, closedRecords) {
	closed := closedRecords{make(chan RecordInfo, 16)}
	tr := NewTracker()
	tr.Observer = closed
	h := startHop(t, &Proxy{Tracker: tr, Balancer: balancerFor(t, upstream),
		Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}, Timeout: timeout}}, pending)
	return h, closed
}

func readGreeting(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, len(greeting))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("no greeting within 1s (the header timeout is 5s): %v", err)
	}
	if string(buf) != greeting {
		t.Fatalf("greeting %q", buf)
	}
	c.SetReadDeadline(time.Time{})
}

func received(t *testing.T, ch <-chan []byte) []byte {
	t.Helper()
	select {
	case b := <-ch:
		return b
	case <-time.After(5 * time.Second):
		t.Fatal("the backend never finished reading")
		return nil
	}
}

func closedInfo(t *testing.T, c closedRecords) RecordInfo {
	t.Helper()
	select {
	case info := <-c.infos:
		return info
	case <-time.After(5 * time.Second):
		t.Fatal("no record closed")
		return RecordInfo{}
	}
}

// An SMTP client waits for the server's greeting before it says anything.
// Its hop does not wait for a PROXY header it would never honour.
func TestUntrustedSilentClientHearsTheServerFirst(t *testing.T) {
	checkEngineLeaks(t)
	backend, got := greetingBackend(t)
	h, _ := untrustingHop(t, backend.Addr, 5*time.Second, nil)
	c := chaintest.Dial(t, h.Addr)
	readGreeting(t, c)
	io.WriteString(c, "QUIT\r\n")
	c.CloseWrite()
	if b := received(t, got); string(b) != "QUIT\r\n" {
		t.Fatalf("backend got %q", b)
	}
	if rest, _, err := chaintest.ReadUntilClosed(c, 3*time.Second); err != nil || string(rest) != farewell {
		t.Fatalf("client read %q, %v after its half-close; want the farewell then EOF", rest, err)
	}
	if r := h.reason(t); r != ReasonClientClosed {
		t.Fatalf("reason %s", r)
	}
}

// A client outside the allow list that sends a PROXY header once the server
// has greeted it is still refused, and none of the header reaches the
// backend, which would otherwise take it for the client's own words.
func TestUntrustedHeaderAfterTheGreetingIsRejected(t *testing.T) {
	v1 := "PROXY TCP4 198.51.100.7 127.0.0.1 4000 25\r\n"
	v2 := string(mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:25"), ChainID: "spoofed", Hops: 1}))
	for _, tc := range []struct {
		name   string
		writes []string
	}{
		{"v1", []string{v1 + "MAIL FROM:<x>\r\n"}},
		{"v2", []string{v2 + "MAIL FROM:<x>\r\n"}},
		{"v1 in pieces", []string{"PR", "OX", "Y TCP4 198.51.100.7 127.0.0.1 4000 25\r\n"}},
		{"v2 in pieces", []string{v2[:5], v2[5:11], v2[11:]}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkEngineLeaks(t)
			backend, got := greetingBackend(t)
			h, closed := untrustingHop(t, backend.Addr, 5*time.Second, nil)
			c := chaintest.Dial(t, h.Addr)
			readGreeting(t, c)
			for _, w := range tc.writes {
				if _, err := io.WriteString(c, w); err != nil {
					t.Fatal(err)
				}
			}
			rest, elapsed, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
			if len(rest) != 0 || elapsed > 2*time.Second {
				t.Fatalf("client read %q and was closed after %v, want nothing and a prompt close", rest, elapsed)
			}
			if b := received(t, got); len(b) != 0 {
				t.Fatalf("backend received %q of an untrusted header", b)
			}
			info := closedInfo(t, closed)
			if info.Reason != ReasonProxyProtocolRejected || !strings.Contains(info.Detail, "untrusted") {
				t.Fatalf("closed with %s (%q), want proxy_protocol_rejected, untrusted", info.Reason, info.Detail)
			}
			if n := h.Tracker.ProxyRejections(ProxyRejectUntrusted); n != 1 {
				t.Fatalf("untrusted rejections: %d", n)
			}
			if info.BytesUp != 0 {
				t.Fatalf("record counts %d bytes up", info.BytesUp)
			}
		})
	}
}

// A direct client whose whole message is "PRO" (it could have become a
// PROXY signature) and then EOF: the bytes are the client's, so they reach
// the backend, followed by the EOF, and the backend's answer comes back.
func TestUntrustedPartialSignatureThenEOFReachesTheBackend(t *testing.T) {
	checkEngineLeaks(t)
	backend, got := greetingBackend(t)
	h, _ := untrustingHop(t, backend.Addr, 5*time.Second, nil)
	c := chaintest.Dial(t, h.Addr)
	io.WriteString(c, "PRO")
	c.CloseWrite()
	if b := received(t, got); string(b) != "PRO" {
		t.Fatalf("backend got %q, want PRO then EOF", b)
	}
	all, elapsed, err := chaintest.ReadUntilClosed(c, 5*time.Second)
	if err != nil || string(all) != greeting+farewell || elapsed > 2*time.Second {
		t.Fatalf("client read %q, %v in %v; want the greeting and the farewell", all, err, elapsed)
	}
	if r := h.reason(t); r != ReasonClientClosed {
		t.Fatalf("reason %s", r)
	}
}

// Bytes that only start like a signature are held until they are decided;
// a start that never completes is refused after the header timeout, as it
// was before the hop dialed at once.
func TestUntrustedPartialSignatureTimesOut(t *testing.T) {
	checkEngineLeaks(t)
	const timeout = 300 * time.Millisecond
	backend, got := greetingBackend(t)
	h, closed := untrustingHop(t, backend.Addr, timeout, nil)
	c := chaintest.Dial(t, h.Addr)
	readGreeting(t, c)
	start := time.Now()
	io.WriteString(c, "PROX")
	rest, _, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
	if elapsed := time.Since(start); len(rest) != 0 || elapsed < timeout*9/10 || elapsed > timeout+time.Second {
		t.Fatalf("client read %q and was closed after %v, want nothing after about %v", rest, elapsed, timeout)
	}
	if b := received(t, got); len(b) != 0 {
		t.Fatalf("backend received %q", b)
	}
	info := closedInfo(t, closed)
	if info.Reason != ReasonProxyProtocolRejected || !strings.Contains(info.Detail, "timeout") {
		t.Fatalf("closed with %s (%q), want proxy_protocol_rejected, timeout", info.Reason, info.Detail)
	}
	if n := h.Tracker.ProxyRejections(ProxyRejectTimeout); n != 1 {
		t.Fatalf("timeout rejections: %d", n)
	}
}

// Bytes a matcher already read are screened like the rest of the stream.
func TestMatchedBytesOfAnUntrustedClientAreScreened(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pending string
		send    string
		want    string // what the backend receives; "" for a rejection
		dialed  bool
	}{
		{"a whole header", "PROXY TCP4 198.51.100.7 127.0.0.1 4000 25\r\n", "", "", false},
		{"a header completed by the client", "PR", "OXY TCP4 198.51.100.7 127.0.0.1 4000 25\r\n", "", true},
		{"a prefix that diverges", "PR", "IVMSG #x\r\n", "PRIVMSG #x\r\n", true},
		{"no signature", "EHLO", " x\r\n", "EHLO x\r\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkEngineLeaks(t)
			backend, got := greetingBackend(t)
			h, closed := untrustingHop(t, backend.Addr, 5*time.Second, []byte(tc.pending))
			c := chaintest.Dial(t, h.Addr)
			io.WriteString(c, tc.send)
			c.CloseWrite()
			all, _, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
			info := closedInfo(t, closed)
			if tc.want == "" {
				if info.Reason != ReasonProxyProtocolRejected || !strings.Contains(info.Detail, "untrusted") {
					t.Fatalf("closed with %s (%q), want proxy_protocol_rejected, untrusted", info.Reason, info.Detail)
				}
			} else if info.Reason != ReasonClientClosed || string(all) != greeting+farewell {
				t.Fatalf("closed with %s (%q), client read %q", info.Reason, info.Detail, all)
			}
			if !tc.dialed {
				if n := backend.AcceptedCount(); n != 0 {
					t.Fatalf("backend dialed %d times for a header already in hand", n)
				}
				return
			}
			if b := received(t, got); string(b) != tc.want {
				t.Fatalf("backend received %q, want %q", b, tc.want)
			}
		})
	}
}

// A reset while the first bytes are being screened is a reset, and the
// backend hears of it rather than of a clean end.
func TestUntrustedClientResetWhileScreenedIsAReset(t *testing.T) {
	checkEngineLeaks(t)
	backend, got := greetingBackend(t)
	h, _ := untrustingHop(t, backend.Addr, 5*time.Second, nil)
	c := chaintest.Dial(t, h.Addr)
	readGreeting(t, c)
	io.WriteString(c, "PRO")
	c.SetLinger(0)
	c.Close()
	if r := h.reason(t); r != ReasonClientReset {
		t.Fatalf("reason %s, want client_reset", r)
	}
	if b := received(t, got); len(b) != 0 {
		t.Fatalf("backend received %q", b)
	}
}

// A trusted previous hop always sends a header first, so one that sends
// nothing is a broken chain: refused after the header timeout, not dialed.
func TestTrustedSilentPeerIsRejectedAfterTheTimeout(t *testing.T) {
	checkEngineLeaks(t)
	const timeout = 300 * time.Millisecond
	backend, _ := greetingBackend(t)
	closed := closedRecords{make(chan RecordInfo, 1)}
	tr := NewTracker()
	tr.Observer = closed
	h := startHop(t, &Proxy{Tracker: tr, Balancer: balancerFor(t, backend.Addr),
		Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}, Timeout: timeout}}, nil)
	c := chaintest.Dial(t, h.Addr)
	rest, elapsed, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
	if len(rest) != 0 || elapsed < timeout*9/10 || elapsed > timeout+time.Second {
		t.Fatalf("client read %q and was closed after %v, want nothing after about %v", rest, elapsed, timeout)
	}
	info := closedInfo(t, closed)
	if info.Reason != ReasonProxyProtocolRejected || !strings.Contains(info.Detail, "timeout") {
		t.Fatalf("closed with %s (%q)", info.Reason, info.Detail)
	}
	if n := backend.AcceptedCount(); n != 0 {
		t.Fatalf("backend dialed %d times", n)
	}
}

// Screening waits for the client's first bytes the way an established
// connection waits for its next ones: on readiness, without a copy buffer.
// A hundred silent clients on a server that greets must not cost a buffer
// each.
func TestSilentScreenedClientsHoldNoCopyBuffer(t *testing.T) {
	if !rawReadSupported {
		t.Skip("no readiness-first reads on this platform")
	}
	checkEngineLeaks(t)
	const n = 100
	backend, _ := greetingBackend(t)
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr),
		Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}, Timeout: 5 * time.Second}}, nil)
	heapInUse := func() int64 {
		runtime.GC()
		runtime.GC() // the second empties sync.Pool's victim cache
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return int64(m.HeapInuse)
	}
	before := heapInUse()
	for i := 0; i < n; i++ {
		readGreeting(t, chaintest.Dial(t, h.Addr))
	}
	if recs := h.Tracker.Records(); len(recs) != n {
		t.Fatalf("%d records, want %d", len(recs), n)
	}
	perConn := (heapInUse() - before) / n
	if perConn > bufSize/4 {
		t.Fatalf("%d bytes of heap per silent connection, want far less than a %d-byte copy buffer", perConn, bufSize)
	}
	t.Logf("%d bytes of heap per silent connection (hop, client and backend)", perConn)
}

// The screen decides the same whatever the reads' sizes, and holds nothing
// but a signature's prefix.
func TestScreenDecidesAlikeForAnySplit(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want verdict
	}{
		{"", verdictHold},
		{"PRO", verdictHold},
		{"PROXY", verdictHold},
		{"PROXY ", verdictReject},
		{"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", verdictReject},
		{"PROXYX", verdictForward},
		{"PRIVMSG #x\r\n", verdictForward},
		{v2Sig[:11], verdictHold},
		{v2Sig, verdictReject},
		{v2Sig[:11] + "X", verdictForward},
		{"\r\n\r\nhello", verdictForward},
		{"\x16\x03\x01", verdictForward},
	} {
		for split := 0; split <= len(tc.in); split++ {
			s := &screen{timeout: time.Second}
			now := time.Now()
			got := s.next([]byte(tc.in[:split]), now)
			if got == verdictHold {
				got = s.next([]byte(tc.in[split:]), now.Add(time.Millisecond))
			}
			if got != tc.want {
				t.Fatalf("%q split at %d: verdict %d, want %d", tc.in, split, got, tc.want)
			}
			if got == verdictHold {
				if string(s.heldBytes()) != tc.in {
					t.Fatalf("%q split at %d: held %q", tc.in, split, s.heldBytes())
				}
				// The deadline runs from the first held byte.
				if len(tc.in) > 0 && split > 0 && !s.deadline().Equal(now.Add(time.Second)) {
					t.Fatalf("%q split at %d: deadline %v, want a second after the first byte", tc.in, split, s.deadline().Sub(now))
				}
				if len(tc.in) == 0 && !s.deadline().IsZero() {
					t.Fatal("a deadline with nothing held")
				}
			}
		}
	}
}

// recordingBackend reads each connection to its end and reports what it
// received.
func recordingBackend(t *testing.T) (*chaintest.Backend, <-chan []byte) {
	got := make(chan []byte, 1)
	return chaintest.NewBackend(t, func(c *net.TCPConn) {
		b, _ := io.ReadAll(c)
		got <- b
	}), got
}

// sendInPieces writes each piece 50 ms after the one before, so that they
// arrive apart: what the tests that use it are about.
func sendInPieces(c net.Conn, pieces []string) {
	for i, p := range pieces {
		if i > 0 {
			time.Sleep(50 * time.Millisecond)
		}
		io.WriteString(c, p)
	}
}

// bytesOrNil is s as pending bytes: nil for none.
func bytesOrNil(s string) []byte {
	if s == "" {
		return nil
	}
	return []byte(s)
}

// A hop that sends its own header and reads none (accept_proxy_protocol
// forgotten on an inner hop) refuses a connection whose first bytes are a
// PROXY header, saying why: passed on, it would reach the upstream after
// the hop's own header as payload. The upstream sees the hop's header and
// nothing of the client's. Matched bytes (pending) are looked at before
// the dial.
func TestAHopThatReadsNoHeaderRefusesOneItWouldForwardAsPayload(t *testing.T) {
	v2 := string(mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:25"), ChainID: "outer", Hops: 1}))
	v1 := "PROXY TCP4 198.51.100.7 127.0.0.1 4000 25\r\n"
	for _, tc := range []struct {
		name    string
		pending string
		writes  []string // with a pause between them
	}{
		{"v1", "", []string{v1 + "hello"}},
		{"v2", "", []string{v2 + "hello"}},
		{"v1 split in the signature", "", []string{"PRO", "XY" + v1[5:] + "hello"}},
		{"v2 split in the signature", "", []string{v2[:5], v2[5:] + "hello"}},
		{"v2 in the matched bytes", v2, []string{"hello"}},
		{"part of v1 in the matched bytes", "PROXY", []string{v1[5:] + "hello"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkEngineLeaks(t)
			backend, got := recordingBackend(t)
			closed := closedRecords{make(chan RecordInfo, 1)}
			tr := NewTracker()
			tr.Observer = closed
			pending := bytesOrNil(tc.pending)
			h := startHop(t, &Proxy{Tracker: tr, Balancer: balancerFor(t, backend.Addr), EmitVersion: 1}, pending)
			c := chaintest.Dial(t, h.Addr)
			sendInPieces(c, tc.writes)
			if rest, _, _ := chaintest.ReadUntilClosed(c, 5*time.Second); len(rest) != 0 {
				t.Fatalf("client read %q", rest)
			}
			info := closedInfo(t, closed)
			if info.Reason != ReasonProxyProtocolRejected || !strings.Contains(info.Detail, "untrusted") ||
				!strings.Contains(info.Detail, "no accept_proxy_protocol") {
				t.Fatalf("closed with %s (%q), want proxy_protocol_rejected, untrusted, naming accept_proxy_protocol", info.Reason, info.Detail)
			}
			if n := tr.ProxyRejections(ProxyRejectUntrusted); n != 1 {
				t.Fatalf("untrusted rejections: %d", n)
			}
			if len(pending) >= len(v2Sig) {
				// Known before the dial: the upstream is not dialed at all.
				if n := backend.AcceptedCount(); n != 0 {
					t.Fatalf("the upstream was dialed %d times", n)
				}
				return
			}
			select {
			case b := <-got:
				if strings.Contains(string(b), "hello") || strings.Count(string(b), "PROXY") > 1 || strings.Contains(string(b), "198.51.100.7") {
					t.Fatalf("the upstream received the client's header or bytes: %q", b)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the upstream's connection was not closed")
			}
		})
	}
}

// On a hop that sends a header and reads none, bytes that only start like
// a header are the client's: once they diverge, or the client ends, they
// reach the upstream whole, after the hop's header.
func TestAHopThatReadsNoHeaderForwardsWhatOnlyStartsLikeOne(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pending string
		writes  []string
	}{
		{"diverges", "", []string{"PRO", "MPT\r\n"}},
		{"diverges after matched bytes", "PROX", []string{"IMA\r\n"}},
		{"ends", "", []string{"PRO"}},
		{"ordinary", "", []string{"GET / HTTP/1.0\r\nX: PROXY TCP4\r\n\r\n"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkEngineLeaks(t)
			backend, got := recordingBackend(t)
			h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr), EmitVersion: 1}, bytesOrNil(tc.pending))
			c := chaintest.Dial(t, h.Addr)
			sendInPieces(c, tc.writes)
			c.CloseWrite()
			want := tc.pending + strings.Join(tc.writes, "")
			select {
			case b := <-got:
				if _, rest, ok := strings.Cut(string(b), "\r\n"); !ok || !strings.HasPrefix(string(b), "PROXY TCP4 127.0.0.1 ") || rest != want {
					t.Fatalf("the upstream received %q, want the hop's header then %q", b, want)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the upstream's connection was not closed")
			}
			c.Close()
			if r := h.reason(t); r != ReasonClientClosed && r != ReasonUpstreamClosed {
				t.Fatalf("closed with %s", r)
			}
		})
	}
}

// A direct client whose first message could start a header ("\r\n", as a
// telnet user's first Enter) and who then waits for an answer is held only
// briefly by a hop that reads no header, then served: not refused as a
// slow header, as an untrusted peer of a hop that reads them would be.
func TestAHopThatReadsNoHeaderServesAStalledPrefix(t *testing.T) {
	checkEngineLeaks(t)
	// Echoes what follows the hop's v1 header line.
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		br := bufio.NewReader(c)
		if _, err := br.ReadString('\n'); err == nil {
			// Hidden behind plain interfaces: no splice(2), whose pipes Go
			// keeps pooled (they would count as leaked descriptors).
			io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{br})
		}
	})
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr), EmitVersion: 1}, nil)
	c := chaintest.Dial(t, h.Addr)
	start := time.Now()
	io.WriteString(c, "\r\n")
	c.SetReadDeadline(time.Now().Add(2 * time.Second)) // under DefaultProxyTimeout
	got := make([]byte, 2)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "\r\n" {
		t.Fatalf("read %q, %v after %v; want the echo", got, err, time.Since(start))
	}
	io.WriteString(c, "PROXY later is data\r\n") // screening is over
	got = make([]byte, len("PROXY later is data\r\n"))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("second echo: %v", err)
	}
	c.Close()
	if r := h.reason(t); r != ReasonClientClosed && r != ReasonUpstreamClosed {
		t.Fatalf("closed with %s", r)
	}
}

// A hop that sends no header of its own passes every byte on untouched, a
// header included: a backend behind it may read the header itself.
func TestAHopThatSendsNoHeaderPassesOneOn(t *testing.T) {
	checkEngineLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr)}, nil)
	msg := "PROXY TCP4 198.51.100.7 127.0.0.1 4000 25\r\nhello"
	c := chaintest.Dial(t, h.Addr)
	io.WriteString(c, msg)
	c.CloseWrite()
	if got, _, _ := chaintest.ReadUntilClosed(c, 5*time.Second); string(got) != msg {
		t.Fatalf("echoed %q, want %q", got, msg)
	}
	if r := h.reason(t); r != ReasonUpstreamClosed && r != ReasonClientClosed {
		t.Fatalf("closed with %s", r)
	}
}
