package layer4chain

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

var (
	loopbackAllow  = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	elsewhereAllow = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	trustedPeer    = netip.MustParseAddr("127.0.0.1")
	untrustedPeer  = netip.MustParseAddr("192.0.2.1")
)

func mustAppend(t testing.TB, h ProxyHeader) []byte {
	t.Helper()
	b, err := h.AppendTo(nil)
	if err != nil {
		t.Fatalf("AppendTo(%+v): %v", h, err)
	}
	return b
}

// v2Raw builds a v2 header by hand, for inputs AppendTo refuses to produce.
func v2Raw(cmd, fam byte, payload []byte) []byte {
	b := append([]byte(v2Sig), cmd, fam, 0, 0)
	binary.BigEndian.PutUint16(b[14:16], uint16(len(payload)))
	return append(b, payload...)
}

// libHeader formats a header with go-proxyproto directly, TLVs included, so
// tests can send what a foreign (or buggy) previous hop might.
func libHeader(t testing.TB, version byte, src, dst net.Addr, tlvs ...proxyproto.TLV) []byte {
	t.Helper()
	h := proxyproto.HeaderProxyFromAddrs(version, src, dst)
	if len(tlvs) > 0 {
		if err := h.SetTLVs(tlvs); err != nil {
			t.Fatal(err)
		}
	}
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func reasonOf(err error) ProxyRejectReason {
	var re *ProxyRejectError
	if errors.As(err, &re) {
		return re.Reason
	}
	return ""
}

var (
	tcp4Src = &net.TCPAddr{IP: net.IPv4(198, 51, 100, 7).To4(), Port: 40000}
	tcp4Dst = &net.TCPAddr{IP: net.IPv4(203, 0, 113, 9).To4(), Port: 443}
)

func TestSignaturesMatchLibrary(t *testing.T) {
	if v2Sig != string(proxyproto.SIGV2) {
		t.Fatalf("v2Sig %q != proxyproto.SIGV2 %q", v2Sig, proxyproto.SIGV2)
	}
	if !strings.HasPrefix(v1Sig, string(proxyproto.SIGV1)) {
		t.Fatalf("v1Sig %q does not start with proxyproto.SIGV1 %q", v1Sig, proxyproto.SIGV1)
	}
	if TLVHops < proxyproto.PP2_TYPE_MIN_CUSTOM || TLVHops > proxyproto.PP2_TYPE_MAX_CUSTOM {
		t.Fatalf("TLVHops %#x outside the custom range", byte(TLVHops))
	}
}

func TestProxyRejectReasons(t *testing.T) {
	want := []ProxyRejectReason{"untrusted", "malformed", "timeout", "missing"}
	if !reflect.DeepEqual(ProxyRejectReasons, want) {
		t.Fatalf("ProxyRejectReasons = %v, want %v", ProxyRejectReasons, want)
	}
}

func TestProxyRejectError(t *testing.T) {
	cause := errors.New("boom")
	var err error = &ProxyRejectError{Reason: ProxyRejectMalformed, Err: cause}
	if got, want := err.Error(), "proxy protocol header rejected (malformed): boom"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(err, cause) {
		t.Error("errors.Is does not reach the cause")
	}
	if got, want := (&ProxyRejectError{Reason: ProxyRejectMissing}).Error(), "proxy protocol header rejected (missing)"; got != want {
		t.Errorf("Error() without cause = %q, want %q", got, want)
	}
}

// TestAcceptRows drives every documented outcome through the in-memory
// reader, in one read and in one-byte reads, and checks the deadline is
// cleared on every path.
func TestAcceptRows(t *testing.T) {
	v1 := mustAppend(t, ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("198.51.100.7:40000"), Destination: netip.MustParseAddrPort("203.0.113.9:443")})
	v2 := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:40000"), Destination: netip.MustParseAddrPort("203.0.113.9:443"), ChainID: "chain-1", Hops: 2, Authority: "example.com"})
	v1Info := &ProxyInfo{Source: netip.MustParseAddrPort("198.51.100.7:40000"), Destination: netip.MustParseAddrPort("203.0.113.9:443")}
	v2Info := &ProxyInfo{Source: v1Info.Source, Destination: v1Info.Destination, ChainID: "chain-1", Hops: 2, Authority: "example.com"}
	deadline := os.ErrDeadlineExceeded

	cases := []struct {
		name     string
		trusted  bool
		data     []byte
		end      error // after data; nil = io.EOF
		wantInfo *ProxyInfo
		wantRest string
		reason   ProxyRejectReason // "" = no ProxyRejectError
		wantErr  error             // checked with errors.Is when non-nil
	}{
		{name: "trusted v1 header", trusted: true, data: append(bytes.Clone(v1), "hello"...), end: deadline, wantInfo: v1Info, wantRest: "hello"},
		{name: "trusted v2 header", trusted: true, data: append(bytes.Clone(v2), "hello"...), end: deadline, wantInfo: v2Info, wantRest: "hello"},
		{name: "trusted v2 header no payload", trusted: true, data: v2, end: deadline, wantInfo: v2Info},
		{name: "trusted header then EOF", trusted: true, data: v1, wantInfo: v1Info},
		{name: "trusted non-signature", trusted: true, data: []byte("GET / HTTP/1.1\r\n\r\n"), end: deadline, reason: ProxyRejectMissing},
		{name: "trusted PROXY without space", trusted: true, data: []byte("PROXYX"), end: deadline, reason: ProxyRejectMissing},
		{name: "trusted zero bytes deadline", trusted: true, end: deadline, reason: ProxyRejectMissing, wantErr: os.ErrDeadlineExceeded},
		{name: "trusted partial v2 deadline", trusted: true, data: v2[:10], end: deadline, reason: ProxyRejectTimeout},
		{name: "trusted partial v1 body deadline", trusted: true, data: v1[:20], end: deadline, reason: ProxyRejectTimeout},
		{name: "trusted zero bytes EOF", trusted: true, reason: ProxyRejectMissing, wantErr: io.EOF},
		{name: "trusted partial header EOF", trusted: true, data: v2[:20], reason: ProxyRejectMalformed, wantErr: io.EOF},
		{name: "trusted partial signature EOF", trusted: true, data: []byte("PRO"), reason: ProxyRejectMalformed, wantErr: io.EOF},
		{name: "untrusted v1 header", data: v1, end: deadline, reason: ProxyRejectUntrusted},
		{name: "untrusted v2 header", data: v2, end: deadline, reason: ProxyRejectUntrusted},
		{name: "untrusted v1 signature only", data: []byte("PROXY "), end: deadline, reason: ProxyRejectUntrusted},
		{name: "untrusted v2 signature only", data: []byte(v2Sig), end: deadline, reason: ProxyRejectUntrusted},
		{name: "untrusted non-signature", data: []byte("\x16\x03\x01\x02\x00"), end: deadline, wantRest: "\x16\x03\x01\x02\x00"},
		{name: "untrusted diverges after prefix", data: []byte("PRIVMSG x\r\n"), end: deadline, wantRest: "PRIVMSG x\r\n"},
		{name: "untrusted CRLF then text", data: []byte("\r\nhi"), end: deadline, wantRest: "\r\nhi"},
		{name: "untrusted zero bytes deadline", end: deadline},
		{name: "untrusted partial signature deadline", data: []byte("PROX"), end: deadline, reason: ProxyRejectTimeout, wantErr: os.ErrDeadlineExceeded},
		{name: "untrusted zero bytes EOF", wantErr: io.EOF},
		{name: "untrusted partial signature EOF", data: []byte("\r\n\r\n"), wantRest: "\r\n\r\n", wantErr: io.EOF},
		{name: "v1 without line end", trusted: true, data: []byte("PROXY " + strings.Repeat("A", 120)), end: deadline, reason: ProxyRejectMalformed},
		{name: "v1 bad protocol", trusted: true, data: []byte("PROXY FOO 1 2 3 4\r\n"), end: deadline, reason: ProxyRejectMalformed},
		{name: "v1 LF without CR", trusted: true, data: []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), end: deadline, reason: ProxyRejectMalformed},
	}
	for _, tc := range cases {
		for _, chunk := range []int{0, 1} {
			name := tc.name
			if chunk == 1 {
				name += "/byte by byte"
			}
			t.Run(name, func(t *testing.T) {
				peer := untrustedPeer
				if tc.trusted {
					peer = trustedPeer
				}
				a := &ProxyAcceptor{Allow: loopbackAllow, Timeout: time.Second}
				conn := &memConn{data: bytes.Clone(tc.data), chunk: chunk, end: tc.end}
				info, rest, err := a.Accept(conn, peer)
				if got := reasonOf(err); got != tc.reason {
					t.Fatalf("reason = %q, want %q (err %v)", got, tc.reason, err)
				}
				if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want one wrapping %v", err, tc.wantErr)
				}
				if tc.reason == "" && tc.wantErr == nil && err != nil {
					t.Fatalf("unexpected err %v", err)
				}
				if tc.wantErr == io.EOF && !tc.trusted && err != io.EOF {
					t.Fatalf("untrusted EOF must come back unwrapped, got %#v", err)
				}
				if !reflect.DeepEqual(info, tc.wantInfo) {
					t.Fatalf("info = %+v, want %+v", info, tc.wantInfo)
				}
				// Accept stops reading once it can decide, so with small reads
				// part of the payload is still in conn: rest and what is left
				// unread must together be the payload.
				if tc.reason != "" {
					if rest != nil {
						t.Fatalf("rejection returned rest %q", rest)
					}
				} else if got := string(rest) + string(conn.data); got != tc.wantRest {
					t.Fatalf("rest %q + unread %q, want %q", rest, conn.data, tc.wantRest)
				}
				if chunk == 0 && string(rest) != tc.wantRest {
					t.Fatalf("rest = %q, want %q", rest, tc.wantRest)
				}
				if !conn.deadlineCleared() {
					t.Fatalf("deadline not cleared: %v", conn.deadlines)
				}
			})
		}
	}
}

