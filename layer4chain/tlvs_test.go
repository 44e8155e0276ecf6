package layer4chain

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"hash/crc32"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// headerBackend reads the PROXY header each connection starts with, as a
// backend that understands PROXY v2 would, reports it, and echoes the rest.
func headerBackend(t *testing.T) (*chaintest.Backend, <-chan *proxyproto.Header) {
	headers := make(chan *proxyproto.Header, 4)
	b := chaintest.NewBackend(t, func(c *net.TCPConn) {
		br := bufio.NewReader(c)
		h, err := proxyproto.Read(br)
		if err != nil {
			t.Errorf("backend: reading the PROXY header: %v", err)
			return
		}
		headers <- h
		// Through a plain Writer: TCPConn.ReadFrom would splice and keep
		// a pipe's two descriptors pooled past the test's leak check.
		io.Copy(struct{ io.Writer }{c}, br)
	})
	return b, headers
}

func receivedHeader(t *testing.T, ch <-chan *proxyproto.Header) *proxyproto.Header {
	t.Helper()
	select {
	case h := <-ch:
		return h
	case <-time.After(5 * time.Second):
		t.Fatal("the backend received no header")
		return nil
	}
}

// tlvValues maps a header's TLV types to their values.
func tlvValues(t *testing.T, h *proxyproto.Header) map[proxyproto.PP2Type]string {
	t.Helper()
	tlvs, err := h.TLVs()
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[proxyproto.PP2Type]string)
	for _, tlv := range tlvs {
		if _, dup := m[tlv.Type]; dup {
			t.Fatalf("TLV 0x%02X sent twice", byte(tlv.Type))
		}
		m[tlv.Type] = string(tlv.Value)
	}
	return m
}

// forwardingHop trusts loopback, forwards the listed TLVs and sends v2.
func forwardingHop(t *testing.T, upstream string, forward []byte, crc bool) *hop {
	return startHop(t, &Proxy{Balancer: balancerFor(t, upstream), EmitVersion: 2, ForwardTLVs: forward, EmitCRC32C: crc,
		Accept: &ProxyAcceptor{Allow: loopbackAllow}}, nil)
}

// A load balancer that is not a chain hop tags its connections with a
// custom TLV (0xE5) and a debugging one (0xE6). Two hops that forward 0xE5
// carry it to the backend beside the chain ID and the hop count; 0xE6,
// listed nowhere, stops at the first hop.
func TestForwardedTLVCrossesTwoHopsAndAnUnlistedOneStops(t *testing.T) {
	checkEngineLeaks(t)
	backend, headers := headerBackend(t)
	inner := forwardingHop(t, backend.Addr, []byte{0xE5}, false)
	outer := forwardingHop(t, inner.Addr, []byte{0xE5}, false)

	c := chaintest.Dial(t, outer.Addr)
	hdr := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:443"), ChainID: "lb-1234", Authority: "shop.example",
		TLVs: []proxyproto.TLV{{Type: 0xE5, Value: []byte("tenant=42")}, {Type: 0xE6, Value: []byte("debug")}}})
	if _, err := c.Write(append(hdr, "ping\n"...)); err != nil {
		t.Fatal(err)
	}
	echo(t, c, "ping\n")

	h := receivedHeader(t, headers)
	got := tlvValues(t, h)
	if got[0xE5] != "tenant=42" {
		t.Fatalf("TLV 0xE5 at the backend: %q, want tenant=42 (all: %q)", got[0xE5], got)
	}
	if v, ok := got[0xE6]; ok {
		t.Fatalf("unlisted TLV 0xE6 reached the backend: %q", v)
	}
	if got[proxyproto.PP2_TYPE_UNIQUE_ID] != "lb-1234" || got[proxyproto.PP2_TYPE_AUTHORITY] != "shop.example" {
		t.Fatalf("chain ID %q, authority %q; want lb-1234, shop.example", got[proxyproto.PP2_TYPE_UNIQUE_ID], got[proxyproto.PP2_TYPE_AUTHORITY])
	}
	// The load balancer's header counts as one hop, then outer and inner.
	if hops := got[TLVHops]; hops != "\x03" {
		t.Fatalf("hop count %q, want 3", hops)
	}
	if src := h.SourceAddr.String(); src != "198.51.100.7:4000" {
		t.Fatalf("source at the backend %s", src)
	}
	c.Close()
	outer.reason(t)
	inner.reason(t)
}

// A hop that forwards nothing still sends the chain's own TLVs and none of
// the previous hop's others.
func TestNoForwardTLVsSendsOnlyTheChainsOwn(t *testing.T) {
	checkEngineLeaks(t)
	backend, headers := headerBackend(t)
	h := forwardingHop(t, backend.Addr, nil, false)
	c := chaintest.Dial(t, h.Addr)
	hdr := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		TLVs: []proxyproto.TLV{{Type: proxyproto.PP2_TYPE_SSL, Value: []byte{1, 0, 0, 0, 0}}, {Type: 0xE5, Value: []byte("x")}}})
	if _, err := c.Write(append(hdr, "x"...)); err != nil {
		t.Fatal(err)
	}
	echo(t, c, "x")
	got := tlvValues(t, receivedHeader(t, headers))
	for typ := range got {
		if typ != proxyproto.PP2_TYPE_UNIQUE_ID && typ != TLVHops {
			t.Fatalf("TLV 0x%02X sent by a hop that forwards none (all: %q)", byte(typ), got)
		}
	}
	c.Close()
	h.reason(t)
}

