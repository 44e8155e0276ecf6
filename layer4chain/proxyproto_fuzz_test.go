package layer4chain

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"reflect"
	"testing"

	"github.com/pires/go-proxyproto"
)

// The fuzz targets of this file run in CI for a fixed time each (.ci/run);
// their seed corpora are in testdata/fuzz/<target>/, and plain `go test`
// replays those seeds as regression tests. FuzzProxyAcceptor (in
// proxyproto_test.go) feeds Accept arbitrary bytes; the targets here build
// well-framed v2 headers around arbitrary TLVs, so the fuzzer spends its
// time in TLV decoding rather than on signatures, and check the header we
// emit against go-proxyproto's reader and our own.

// v2Header frames addrs and tlvs as a v2 header with the given
// version/command and family bytes. The length field is 16 bits: what does
// not fit is cut from the TLVs.
func v2Header(cmd, fam byte, addrs, tlvs []byte) []byte {
	body := append(bytes.Clone(addrs), tlvs...)
	if len(body) > 0xFFFF {
		body = body[:0xFFFF]
	}
	hdr := append([]byte(v2Sig), cmd, fam, 0, 0)
	binary.BigEndian.PutUint16(hdr[14:], uint16(len(body)))
	return append(hdr, body...)
}

// libDecode decodes hdr with go-proxyproto alone, TLVs included.
func libDecode(hdr []byte) (*proxyproto.Header, []proxyproto.TLV, error) {
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(hdr)))
	if err != nil {
		return nil, nil, err
	}
	tlvs, err := h.TLVs()
	return h, tlvs, err
}

// firstTLV returns the value of the first TLV of type typ.
func firstTLV(tlvs []proxyproto.TLV, typ proxyproto.PP2Type) ([]byte, bool) {
	for _, t := range tlvs {
		if t.Type == typ {
			return t.Value, true
		}
	}
	return nil, false
}