// TestAcceptMalformed covers headers that have a signature and the right
// framing but do not decode, or carry TLVs that make no sense for a chain.
func TestAcceptMalformed(t *testing.T) {
	addr4 := make([]byte, 12)
	cases := []struct {
		name string
		data []byte
	}{
		{"v2 bad version", v2Raw(0x31, 0x11, addr4)},
		{"v2 bad command", v2Raw(0x23, 0x11, addr4)},
		{"v2 bad family", v2Raw(0x21, 0x13, addr4)},
		{"v2 IPv4 length too short", v2Raw(0x21, 0x11, addr4[:8])},
		{"v2 truncated TLV", v2Raw(0x21, 0x11, append(bytes.Clone(addr4), 0x05, 0x00))},
		{"v2 TLV longer than header", v2Raw(0x21, 0x11, append(bytes.Clone(addr4), 0x05, 0x00, 0x09, 'a'))},
		{"v2 length over MaxV2HeaderSize", func() []byte {
			b := v2Raw(0x21, 0x11, addr4)
			binary.BigEndian.PutUint16(b[14:16], proxyproto.MaxV2HeaderSize+1)
			return b
		}()},
		{"hops TLV two bytes", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: TLVHops, Value: []byte{0, 1}})},
		{"hops TLV empty", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: TLVHops, Value: []byte{}})},
		{"duplicate hops", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: TLVHops, Value: []byte{1}}, proxyproto.TLV{Type: TLVHops, Value: []byte{2}})},
		{"duplicate unique ID", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte("a")}, proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte("b")})},
		{"duplicate authority", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("a")}, proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("b")})},
		{"unique ID over 128 bytes", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: bytes.Repeat([]byte("x"), 129)})},
		{"unique ID with a control byte", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte("abc\ndef")})},
		{"authority with an escape", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("evil\x1b[2J.example")})},
		{"unique ID not ASCII", libHeader(t, 2, tcp4Src, tcp4Dst, proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte("caf\xc3\xa9")})},
		{"v1 too many fields", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n")},
		{"v1 IPv6 in TCP4", []byte("PROXY TCP4 ::1 ::1 1 2\r\n")},
		{"v1 exactly 107 bytes no LF", []byte("PROXY " + strings.Repeat("1", 101))},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := &ProxyAcceptor{Allow: loopbackAllow}
			conn := &memConn{data: append(bytes.Clone(tc.data), "payload"...), end: os.ErrDeadlineExceeded}
			info, rest, err := a.Accept(conn, trustedPeer)
			if reasonOf(err) != ProxyRejectMalformed {
				t.Fatalf("got info=%+v rest=%q err=%v, want malformed", info, rest, err)
			}
			if info != nil || rest != nil {
				t.Fatalf("rejection returned info=%+v rest=%q", info, rest)
			}
			if !conn.deadlineCleared() {
				t.Fatal("deadline not cleared")
			}
		})
	}
}