// The header a hop sends with EmitCRC32C carries a checksum that an
// independent computation (the spec's: CRC32C of the header with the
// value zeroed) agrees with, and the next hop accepts it.
func TestCRC32CIsSentAndVerified(t *testing.T) {
	checkEngineLeaks(t)
	raw := make(chan []byte, 1)
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		b := make([]byte, v2FixedLen)
		if _, err := io.ReadFull(c, b); err != nil {
			return
		}
		rest := make([]byte, binary.BigEndian.Uint16(b[14:16]))
		if _, err := io.ReadFull(c, rest); err != nil {
			return
		}
		raw <- append(b, rest...)
	})
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr), EmitVersion: 2, EmitCRC32C: true}, nil)
	c := chaintest.Dial(t, h.Addr)
	io.WriteString(c, "x")
	var hdr []byte
	select {
	case hdr = <-raw:
	case <-time.After(5 * time.Second):
		t.Fatal("no header at the backend")
	}
	// The CRC32C TLV is the last one: type, length 4, value.
	tail := hdr[len(hdr)-7:]
	if tail[0] != byte(proxyproto.PP2_TYPE_CRC32C) || tail[1] != 0 || tail[2] != 4 {
		t.Fatalf("header does not end with a CRC32C TLV: % x", tail)
	}
	sent := binary.BigEndian.Uint32(tail[3:])
	zeroed := bytes.Clone(hdr)
	clear(zeroed[len(zeroed)-4:])
	if want := crc32.Checksum(zeroed, crc32.MakeTable(crc32.Castagnoli)); sent != want {
		t.Fatalf("CRC32C sent %08x, computed %08x", sent, want)
	}
	if _, _, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(&memConn{data: bytes.Clone(hdr)}, trustedPeer); err != nil {
		t.Fatalf("our own checksummed header is refused: %v", err)
	}
	c.Close()
	h.reason(t)
}

// A checksummed header changed on the way (one bit of the client's port)
// is refused as malformed, before any dial; so is one whose CRC32C TLV is
// not four bytes.
func TestCorruptedCRC32CIsRejectedAsMalformed(t *testing.T) {
	checkEngineLeaks(t)
	hdr := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:80"), ChainID: "c", Hops: 1, CRC32C: true})
	corrupted := bytes.Clone(hdr)
	corrupted[v2FixedLen+9] ^= 1 // the low byte of the source port
	if _, _, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(&memConn{data: corrupted}, trustedPeer); reasonOf(err) != ProxyRejectMalformed {
		t.Fatalf("corrupted header: err %v, want malformed", err)
	}
	short := libHeader(t, 2, &net.TCPAddr{IP: net.IPv4(198, 51, 100, 7), Port: 1}, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 2},
		proxyproto.TLV{Type: proxyproto.PP2_TYPE_CRC32C, Value: []byte{1, 2}})
	if _, _, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(&memConn{data: short}, trustedPeer); reasonOf(err) != ProxyRejectMalformed {
		t.Fatalf("2-byte CRC32C: err %v, want malformed", err)
	}

	wantMalformedBeforeTheDial(t, &Proxy{Accept: &ProxyAcceptor{Allow: loopbackAllow}}, corrupted, "CRC32C")
}

// wantMalformedBeforeTheDial sends hdr and a byte through a hop made of p
// (its tracker and balancer filled in) and checks that the connection is
// refused as malformed, with mention in the detail, before any dial.
func wantMalformedBeforeTheDial(t *testing.T, p *Proxy, hdr []byte, mention string) {
	t.Helper()
	backend := chaintest.NewEchoBackend(t)
	closed := closedRecords{make(chan RecordInfo, 1)}
	p.Tracker, p.Balancer = NewTracker(), balancerFor(t, backend.Addr)
	p.Tracker.Observer = closed
	h := startHop(t, p, nil)
	c := chaintest.Dial(t, h.Addr)
	c.Write(append(hdr, "x"...))
	if got, _, _ := chaintest.ReadUntilClosed(c, 5*time.Second); len(got) != 0 {
		t.Fatalf("client read %.80q", got)
	}
	info := closedInfo(t, closed)
	if info.Reason != ReasonProxyProtocolRejected || !strings.Contains(info.Detail, mention) {
		t.Fatalf("reason %s, detail %q; want proxy_protocol_rejected naming %s", info.Reason, info.Detail, mention)
	}
	if n := p.Tracker.ProxyRejections(ProxyRejectMalformed); n != 1 || backend.AcceptedCount() != 0 {
		t.Fatalf("malformed rejections %d, backend dials %d; want 1 and 0", n, backend.AcceptedCount())
	}
}