// FuzzAcceptV2TLVs gives Accept a complete v2 header with arbitrary
// command, family, address block and TLVs, followed by payload, from a
// trusted or an untrusted peer, in reads of various sizes. Invariants:
//   - an untrusted peer never yields info: a whole signature is refused as
//     untrusted, and nothing read is handed back;
//   - a trusted peer gets info or a malformed rejection (the header is
//     complete, so neither missing nor timeout);
//   - with info, rest is exactly the start of the payload: it never
//     overlaps the header and loses no payload byte;
//   - our decoding agrees with go-proxyproto's: we accept what it accepts,
//     except for the refusals the chain needs (a chain ID over 128 bytes, a
//     hop count that is not one byte, a trace parent that is not 9 bytes
//     with a non-zero span ID, a duplicate chain TLV), and it accepts
//     what we accept, except PROXY over UNSPEC, which we take as LOCAL.
func FuzzAcceptV2TLVs(f *testing.F) {
	ipv4 := []byte{198, 51, 100, 7, 203, 0, 113, 9, 0x9c, 0x40, 0x01, 0xbb}
	tlv := func(typ byte, value ...byte) []byte {
		return append([]byte{typ, byte(len(value) >> 8), byte(len(value))}, value...)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	ssl := tlv(0x20, cat([]byte{0x07, 0, 0, 0, 0}, tlv(0x21, []byte("TLSv1.3")...), tlv(0x22, []byte("client.example")...))...)
	for _, tlvs := range [][]byte{
		nil,
		cat(tlv(0x05, []byte("chain-1")...), tlv(0xE0, 3), tlv(0x02, []byte("example.com")...)),
		cat(tlv(0x01, []byte("h2")...), ssl, tlv(0x03, 0, 0, 0, 0), tlv(0x04), tlv(0x30, []byte("ns")...), tlv(0xE5, 1, 2)),
		cat(tlv(0x05, []byte("0123456789abcdef0123456789abcdef")...), tlv(0xE0, 1), tlv(0xE1, 1, 2, 3, 4, 5, 6, 7, 8, 1)),
		tlv(0xE1, 1, 2, 3, 4, 5, 6, 7, 8),
		tlv(0xE1, 0, 0, 0, 0, 0, 0, 0, 0, 1),
		cat(tlv(0xE1, 1, 2, 3, 4, 5, 6, 7, 8, 1), tlv(0xE1, 1, 2, 3, 4, 5, 6, 7, 8, 0)),
		cat(tlv(0x05, []byte("a")...), tlv(0x05, []byte("b")...)),
		tlv(0xE0, 1, 2),
		tlv(0x05, bytes.Repeat([]byte{'x'}, 129)...),
		{0x05, 0x00, 0x09, 'c', 'u', 't'},
	} {
		for mode := uint8(0); mode < 4; mode++ {
			f.Add(byte(0x21), byte(0x11), ipv4, tlvs, []byte("hello"), mode)
		}
	}
	f.Add(byte(0x20), byte(0x00), []byte(nil), tlv(0x05, []byte("local")...), []byte(nil), uint8(1))
	f.Add(byte(0x21), byte(0x00), []byte(nil), tlv(0x05, []byte("unspec")...), []byte("x"), uint8(1))
	f.Add(byte(0x21), byte(0x21), make([]byte, 36), tlv(0xE0, 9), []byte("six"), uint8(3))
	f.Add(byte(0x21), byte(0x31), make([]byte, 216), []byte(nil), []byte("unix"), uint8(1))

	f.Fuzz(func(t *testing.T, cmd, fam byte, addrs, tlvs, payload []byte, mode uint8) {
		trusted := mode&1 != 0
		peer := untrustedPeer
		if trusted {
			peer = trustedPeer
		}
		hdr := v2Header(cmd, fam, addrs, tlvs)
		conn := &memConn{data: append(bytes.Clone(hdr), payload...), chunk: int(mode>>1) & 7}
		info, rest, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(conn, peer)

		if !conn.deadlineCleared() {
			t.Fatal("deadline not cleared")
		}
		var re *ProxyRejectError
		rejected := errors.As(err, &re)
		if err != nil && !rejected {
			t.Fatalf("a complete header ended in %v, not a rejection", err)
		}
		if rejected && (info != nil || rest != nil) {
			t.Fatalf("rejection with info=%+v rest=%q", info, rest)
		}
		if !trusted {
			if !rejected || re.Reason != ProxyRejectUntrusted {
				t.Fatalf("untrusted peer with a v2 signature: info=%+v err=%v, want an untrusted rejection", info, err)
			}
			return
		}
		if rejected && re.Reason != ProxyRejectMalformed {
			t.Fatalf("trusted peer with a complete header rejected as %s: %v", re.Reason, err)
		}
		if info != nil && !bytes.Equal(append(bytes.Clone(rest), conn.data...), payload) {
			t.Fatalf("rest %q + unread %q is not the payload %q", rest, conn.data, payload)
		}

		lib, libTLVs, libErr := libDecode(hdr)
		unspecProxy := cmd == v2CmdProxy && fam&0xF0 == 0
		switch {
		case info != nil && libErr != nil && !unspecProxy:
			t.Fatalf("we accepted %+v, go-proxyproto refuses the header: %v", info, libErr)
		case info == nil && libErr == nil &&
			!errors.Is(err, errChainIDTooLong) && !errors.Is(err, errChainIDNotText) && !errors.Is(err, errAuthorityNotText) && !errors.Is(err, errBadHops) && !errors.Is(err, errDuplicateTLV) &&
			!errors.Is(err, errBadTraceParent) &&
			!errors.Is(err, errBadCRC): // go-proxyproto does not check the CRC32C
			t.Fatalf("go-proxyproto accepts the header, we refused it: %v", err)
		}
		if info == nil {
			return
		}
		if len(info.ChainID) > maxChainIDLen || info.Hops < 0 || info.Hops > 255 {
			t.Fatalf("out of range: %+v", info)
		}
		if info.Local == info.Source.IsValid() || info.Source.Addr().Is4In6() || info.Destination.Addr().Is4In6() {
			t.Fatalf("addresses: %+v", info)
		}
		if libErr != nil {
			return // PROXY over UNSPEC, which go-proxyproto refuses
		}
		if id, _ := firstTLV(libTLVs, proxyproto.PP2_TYPE_UNIQUE_ID); string(id) != info.ChainID {
			t.Fatalf("chain ID %q, go-proxyproto reads %q", info.ChainID, id)
		}
		if auth, _ := firstTLV(libTLVs, proxyproto.PP2_TYPE_AUTHORITY); string(auth) != info.Authority {
			t.Fatalf("authority %q, go-proxyproto reads %q", info.Authority, auth)
		}
		if tp, ok := firstTLV(libTLVs, TLVTrace); ok != info.TraceParent.IsValid() || (ok && string(tp) != string(info.TraceParent.appendValue(nil))) {
			t.Fatalf("trace parent %+v, go-proxyproto reads %x (present %v)", info.TraceParent, tp, ok)
		}
		if !info.Local {
			sip, _, _ := lib.IPs()
			sport, _, _ := lib.Ports()
			src, _ := netip.AddrFromSlice(sip)
			if netip.AddrPortFrom(src.Unmap(), uint16(sport)) != info.Source {
				t.Fatalf("source %s, go-proxyproto reads %s", info.Source, lib.SourceAddr)
			}
		}
	})
}

// FuzzProxyHeaderRoundTrip encodes arbitrary headers with AppendTo and
// decodes them with go-proxyproto and with Accept: both must read back the
// source, destination, chain ID, hop count, authority and trace parent that were sent,
// after the documented reconciliation (IPv4-mapped addresses unmapped,
// zones dropped, a missing destination sent as the unspecified address of
// the source's family). AppendTo may refuse only what it documents.
func FuzzProxyHeaderRoundTrip(f *testing.F) {
	v4, v6 := []byte{198, 51, 100, 7}, netip.MustParseAddr("2001:db8::9").AsSlice()
	mapped := netip.AddrFrom16(netip.MustParseAddr("203.0.113.9").As16()).AsSlice()
	f.Add(uint8(2), v4, uint16(40000), []byte{203, 0, 113, 9}, uint16(443), "", "chain-1", 2, "example.com", uint64(0), byte(0))
	f.Add(uint8(2), v4, uint16(40000), v6, uint16(443), "", "mixed", 255, "", uint64(0x0102030405060708), byte(1))
	f.Add(uint8(2), mapped, uint16(1), v4, uint16(2), "", "", 0, "", uint64(1), byte(0))
	f.Add(uint8(2), v6, uint16(1), []byte(nil), uint16(0), "eth0", "zoned", 1, "a.example", uint64(0), byte(1))
	f.Add(uint8(2), []byte(nil), uint16(0), []byte(nil), uint16(0), "", "local", 1, "", uint64(0), byte(0))
	f.Add(uint8(1), v4, uint16(40000), v6, uint16(443), "", "", 0, "", uint64(7), byte(1))
	f.Add(uint8(1), []byte(nil), uint16(0), []byte(nil), uint16(0), "", "", 0, "", uint64(0), byte(0))
	f.Add(uint8(2), v4, uint16(1), v4, uint16(2), "", string(bytes.Repeat([]byte{'x'}, 129)), 256, "", uint64(0), byte(0))
	f.Add(uint8(3), v4, uint16(1), v4, uint16(2), "", "", -1, "", uint64(0), byte(0))

	f.Fuzz(func(t *testing.T, version uint8, srcIP []byte, sport uint16, dstIP []byte, dport uint16, zone, chainID string, hops int, authority string, spanID uint64, flags byte) {
		addrPort := func(ip []byte, port uint16) netip.AddrPort {
			a, ok := netip.AddrFromSlice(ip)
			if !ok {
				return netip.AddrPort{}
			}
			if a.Is6() && !a.Is4In6() && zone != "" {
				a = a.WithZone(zone)
			}
			return netip.AddrPortFrom(a, port)
		}
		var parent TraceParent
		binary.BigEndian.PutUint64(parent.SpanID[:], spanID)
		parent.Flags = flags
		h := ProxyHeader{Version: int(version), Source: addrPort(srcIP, sport), Destination: addrPort(dstIP, dport),
			ChainID: chainID, Hops: hops, Authority: authority, TraceParent: parent}

		prefix := []byte("payload before")
		out, err := h.AppendTo(bytes.Clone(prefix))
		refusable := (h.Version != 1 && h.Version != 2) ||
			(h.Version == 2 && (len(chainID) > maxChainIDLen || checkChainIDText([]byte(chainID)) != nil ||
				checkPrintable([]byte(authority), errAuthorityNotText) != nil || hops < 0 || hops > 255 ||
				// addresses, the trace parent and TLV framing take under 80 bytes
				len(authority)+len(chainID) > int(proxyproto.MaxV2HeaderSize)-80))
		if err != nil {
			if !refusable {
				t.Fatalf("AppendTo refused %+v: %v", h, err)
			}
			if !bytes.Equal(out, prefix) {
				t.Fatalf("AppendTo failed and changed dst: %q", out)
			}
			return
		}
		if h.Version != 1 && h.Version != 2 {
			t.Fatalf("AppendTo accepted version %d", h.Version)
		}
		if !bytes.HasPrefix(out, prefix) {
			t.Fatalf("AppendTo changed the bytes before it: %q", out)
		}
		hdr := out[len(prefix):]
		if h.Version == 2 && len(hdr)-v2FixedLen > int(proxyproto.MaxV2HeaderSize) {
			t.Fatalf("AppendTo emitted a header of %d bytes, longer than receivers accept", len(hdr))
		}

		want := ProxyInfo{Local: !h.Source.IsValid()}
		if h.Source.IsValid() {
			want.Source = netip.AddrPortFrom(h.Source.Addr().Unmap().WithZone(""), h.Source.Port())
			want.Destination = netip.AddrPortFrom(h.Destination.Addr().Unmap().WithZone(""), h.Destination.Port())
			if !h.Destination.IsValid() {
				unspec := netip.IPv6Unspecified()
				if want.Source.Addr().Is4() {
					unspec = netip.IPv4Unspecified()
				}
				want.Destination = netip.AddrPortFrom(unspec, 0)
			}
		}
		if h.Version == 2 {
			want.ChainID, want.Hops, want.Authority = chainID, hops, authority
			if parent.IsValid() {
				want.TraceParent = parent
			}
		}

		// go-proxyproto reads what was sent.
		lib, tlvs, err := libDecode(hdr)
		if err != nil {
			t.Fatalf("go-proxyproto refuses %q (from %+v): %v", hdr, h, err)
		}
		if int(lib.Version) != h.Version {
			t.Fatalf("go-proxyproto reads version %d", lib.Version)
		}
		if !want.Local {
			sip, dip, ok := lib.IPs()
			sp, dp, _ := lib.Ports()
			s, _ := netip.AddrFromSlice(sip)
			d, _ := netip.AddrFromSlice(dip)
			got := [2]netip.AddrPort{netip.AddrPortFrom(s.Unmap(), uint16(sp)), netip.AddrPortFrom(d.Unmap(), uint16(dp))}
			if !ok || got != [2]netip.AddrPort{want.Source, want.Destination} {
				t.Fatalf("go-proxyproto reads %v, sent %+v", got, want)
			}
		} else if h.Version == 2 && !lib.Command.IsLocal() {
			t.Fatalf("no source, and the v2 header is not LOCAL: %q", hdr)
		}
		// A TLV is sent when its value is set: "" and a hop count of 0 are not.
		for _, sent := range []struct {
			typ   proxyproto.PP2Type
			value string
			set   bool
		}{
			{proxyproto.PP2_TYPE_UNIQUE_ID, want.ChainID, want.ChainID != ""},
			{proxyproto.PP2_TYPE_AUTHORITY, want.Authority, want.Authority != ""},
			{TLVHops, string([]byte{byte(want.Hops)}), want.Hops != 0},
			{TLVTrace, string(want.TraceParent.appendValue(nil)), want.TraceParent.IsValid()},
		} {
			got, ok := firstTLV(tlvs, sent.typ)
			if ok != sent.set || (ok && string(got) != sent.value) {
				t.Fatalf("TLV %#x: go-proxyproto reads %q (present %v), sent %q (set %v)", sent.typ, got, ok, sent.value, sent.set)
			}
		}

		// And so do we, with nothing left over.
		conn := &memConn{data: bytes.Clone(hdr)}
		info, rest, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(conn, trustedPeer)
		if err != nil || rest != nil || len(conn.data) != 0 {
			t.Fatalf("Accept of our own header %q: rest %q, unread %q, err %v", hdr, rest, conn.data, err)
		}
		if !reflect.DeepEqual(*info, want) {
			t.Fatalf("round trip: sent %+v, read %+v", want, *info)
		}
	})
}