// TestAcceptForeignHeaders checks headers this hop never emits but a
// previous hop of another make might: they are accepted, with what a TCP hop
// can use.
func TestAcceptForeignHeaders(t *testing.T) {
	cases := []struct {
		name string
		data []byte
		want *ProxyInfo
	}{
		{"v2 UDPv4", libHeader(t, 2, &net.UDPAddr{IP: tcp4Src.IP, Port: 1}, &net.UDPAddr{IP: tcp4Dst.IP, Port: 2}),
			&ProxyInfo{Source: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.7"), 1), Destination: netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), 2)}},
		{"v2 unix stream", libHeader(t, 2, &net.UnixAddr{Net: "unix", Name: "/a"}, &net.UnixAddr{Net: "unix", Name: "/b"}), &ProxyInfo{Local: true}},
		{"v2 LOCAL with addresses", v2Raw(0x20, 0x11, []byte{1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2}), &ProxyInfo{Local: true}},
		{"v2 LOCAL odd length", v2Raw(0x20, 0x11, []byte{1, 2, 3}), &ProxyInfo{Local: true}},
		{"v2 other TLVs kept in order", libHeader(t, 2, tcp4Src, tcp4Dst,
			proxyproto.TLV{Type: proxyproto.PP2_TYPE_ALPN, Value: []byte("h2")},
			proxyproto.TLV{Type: proxyproto.PP2_TYPE_NOOP, Value: []byte{0, 0}},
			proxyproto.TLV{Type: 0xE5, Value: []byte{1, 2, 3}},
			proxyproto.TLV{Type: TLVHops, Value: []byte{7}}),
			&ProxyInfo{Source: netip.MustParseAddrPort("198.51.100.7:40000"), Destination: netip.MustParseAddrPort("203.0.113.9:443"), Hops: 7,
				TLVs: []proxyproto.TLV{{Type: proxyproto.PP2_TYPE_ALPN, Value: []byte("h2")}, {Type: 0xE5, Value: []byte{1, 2, 3}}}}},
		{"v1 UNKNOWN with addresses", []byte("PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n"), &ProxyInfo{Local: true}},
		// PROXY over UNSPEC is v2's "PROXY UNKNOWN": the sender does not
		// know the client, and the spec lets the receiver use the socket's
		// addresses, as HAProxy does. The chain's TLVs still count.
		{"v2 PROXY with UNSPEC", v2Raw(0x21, 0x00, nil), &ProxyInfo{Local: true}},
		{"v2 PROXY with UNSPEC and TLVs", v2Raw(0x21, 0x00, []byte{0x05, 0, 3, 'a', 'b', 'c', byte(TLVHops), 0, 1, 4}),
			&ProxyInfo{Local: true, ChainID: "abc", Hops: 4}},
		{"v1 TCP6 mapped", []byte("PROXY TCP6 ::ffff:1.2.3.4 2001:db8::1 1 2\r\n"),
			&ProxyInfo{Source: netip.MustParseAddrPort("1.2.3.4:1"), Destination: netip.MustParseAddrPort("[2001:db8::1]:2")}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := &ProxyAcceptor{Allow: loopbackAllow}
			conn := &memConn{data: append(bytes.Clone(tc.data), 'X'), end: os.ErrDeadlineExceeded}
			info, rest, err := a.Accept(conn, trustedPeer)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(info, tc.want) {
				t.Fatalf("info = %+v, want %+v", info, tc.want)
			}
			if string(rest) != "X" {
				t.Fatalf("rest = %q", rest)
			}
		})
	}
}

func TestAcceptTrust(t *testing.T) {
	cases := []struct {
		allow   string
		peer    string
		trusted bool
	}{
		{"127.0.0.0/8", "127.0.0.1", true},
		{"127.0.0.0/8", "::ffff:127.0.0.1", true},
		{"::ffff:127.0.0.0/104", "127.0.0.1", true},
		{"::ffff:127.0.0.0/104", "::ffff:127.0.0.2", true},
		{"fe80::/10", "fe80::1%eth0", true},
		{"2001:db8::/32", "2001:db8::5", true},
		{"127.0.0.0/8", "10.0.0.1", false},
		{"2001:db8::/32", "127.0.0.1", false},
		{"::/0", "127.0.0.1", false},
		{"0.0.0.0/0", "2001:db8::5", false},
	}
	for _, tc := range cases {
		allow := []netip.Prefix{netip.MustParsePrefix(tc.allow)}
		if got := isTrusted(allow, netip.MustParseAddr(tc.peer)); got != tc.trusted {
			t.Errorf("isTrusted(%s, %s) = %v, want %v", tc.allow, tc.peer, got, tc.trusted)
		}
	}
	if isTrusted(loopbackAllow, netip.Addr{}) {
		t.Error("zero peer trusted")
	}
	// The trust decision is what Accept acts on: a mapped peer's header is honoured.
	a := &ProxyAcceptor{Allow: loopbackAllow}
	conn := &memConn{data: []byte("PROXY UNKNOWN\r\n"), end: os.ErrDeadlineExceeded}
	if info, _, err := a.Accept(conn, netip.MustParseAddr("::ffff:127.0.0.1")); err != nil || info == nil || !info.Local {
		t.Fatalf("mapped trusted peer: info=%+v err=%v", info, err)
	}
	var nilAcceptor *ProxyAcceptor
	if _, _, err := nilAcceptor.Accept(&memConn{data: []byte("PROXY ")}, trustedPeer); reasonOf(err) != ProxyRejectUntrusted {
		t.Fatalf("nil acceptor trusts nobody, got %v", err)
	}
}

func TestAcceptDefaultTimeout(t *testing.T) {
	for _, timeout := range []time.Duration{0, -time.Second} {
		conn := &memConn{data: []byte("x")}
		before := time.Now()
		if _, _, err := (&ProxyAcceptor{Timeout: timeout}).Accept(conn, untrustedPeer); err != nil {
			t.Fatal(err)
		}
		if len(conn.deadlines) != 2 {
			t.Fatalf("deadlines = %v", conn.deadlines)
		}
		if d := conn.deadlines[0].Sub(before); d < 3*time.Second || d > 4*time.Second {
			t.Fatalf("Timeout %v gave a deadline %v ahead, want 3s", timeout, d)
		}
	}
}

// stuckConn returns (0, nil) forever and ignores deadlines.
type stuckConn struct{ memConn }

func (c *stuckConn) Read([]byte) (int, error) { c.reads++; return 0, nil }

func TestAcceptReaderWithoutProgress(t *testing.T) {
	conn := &stuckConn{}
	info, rest, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(conn, trustedPeer)
	if reasonOf(err) != ProxyRejectMissing || !errors.Is(err, io.ErrNoProgress) || info != nil || rest != nil {
		t.Fatalf("info=%+v rest=%q err=%v", info, rest, err)
	}
	if conn.reads != maxEmptyReads || !conn.deadlineCleared() {
		t.Fatalf("reads=%d deadlines=%v", conn.reads, conn.deadlines)
	}
}

type deadlineErrConn struct{ memConn }

func (c *deadlineErrConn) SetReadDeadline(t time.Time) error {
	c.memConn.SetReadDeadline(t)
	if !t.IsZero() {
		return net.ErrClosed
	}
	return nil
}

func TestAcceptDeadlineError(t *testing.T) {
	conn := &deadlineErrConn{memConn{data: []byte("hello")}}
	info, rest, err := (&ProxyAcceptor{}).Accept(conn, untrustedPeer)
	if !errors.Is(err, net.ErrClosed) || info != nil || rest != nil {
		t.Fatalf("info=%+v rest=%q err=%v", info, rest, err)
	}
	if conn.reads != 0 || !conn.deadlineCleared() {
		t.Fatalf("reads=%d deadlines=%v", conn.reads, conn.deadlines)
	}
}

// TestAcceptLargeV2Header checks a v2 header bigger than the initial buffer
// is assembled from many reads, and the payload after it is still returned.
func TestAcceptLargeV2Header(t *testing.T) {
	auth := strings.Repeat("a", 3000)
	hdr := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("[2001:db8::1]:5"), Destination: netip.MustParseAddrPort("[2001:db8::2]:6"), Authority: auth})
	for _, chunk := range []int{0, 1, 100, 300} {
		conn := &memConn{data: append(bytes.Clone(hdr), "tail"...), chunk: chunk, end: os.ErrDeadlineExceeded}
		info, rest, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(conn, trustedPeer)
		if err != nil {
			t.Fatalf("chunk %d: %v", chunk, err)
		}
		if info.Authority != auth || string(rest)+string(conn.data) != "tail" {
			t.Fatalf("chunk %d: authority %d bytes, rest %q", chunk, len(info.Authority), rest)
		}
	}
}