// The types a header generates itself cannot be given as extra TLVs: the
// next hop would receive them twice.
func TestAppendToRefusesGeneratedTLVs(t *testing.T) {
	for _, typ := range []proxyproto.PP2Type{proxyproto.PP2_TYPE_UNIQUE_ID, proxyproto.PP2_TYPE_AUTHORITY, proxyproto.PP2_TYPE_CRC32C, TLVHops, TLVTrace} {
		_, err := ProxyHeader{Version: 2, TLVs: []proxyproto.TLV{{Type: typ, Value: []byte{1}}}}.AppendTo(nil)
		if err == nil || !IsGeneratedTLV(byte(typ)) {
			t.Fatalf("TLV 0x%02X given as extra: err %v", byte(typ), err)
		}
	}
	if IsGeneratedTLV(0xE5) || IsGeneratedTLV(byte(proxyproto.PP2_TYPE_SSL)) {
		t.Fatal("0xE5 or SSL taken for a generated type")
	}
}

// handshake runs a TLS handshake over loopback and returns the server's
// view of the session.
func handshake(t *testing.T, server, client *tls.Config) tls.ConnectionState {
	t.Helper()
	s, c, _ := tcpPair(t)
	ts, tc := tls.Server(s, server), tls.Client(c, client)
	done := make(chan error, 1)
	go func() { done <- tc.Handshake() }()
	if err := ts.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return ts.ConnectionState()
}

// The TLVs describing a terminated session read back, through
// go-proxyproto's own SSL parser, as what the handshake agreed: ALPN,
// version, cipher, and the client certificate's CN only when verified.
func TestTLSSessionTLVsDescribeTheHandshake(t *testing.T) {
	ca := chaintest.NewCA(t, "test CA")
	serverCert, clientCert := ca.Issue(t, "hop.test", "hop.test"), ca.Issue(t, "client-7")
	for _, tc := range []struct {
		name         string
		clientAuth   tls.ClientAuthType
		clientCerts  []tls.Certificate
		wantVerified bool
		wantCN       string
	}{
		{"verified client certificate", tls.RequireAndVerifyClientCert, []tls.Certificate{clientCert}, true, "client-7"},
		{"no client certificate", tls.VerifyClientCertIfGiven, nil, false, ""},
		{"unverified client certificate", tls.RequireAnyClientCert, []tls.Certificate{clientCert}, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs := handshake(t,
				&tls.Config{Certificates: []tls.Certificate{serverCert}, ClientAuth: tc.clientAuth, ClientCAs: ca.Pool, NextProtos: []string{"h2"}},
				&tls.Config{ServerName: "hop.test", RootCAs: ca.Pool, Certificates: tc.clientCerts, NextProtos: []string{"h2", "http/1.1"}})
			b := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:1"), TLVs: TLSSessionTLVs(&cs)})
			h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(b)))
			if err != nil {
				t.Fatal(err)
			}
			tlvs, _ := h.TLVs()
			if got := tlvValues(t, h)[proxyproto.PP2_TYPE_ALPN]; got != "h2" {
				t.Fatalf("ALPN %q, want h2", got)
			}
			ssl, ok := tlvparse.FindSSL(tlvs)
			if !ok || !ssl.ClientSSL() {
				t.Fatalf("no well-formed SSL TLV with the SSL flag in %q", tlvs)
			}
			if ssl.Verified() != tc.wantVerified || ssl.ClientCertConn() != (tc.clientCerts != nil) {
				t.Fatalf("verified %v, cert on connection %v; want %v, %v", ssl.Verified(), ssl.ClientCertConn(), tc.wantVerified, tc.clientCerts != nil)
			}
			if v, _ := ssl.SSLVersion(); v != "TLSv1.3" {
				t.Fatalf("version %q, want TLSv1.3", v)
			}
			if c, _ := ssl.SSLCipher(); c != tls.CipherSuiteName(cs.CipherSuite) || c == "" {
				t.Fatalf("cipher %q, want %q", c, tls.CipherSuiteName(cs.CipherSuite))
			}
			if cn, _ := ssl.ClientCN(); cn != tc.wantCN {
				t.Fatalf("CN %q, want %q", cn, tc.wantCN)
			}
		})
	}
	if TLSSessionTLVs(nil) != nil {
		t.Fatal("TLVs for no session")
	}
}

// A received header whose forwarded TLVs would not fit in the v2 header
// this hop sends (with the chain ID it makes, the header had none) is
// refused before any dial; it used to dial, send nothing and close as
// connect_failed.
func TestForwardedTLVsTooLongForTheNextHeaderAreRefusedBeforeTheDial(t *testing.T) {
	checkEngineLeaks(t)
	hdr := mustAppend(t, ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:443"),
		TLVs:        []proxyproto.TLV{{Type: 0xE5, Value: bytes.Repeat([]byte("x"), 4060)}}})
	wantMalformedBeforeTheDial(t, &Proxy{EmitVersion: 2, ForwardTLVs: []byte{0xE5}, Accept: &ProxyAcceptor{Allow: loopbackAllow}},
		hdr, "forwarded TLVs")
}