func TestAppendToV1Text(t *testing.T) {
	cases := []struct {
		h    ProxyHeader
		want string
	}{
		{ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("1.2.3.4:1000"), Destination: netip.MustParseAddrPort("5.6.7.8:443")},
			"PROXY TCP4 1.2.3.4 5.6.7.8 1000 443\r\n"},
		{ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("[2001:db8::1]:1000"), Destination: netip.MustParseAddrPort("[2001:db8::2]:443")},
			"PROXY TCP6 2001:db8::1 2001:db8::2 1000 443\r\n"},
		{ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("1.2.3.4:1000"), Destination: netip.MustParseAddrPort("[2001:db8::2]:443")},
			"PROXY TCP6 ::ffff:1.2.3.4 2001:db8::2 1000 443\r\n"},
		{ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("[2001:db8::1]:1000"), Destination: netip.MustParseAddrPort("5.6.7.8:443")},
			"PROXY TCP6 2001:db8::1 ::ffff:5.6.7.8 1000 443\r\n"},
		{ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("[::ffff:1.2.3.4]:1000"), Destination: netip.MustParseAddrPort("5.6.7.8:443")},
			"PROXY TCP4 1.2.3.4 5.6.7.8 1000 443\r\n"},
		{ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("[fe80::1%eth0]:1000"), Destination: netip.MustParseAddrPort("[fe80::2%eth0]:443")},
			"PROXY TCP6 fe80::1 fe80::2 1000 443\r\n"},
		{ProxyHeader{Version: 1, Source: netip.MustParseAddrPort("1.2.3.4:1000")},
			"PROXY TCP4 1.2.3.4 0.0.0.0 1000 0\r\n"},
		{ProxyHeader{Version: 1}, "PROXY UNKNOWN\r\n"},
		{ProxyHeader{Version: 1, Destination: netip.MustParseAddrPort("5.6.7.8:443"), ChainID: "ignored", Hops: 3}, "PROXY UNKNOWN\r\n"},
	}
	for _, tc := range cases {
		got, err := tc.h.AppendTo([]byte("pre:"))
		if err != nil {
			t.Fatalf("%+v: %v", tc.h, err)
		}
		if string(got) != "pre:"+tc.want {
			t.Errorf("%+v: got %q, want %q", tc.h, got, "pre:"+tc.want)
		}
	}
}

func TestAppendToV2Local(t *testing.T) {
	got := mustAppend(t, ProxyHeader{Version: 2})
	if want := v2Raw(0x20, 0x00, nil); !bytes.Equal(got, want) {
		t.Fatalf("got %x, want %x", got, want)
	}
	got = mustAppend(t, ProxyHeader{Version: 2, Hops: 1})
	if want := v2Raw(0x20, 0x00, []byte{byte(TLVHops), 0, 1, 1}); !bytes.Equal(got, want) {
		t.Fatalf("got %x, want %x", got, want)
	}
}

func TestAppendToErrors(t *testing.T) {
	src := netip.MustParseAddrPort("1.2.3.4:1")
	cases := []ProxyHeader{
		{Version: 0, Source: src},
		{Version: 3, Source: src},
		{Version: 2, Source: src, ChainID: strings.Repeat("x", 129)},
		{Version: 2, ChainID: strings.Repeat("x", 129)},
		{Version: 2, Source: src, Hops: 256},
		{Version: 2, Source: src, Hops: -1},
		{Version: 2, Source: src, Authority: strings.Repeat("a", 70000)},
	}
	for _, h := range cases {
		out, err := h.AppendTo([]byte("keep"))
		if err == nil {
			t.Errorf("Version %d ChainID %d bytes Hops %d Authority %d bytes: no error", h.Version, len(h.ChainID), h.Hops, len(h.Authority))
		}
		if string(out) != "keep" {
			t.Errorf("dst changed on error: %q", out)
		}
	}
	if _, err := (ProxyHeader{Version: 2, Source: src, ChainID: strings.Repeat("x", 128), Hops: 255}).AppendTo(nil); err != nil {
		t.Errorf("128-byte chain ID and 255 hops refused: %v", err)
	}
}

// TestRoundTripTCP sends AppendTo's output and a payload in one write over
// loopback and checks a trusted Accept gives back the same fields and the
// payload as rest.
func TestRoundTripTCP(t *testing.T) {
	v4s, v4d := netip.MustParseAddrPort("198.51.100.7:40000"), netip.MustParseAddrPort("203.0.113.9:443")
	v6s, v6d := netip.MustParseAddrPort("[2001:db8::7]:40000"), netip.MustParseAddrPort("[2001:db8::9]:443")
	longID := strings.Repeat("c", 128)
	cases := []struct {
		name string
		h    ProxyHeader
		want ProxyInfo
	}{
		{"v1 IPv4", ProxyHeader{Version: 1, Source: v4s, Destination: v4d}, ProxyInfo{Source: v4s, Destination: v4d}},
		{"v1 IPv6", ProxyHeader{Version: 1, Source: v6s, Destination: v6d}, ProxyInfo{Source: v6s, Destination: v6d}},
		{"v1 mixed v4 to v6", ProxyHeader{Version: 1, Source: v4s, Destination: v6d}, ProxyInfo{Source: v4s, Destination: v6d}},
		{"v1 mixed v6 to v4", ProxyHeader{Version: 1, Source: v6s, Destination: v4d}, ProxyInfo{Source: v6s, Destination: v4d}},
		{"v1 UNKNOWN", ProxyHeader{Version: 1}, ProxyInfo{Local: true}},
		{"v1 TLV fields ignored", ProxyHeader{Version: 1, Source: v4s, Destination: v4d, ChainID: "x", Hops: 4, Authority: "a"}, ProxyInfo{Source: v4s, Destination: v4d}},
		{"v2 IPv4", ProxyHeader{Version: 2, Source: v4s, Destination: v4d}, ProxyInfo{Source: v4s, Destination: v4d}},
		{"v2 IPv4 with TLVs", ProxyHeader{Version: 2, Source: v4s, Destination: v4d, ChainID: "chain-42", Hops: 3, Authority: "db.example.com"},
			ProxyInfo{Source: v4s, Destination: v4d, ChainID: "chain-42", Hops: 3, Authority: "db.example.com"}},
		{"v2 IPv6 with TLVs", ProxyHeader{Version: 2, Source: v6s, Destination: v6d, ChainID: longID, Hops: 255, Authority: "example.org"},
			ProxyInfo{Source: v6s, Destination: v6d, ChainID: longID, Hops: 255, Authority: "example.org"}},
		{"v2 mixed v4 to v6", ProxyHeader{Version: 2, Source: v4s, Destination: v6d, Hops: 1}, ProxyInfo{Source: v4s, Destination: v6d, Hops: 1}},
		{"v2 mixed v6 to v4", ProxyHeader{Version: 2, Source: v6s, Destination: v4d, ChainID: "m"}, ProxyInfo{Source: v6s, Destination: v4d, ChainID: "m"}},
		{"v2 mapped source", ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("[::ffff:198.51.100.7]:40000"), Destination: v4d}, ProxyInfo{Source: v4s, Destination: v4d}},
		{"v2 no destination", ProxyHeader{Version: 2, Source: v6s}, ProxyInfo{Source: v6s, Destination: netip.MustParseAddrPort("[::]:0")}},
		{"v2 LOCAL", ProxyHeader{Version: 2}, ProxyInfo{Local: true}},
		{"v2 LOCAL with TLVs", ProxyHeader{Version: 2, Destination: v4d, ChainID: "local-chain", Hops: 9, Authority: "sni.example"},
			ProxyInfo{Local: true, ChainID: "local-chain", Hops: 9, Authority: "sni.example"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			server, client, peer := tcpPair(t)
			msg, err := tc.h.AppendTo(nil)
			if err != nil {
				t.Fatal(err)
			}
			msg = append(msg, "hello"...)
			if _, err := client.Write(msg); err != nil {
				t.Fatal(err)
			}
			a := &ProxyAcceptor{Allow: loopbackAllow, Timeout: 5 * time.Second}
			info, rest, err := a.Accept(server, peer)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(*info, tc.want) {
				t.Fatalf("info = %+v, want %+v", *info, tc.want)
			}
			if string(rest) != "hello" {
				t.Fatalf("rest = %q, want %q", rest, "hello")
			}
			assertNoDeadline(t, server, client)
		})
	}
}

// assertNoDeadline checks the server's read deadline was cleared: a read
// that can only finish when the client writes later must not time out.
func assertNoDeadline(t *testing.T, server, client *net.TCPConn) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 1)
		_, err := server.Read(buf)
		done <- err
	}()
	// If Accept had left its deadline in place, this read would fail with
	// os.ErrDeadlineExceeded (at once in the timeout rows, where it has
	// already passed) instead of receiving the byte written below.
	if _, err := client.Write([]byte("z")); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("read after Accept: %v", err)
	}
}

// TestSplitHeaderTCP sends a header in several writes. The kernel may or may
// not merge them; the one-byte memConn case in TestAcceptRows covers the
// split deterministically, this covers a real socket.
func TestSplitHeaderTCP(t *testing.T) {
	for _, version := range []int{1, 2} {
		server, client, peer := tcpPair(t)
		client.SetNoDelay(true)
		hdr := mustAppend(t, ProxyHeader{Version: version, Source: netip.MustParseAddrPort("[2001:db8::7]:1"), Destination: netip.MustParseAddrPort("[2001:db8::9]:2"), ChainID: "split", Hops: 5})
		msg := append(hdr, "payload"...)
		type result struct {
			info *ProxyInfo
			rest []byte
			err  error
		}
		res := make(chan result, 1)
		go func() {
			info, rest, err := (&ProxyAcceptor{Allow: loopbackAllow, Timeout: 5 * time.Second}).Accept(server, peer)
			res <- result{info, rest, err}
		}()
		for i := 0; i < len(msg); i += 7 {
			if _, err := client.Write(msg[i:min(i+7, len(msg))]); err != nil {
				t.Fatal(err)
			}
		}
		r := <-res
		if r.err != nil {
			t.Fatalf("v%d: %v", version, r.err)
		}
		if r.info.Source != netip.MustParseAddrPort("[2001:db8::7]:1") {
			t.Fatalf("v%d: info %+v", version, r.info)
		}
		if version == 2 && (r.info.ChainID != "split" || r.info.Hops != 5) {
			t.Fatalf("v2: info %+v", r.info)
		}
		// What Accept did not read is still on the socket: rest plus the
		// following reads make up the payload.
		got := append([]byte(nil), r.rest...)
		server.SetReadDeadline(time.Now().Add(5 * time.Second))
		for len(got) < len("payload") {
			buf := make([]byte, 16)
			n, err := server.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, buf[:n]...)
		}
		if string(got) != "payload" {
			t.Fatalf("v%d: payload %q", version, got)
		}
	}
}

// TestAcceptTCP runs the rows that involve a real deadline or a real close
// over loopback.
func TestAcceptTCP(t *testing.T) {
	const timeout = 100 * time.Millisecond
	v2 := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("1.2.3.4:5"), Destination: netip.MustParseAddrPort("6.7.8.9:10"), ChainID: "abc"})
	cases := []struct {
		name        string
		trusted     bool
		send        []byte
		closeWrite  bool
		reason      ProxyRejectReason
		wantErr     error
		wantRest    string
		wantInfo    bool
		waitTimeout bool // Accept should return only once the deadline passes
	}{
		{name: "trusted sends nothing", trusted: true, reason: ProxyRejectMissing, wantErr: os.ErrDeadlineExceeded, waitTimeout: true},
		{name: "trusted sends half a v2 header", trusted: true, send: v2[:len(v2)/2], reason: ProxyRejectTimeout, wantErr: os.ErrDeadlineExceeded, waitTimeout: true},
		{name: "trusted sends v2 signature only", trusted: true, send: []byte(v2Sig), reason: ProxyRejectTimeout, waitTimeout: true},
		{name: "trusted sends a header", trusted: true, send: append(bytes.Clone(v2), "hello"...), wantInfo: true, wantRest: "hello"},
		{name: "trusted sends no header", trusted: true, send: []byte("SSH-2.0-x\r\n"), reason: ProxyRejectMissing},
		{name: "trusted closes", trusted: true, closeWrite: true, reason: ProxyRejectMissing, wantErr: io.EOF},
		{name: "trusted closes mid header", trusted: true, send: v2[:20], closeWrite: true, reason: ProxyRejectMalformed, wantErr: io.EOF},
		{name: "untrusted sends a header", send: append(bytes.Clone(v2), "hello"...), reason: ProxyRejectUntrusted},
		{name: "untrusted sends v1 signature only", send: []byte("PROXY "), reason: ProxyRejectUntrusted},
		{name: "untrusted sends data", send: []byte("GET / HTTP/1.0\r\n\r\n"), wantRest: "GET / HTTP/1.0\r\n\r\n"},
		{name: "untrusted sends nothing", waitTimeout: true},
		{name: "untrusted sends partial signature", send: []byte("PROX"), reason: ProxyRejectTimeout, wantErr: os.ErrDeadlineExceeded, waitTimeout: true},
		{name: "untrusted closes", closeWrite: true, wantErr: io.EOF},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			server, client, peer := tcpPair(t)
			allow := elsewhereAllow
			if tc.trusted {
				allow = loopbackAllow
			}
			if len(tc.send) > 0 {
				if _, err := client.Write(tc.send); err != nil {
					t.Fatal(err)
				}
			}
			if tc.closeWrite {
				if err := client.CloseWrite(); err != nil {
					t.Fatal(err)
				}
			}
			a := &ProxyAcceptor{Allow: allow, Timeout: timeout}
			if !tc.waitTimeout {
				// Decisions that need no deadline must not wait for one.
				a.Timeout = 10 * time.Second
			}
			start := time.Now()
			info, rest, err := a.Accept(server, peer)
			elapsed := time.Since(start)

			if got := reasonOf(err); got != tc.reason {
				t.Fatalf("reason = %q, want %q (err %v)", got, tc.reason, err)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want one wrapping %v", err, tc.wantErr)
			}
			if tc.reason == "" && tc.wantErr == nil && err != nil {
				t.Fatalf("unexpected err %v", err)
			}
			if (info != nil) != tc.wantInfo {
				t.Fatalf("info = %+v, want present=%v", info, tc.wantInfo)
			}
			if string(rest) != tc.wantRest {
				t.Fatalf("rest = %q, want %q", rest, tc.wantRest)
			}
			if tc.waitTimeout {
				if elapsed < timeout*9/10 || elapsed > timeout+500*time.Millisecond {
					t.Fatalf("returned after %v, want about %v", elapsed, timeout)
				}
			} else if elapsed > 2*time.Second {
				t.Fatalf("returned after %v without needing the deadline", elapsed)
			}
			if !tc.closeWrite {
				assertNoDeadline(t, server, client)
			}
		})
	}
}

// TestV1TooLongTCP checks a trusted v1 line with no CRLF in 107
// bytes is refused as soon as the 107 bytes are in, over a real socket.
func TestV1TooLongTCP(t *testing.T) {
	server, client, peer := tcpPair(t)
	if _, err := client.Write([]byte("PROXY TCP4 " + strings.Repeat("9", 200))); err != nil {
		t.Fatal(err)
	}
	_, _, err := (&ProxyAcceptor{Allow: loopbackAllow, Timeout: 10 * time.Second}).Accept(server, peer)
	if reasonOf(err) != ProxyRejectMalformed {
		t.Fatalf("err = %v, want malformed", err)
	}
}

// FuzzProxyAcceptor feeds arbitrary bytes to Accept, trusted and untrusted,
// in various read sizes. Beyond not panicking it checks the invariants
// callers rely on, and that whatever a trusted peer got accepted re-encodes
// and decodes to the same ProxyInfo.
func FuzzProxyAcceptor(f *testing.F) {
	src, dst := netip.MustParseAddrPort("198.51.100.7:40000"), netip.MustParseAddrPort("[2001:db8::9]:443")
	for _, h := range []ProxyHeader{
		{Version: 1, Source: src, Destination: netip.MustParseAddrPort("203.0.113.9:443")},
		{Version: 1, Source: src, Destination: dst},
		{Version: 1},
		{Version: 2, Source: src, Destination: dst, ChainID: "chain", Hops: 3, Authority: "example.com"},
		{Version: 2, ChainID: "local", Hops: 1},
	} {
		b := mustAppend(f, h)
		f.Add(append(b, "hello"...), uint8(1))
		f.Add(b, uint8(0))
		f.Add(b[:len(b)/2], uint8(3))
	}
	f.Add([]byte(""), uint8(1))
	f.Add([]byte("PROXY "), uint8(16))
	f.Add([]byte(v2Sig), uint8(17))
	f.Add([]byte("PROXY UNKNOWN\r\n"), uint8(1))
	f.Add([]byte("PROXY "+strings.Repeat("x", 200)), uint8(1))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"), uint8(0))
	f.Add(v2Raw(0x21, 0x11, []byte{1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2, 0xE0, 0, 1, 9}), uint8(5))
	f.Add(v2Raw(0x21, 0x31, make([]byte, 216)), uint8(1))
	f.Add([]byte("\r\n\r\n\x00\r\nQUIT\n 1\x00\x00001"), uint8('-'))

	f.Fuzz(func(t *testing.T, data []byte, mode uint8) {
		trusted := mode&1 != 0
		chunk := int(mode>>1) & 7
		var end error
		if mode&16 != 0 {
			end = os.ErrDeadlineExceeded
		}
		peer := untrustedPeer
		if trusted {
			peer = trustedPeer
		}
		a := &ProxyAcceptor{Allow: loopbackAllow}
		conn := &memConn{data: bytes.Clone(data), chunk: chunk, end: end}
		info, rest, err := a.Accept(conn, peer)

		if !conn.deadlineCleared() {
			t.Fatal("deadline not cleared")
		}
		var re *ProxyRejectError
		if errors.As(err, &re) && (info != nil || rest != nil) {
			t.Fatalf("rejection with info=%+v rest=%q", info, rest)
		}
		if info != nil {
			if !trusted || err != nil {
				t.Fatalf("info %+v for trusted=%v err=%v", info, trusted, err)
			}
			// Small reads leave part of the input unread in conn.
			if !bytes.HasSuffix(data, append(bytes.Clone(rest), conn.data...)) {
				t.Fatalf("rest %q + unread %q is not the end of the input", rest, conn.data)
			}
		} else if re == nil {
			if trusted {
				t.Fatalf("trusted peer got neither a header nor a rejection: err %v", err)
			}
			if !bytes.Equal(data, append(bytes.Clone(rest), conn.data...)) {
				t.Fatalf("direct client: rest %q + unread %q is not the input", rest, conn.data)
			}
		}
		if info == nil {
			return
		}

		again, err := (ProxyHeader{Version: 2, Source: info.Source, Destination: info.Destination, ChainID: info.ChainID, Hops: info.Hops, Authority: info.Authority, TraceParent: info.TraceParent, TLVs: info.TLVs}).AppendTo(nil)
		if err != nil {
			t.Fatalf("re-encoding %+v: %v", info, err)
		}
		info2, rest2, err := a.Accept(&memConn{data: again}, trustedPeer)
		if err != nil || rest2 != nil {
			t.Fatalf("re-decoding %+v: rest %q err %v", info, rest2, err)
		}
		if !reflect.DeepEqual(*info2, *info) {
			t.Fatalf("round trip: %+v became %+v", info, info2)
		}
		// The library's own reader must agree with our framing.
		if _, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(again))); err != nil {
			t.Fatalf("library refuses our header: %v", err)
		}
	})
}

func BenchmarkAcceptV2(b *testing.B) {
	hdr := mustAppend(b, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:40000"), Destination: netip.MustParseAddrPort("203.0.113.9:443"), ChainID: "chain-1", Hops: 2, Authority: "example.com"})
	msg := append(hdr, "hello"...)
	a := &ProxyAcceptor{Allow: loopbackAllow}
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := a.Accept(&memConn{data: msg}, trustedPeer); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAcceptDirectClient(b *testing.B) {
	msg := []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	a := &ProxyAcceptor{Allow: loopbackAllow}
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := a.Accept(&memConn{data: msg}, untrustedPeer); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendToV2(b *testing.B) {
	h := ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:40000"), Destination: netip.MustParseAddrPort("203.0.113.9:443"), ChainID: "chain-1", Hops: 2, Authority: "example.com"}
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = h.AppendTo(buf[:0]); err != nil {
			b.Fatal(err)
		}
	}
}

// TestAppendToRefusesAHeaderNoReceiverAccepts: go-proxyproto and our own
// acceptor refuse a v2 header longer than proxyproto.MaxV2HeaderSize, so
// sending one would only get the connection rejected at the next hop.
func TestAppendToRefusesAHeaderNoReceiverAccepts(t *testing.T) {
	src := netip.MustParseAddrPort("1.2.3.4:5")
	if _, err := (ProxyHeader{Version: 2, Source: src, Authority: strings.Repeat("a", 4000)}).AppendTo(nil); err != nil {
		t.Fatalf("a 4000-byte authority: %v", err)
	}
	_, err := ProxyHeader{Version: 2, Source: src, Authority: strings.Repeat("a", 4100)}.AppendTo(nil)
	if err == nil || !strings.Contains(err.Error(), "more than receivers accept") {
		t.Fatalf("a 4100-byte authority: %v", err)
	}
}
