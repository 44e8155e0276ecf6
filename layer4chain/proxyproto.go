package layer4chain

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/pires/go-proxyproto"
)

// TLVHops is the custom PP2 TLV type (in the 0xE0–0xEF application range)
// carrying the hop count. Its value is one byte, so a chain can count up to
// 255 hops; loop detection needs no more than that.
const TLVHops = proxyproto.PP2_TYPE_MIN_CUSTOM

// maxChainIDLen is the limit the PROXY protocol spec (section 2.2.7) puts on
// PP2_TYPE_UNIQUE_ID. A longer value would be refused by conforming receivers
// such as HAProxy, so it is refused here on both sides.
const maxChainIDLen = 128

// Signatures as strings so that prefix checks compare without allocating.
// v2Sig is the same 12 bytes as proxyproto.SIGV2 (a test checks it); v1Sig
// includes the space because "PROXY" alone is a plausible start of other
// protocols' text, while the spec requires exactly "PROXY ".
const (
	v1Sig = "PROXY "
	v2Sig = "\r\n\r\n\x00\r\nQUIT\n"
)

// v2 version/command and family bytes that decodeHeader looks at itself.
const (
	v2CmdLocal  = 0x20
	v2CmdProxy  = 0x21
	v2FamUnspec = 0x00
)

const (
	// v1MaxLen is the spec's worst-case v1 line length, CRLF included.
	v1MaxLen = 107
	// v2FixedLen is the v2 signature, version/command, family and length.
	v2FixedLen = 16
	// acceptBufSize holds any v1 header and any v2 header for TCP over IPv4 or
	// IPv6 with the chain TLVs, so the common path needs this one buffer only.
	acceptBufSize = 256
	// DefaultProxyTimeout applies when ProxyAcceptor.Timeout is not positive.
	DefaultProxyTimeout = 3 * time.Second
	// maxEmptyReads bounds a reader that keeps returning (0, nil), which
	// io.Reader discourages but does not forbid; without a bound Accept could
	// spin until the deadline on a broken reader that ignores deadlines.
	maxEmptyReads = 100
)

// ProxyInfo is what a PROXY header said about a connection.
type ProxyInfo struct {
	// Source is the original client. Zero when the header is LOCAL or UNKNOWN
	// (or carries a family with no IP address, such as AF_UNIX). IPv4 addresses
	// sent as IPv4-mapped IPv6 come back as plain IPv4, so a mixed-family
	// header that AppendTo had to map round-trips to the address it was given.
	Source netip.AddrPort
	// Destination is the address the client connected to; zero like Source.
	Destination netip.AddrPort
	// ChainID is PP2_TYPE_UNIQUE_ID, "" when absent (always absent in v1).
	ChainID string
	// Hops is the TLVHops value, 0 when absent.
	Hops int
	// Authority is PP2_TYPE_AUTHORITY (the SNI the client asked for), "" when absent.
	Authority string
	// Local is set for the LOCAL command, v1 UNKNOWN or v2 PROXY over
	// UNSPEC: the header carries no client address, and the caller should
	// use the socket's peer. TLVs are honoured all the same.
	Local bool
}

// ProxyHeader is what this hop sends to the next one.
type ProxyHeader struct {
	// Version is the PROXY protocol version, 1 or 2.
	Version int
	// Source is the original client. When it is not valid (the zero value),
	// a v1 "PROXY UNKNOWN" line or a v2 LOCAL header without addresses is sent.
	Source netip.AddrPort
	// Destination is the address the client connected to. When it is not
	// valid but Source is, the unspecified address of Source's family with
	// port 0 is sent, so that the client address still reaches the next hop.
	Destination netip.AddrPort
	// ChainID is sent as PP2_TYPE_UNIQUE_ID (v2 only; omitted when ""). The
	// spec caps it at 128 bytes; AppendTo refuses a longer one.
	ChainID string
	// Hops is sent as TLVHops (v2 only; 0..255; omitted when 0, which is also
	// what the receiver reports for an absent TLV).
	Hops int
	// Authority is sent as PP2_TYPE_AUTHORITY (v2 only; omitted when "").
	Authority string
}

// AppendTo appends the encoded header to dst, so the caller can put it in
// front of the first payload bytes and send both in one write (the spec asks
// senders to send the header at once). The fields ChainID, Hops and Authority
// are ignored for version 1, which has no TLVs. On error dst is returned
// unchanged.
//
// Families are reconciled because a header has a single family: an
// IPv4-mapped IPv6 address is unmapped first, and if Source and Destination
// still differ the IPv4 one is sent as IPv4-mapped IPv6 (TCP6 in v1). Zones
// are dropped: the wire format cannot carry them.
func (h ProxyHeader) AppendTo(dst []byte) ([]byte, error) {
	if h.Version != 1 && h.Version != 2 {
		return dst, fmt.Errorf("proxy protocol: unsupported version %d", h.Version)
	}
	if h.Version == 2 {
		if len(h.ChainID) > maxChainIDLen {
			return dst, fmt.Errorf("proxy protocol: chain ID is %d bytes, the limit is %d", len(h.ChainID), maxChainIDLen)
		}
		if h.Hops < 0 || h.Hops > 255 {
			return dst, fmt.Errorf("proxy protocol: hop count %d out of range 0..255", h.Hops)
		}
	}

	var hdr *proxyproto.Header
	if !h.Source.IsValid() {
		// Nil addresses give LOCAL/UNSPEC: v1 formats it as "PROXY UNKNOWN\r\n",
		// v2 as a LOCAL header with no address block (TLVs still allowed).
		hdr = proxyproto.HeaderProxyFromAddrs(byte(h.Version), nil, nil)
	} else {
		src, dstAddr := pairAddrs(h.Source, h.Destination)
		hdr = proxyproto.HeaderProxyFromAddrs(byte(h.Version), tcpAddr(src), tcpAddr(dstAddr))
	}

	if h.Version == 2 {
		// A fixed array keeps the common case off the heap; JoinTLVs only reads it.
		var arr [3]proxyproto.TLV
		var hops [1]byte
		tlvs := arr[:0]
		if h.ChainID != "" {
			tlvs = append(tlvs, proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte(h.ChainID)})
		}
		if h.Authority != "" {
			tlvs = append(tlvs, proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte(h.Authority)})
		}
		if h.Hops != 0 {
			hops[0] = byte(h.Hops)
			tlvs = append(tlvs, proxyproto.TLV{Type: TLVHops, Value: hops[:]})
		}
		if len(tlvs) > 0 {
			if err := hdr.SetTLVs(tlvs); err != nil {
				return dst, fmt.Errorf("proxy protocol: %w", err)
			}
		}
	}

	b, err := hdr.Format()
	if err != nil {
		return dst, fmt.Errorf("proxy protocol: %w", err)
	}
	return append(dst, b...), nil
}

// pairAddrs makes source and destination one family, as a header requires.
// src must be valid.
func pairAddrs(src, dst netip.AddrPort) (netip.AddrPort, netip.AddrPort) {
	s := src.Addr().Unmap().WithZone("")
	d := dst.Addr().Unmap().WithZone("")
	dport := dst.Port()
	if !d.IsValid() {
		if s.Is4() {
			d = netip.IPv4Unspecified()
		} else {
			d = netip.IPv6Unspecified()
		}
		dport = 0
	}
	if s.Is4() != d.Is4() {
		if s.Is4() {
			s = netip.AddrFrom16(s.As16())
		} else {
			d = netip.AddrFrom16(d.As16())
		}
	}
	return netip.AddrPortFrom(s, src.Port()), netip.AddrPortFrom(d, dport)
}

// tcpAddr converts for HeaderProxyFromAddrs, which works on net.Addr. A
// mapped address keeps 16 bytes; the library then picks TCPv6 because the
// other side has no IPv4 form.
func tcpAddr(ap netip.AddrPort) *net.TCPAddr {
	return &net.TCPAddr{IP: ap.Addr().AsSlice(), Port: int(ap.Port())}
}

// ProxyRejectReason says why an incoming PROXY header was refused. The values
// are stable: they are used as log fields and metric labels.
type ProxyRejectReason string

// The reasons a PROXY header is refused.
const (
	// ProxyRejectUntrusted is a header from a peer outside the allow list:
	// honouring it would let any client claim any address.
	ProxyRejectUntrusted ProxyRejectReason = "untrusted"
	// ProxyRejectMalformed is anything after a signature that is not a valid
	// v1/v2 header, including a header cut short by EOF or a read error.
	ProxyRejectMalformed ProxyRejectReason = "malformed"
	// ProxyRejectTimeout is a header that did not arrive whole before the deadline.
	ProxyRejectTimeout ProxyRejectReason = "timeout"
	// ProxyRejectMissing is a trusted peer that sent no header: a trusted hop
	// always sends one, so its absence means a misconfigured chain.
	ProxyRejectMissing ProxyRejectReason = "missing"
)

// ProxyRejectReasons lists every reason, in a stable order, so that stats and
// metrics can report zeros for reasons that have not happened yet.
var ProxyRejectReasons = []ProxyRejectReason{
	ProxyRejectUntrusted, ProxyRejectMalformed, ProxyRejectTimeout, ProxyRejectMissing,
}

// ProxyRejectError is returned when a header is refused; the connection must
// be closed, because the stream position after a refused header is unknown.
type ProxyRejectError struct {
	// Reason classifies the refusal for logs and metrics.
	Reason ProxyRejectReason
	// Err is the underlying cause (a read error, a decode error or a sentinel).
	Err error
}

// Error implements error.
func (e *ProxyRejectError) Error() string {
	if e.Err == nil {
		return "proxy protocol header rejected (" + string(e.Reason) + ")"
	}
	return "proxy protocol header rejected (" + string(e.Reason) + "): " + e.Err.Error()
}

// Unwrap returns the cause, so errors.Is(err, os.ErrDeadlineExceeded) and
// errors.Is(err, io.EOF) see through the rejection.
func (e *ProxyRejectError) Unwrap() error { return e.Err }

// Causes used when there is no underlying error to report.
var (
	errUntrustedHeader = errors.New("PROXY signature from a peer outside the allow list")
	errNoHeader        = errors.New("trusted peer sent data that is not a PROXY header")
	errV1TooLong       = errors.New("v1 header has no line end within 107 bytes")
	errV2TooLong       = errors.New("v2 header length exceeds proxyproto.MaxV2HeaderSize")
	errTrailingBytes   = errors.New("decoder did not consume the whole header")
	errChainIDTooLong  = errors.New("unique ID TLV longer than 128 bytes")
	errBadHops         = errors.New("hop-count TLV is not exactly one byte")
	errDuplicateTLV    = errors.New("duplicate TLV")
)

// ProxyAcceptor reads PROXY headers from previous hops it trusts. It is safe
// for concurrent use once configured.
type ProxyAcceptor struct {
	// Allow lists the peers whose headers are trusted. IPv4-mapped IPv6 peers
	// and prefixes are compared as IPv4.
	Allow []netip.Prefix
	// Timeout is how long the whole header may take; <= 0 means 3s. A
	// trusted peer that sends nothing is rejected (ProxyRejectTimeout) once
	// it has passed. Proxy never waits on an untrusted peer, which may be
	// waiting for the server to speak first: it dials at once and screens
	// the peer's first bytes, and Timeout then bounds only how long a
	// partial signature may stay undecided.
	Timeout time.Duration
}

// timeout is the header's deadline, defaulted.
func (a *ProxyAcceptor) timeout() time.Duration {
	if a == nil || a.Timeout <= 0 {
		return DefaultProxyTimeout
	}
	return a.Timeout
}

// DeadlineReader is what Accept reads from: the client connection (a caddy-l4
// *layer4.Connection in production, a *net.TCPConn in tests).
type DeadlineReader interface {
	io.Reader
	SetReadDeadline(time.Time) error
}

// Accept reads a PROXY header from conn, whose socket peer is peer.
//
// Proxy calls it for trusted peers only. For an untrusted peer it would
// wait up to the timeout on a client that sends nothing; Proxy instead
// dials at once and screens the client's first bytes as they flow (a whole
// signature is rejected as untrusted, a partial one held until it is
// decided, bytes that cannot start one forwarded at once). The untrusted
// outcomes below remain for other callers, and describe the same decisions.
//
// It returns the header's information (nil when the peer sent none and is
// not trusted, i.e. a direct client), and the bytes it read past the header
// (rest), which the caller must forward first, before anything else read
// from conn. rest is nil when there are none. The read deadline is cleared
// (set to the zero time) before returning, on every path.
//
// Bytes are read in chunks, never past a point where a decision can be made,
// and anything read beyond the header is returned in rest rather than kept in
// a hidden buffer. Outcomes:
//
//   - trusted peer, complete header: (info, rest, nil).
//   - trusted peer, bytes that cannot start a signature: ProxyRejectMissing.
//   - deadline before a complete header, trusted (even with zero bytes) or
//     untrusted with a partial signature: ProxyRejectTimeout.
//   - untrusted peer, a full signature ("PROXY " or the 12-byte v2 one):
//     ProxyRejectUntrusted, decided without reading the rest of the header.
//   - untrusted peer, bytes that cannot start a signature: (nil, bytes, nil).
//   - untrusted peer, deadline with zero bytes: (nil, nil, nil), a client that
//     waits for the server to speak first.
//   - a signature followed by an invalid header (decode or TLV error, v1 with
//     no LF within 107 bytes, v2 longer than proxyproto.MaxV2HeaderSize, which
//     the decoder would refuse anyway): ProxyRejectMalformed.
//
// EOF and other read errors (not the deadline) before a decision:
//
//   - trusted peer, zero bytes: ProxyRejectMissing wrapping the error.
//   - trusted peer, part of a header: ProxyRejectMalformed wrapping the error.
//   - untrusted peer: the bytes can no longer become a signature, so it is a
//     direct client whose stream ended: (nil, bytes read, err) with err
//     unwrapped (io.EOF for a close). rest is nil with zero bytes; otherwise
//     it holds what the client sent before the error, for a caller that
//     forwards data before a half-close.
//
// So err is either a *ProxyRejectError (close the connection), an error from
// conn itself for an untrusted peer, or an error from SetReadDeadline.
func (a *ProxyAcceptor) Accept(conn DeadlineReader, peer netip.Addr) (info *ProxyInfo, rest []byte, err error) {
	var allow []netip.Prefix
	if a != nil {
		allow = a.Allow
	}
	timeout := a.timeout()
	trusted := isTrusted(allow, peer)

	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		// Clear anyway: a wrapper may have half-applied it.
		_ = conn.SetReadDeadline(time.Time{})
		return nil, nil, err
	}
	// Best effort: if clearing fails the connection is already broken, and
	// the next read reports that more usefully than we could here.
	defer func() { _ = conn.SetReadDeadline(time.Time{}) }()

	buf := make([]byte, 0, acceptBufSize)
	empty := 0
	for {
		if len(buf) == cap(buf) {
			// Only a v2 header longer than the buffer gets here (v1 and the
			// signature fit in acceptBufSize); grow by doubling up to its
			// declared size so that a peer claiming a large header but sending
			// little costs little.
			total := v2FixedLen + int(binary.BigEndian.Uint16(buf[14:16]))
			buf = growTo(buf, min(total, 2*cap(buf)))
		}
		n, rerr := conn.Read(buf[len(buf):cap(buf)])
		if n < 0 || n > cap(buf)-len(buf) {
			// A misbehaving reader must not make us slice out of range.
			n = 0
			if rerr == nil {
				rerr = io.ErrNoProgress
			}
		}
		buf = buf[:len(buf)+n]

		if n > 0 {
			empty = 0
			if info, rest, done, err := decide(buf, trusted); done {
				return info, rest, err
			}
		} else if rerr == nil {
			empty++
			if empty < maxEmptyReads {
				continue
			}
			rerr = io.ErrNoProgress
		}
		if rerr == nil {
			continue
		}

		// No decision yet, so buf is empty or a (partial) PROXY header.
		if errors.Is(rerr, os.ErrDeadlineExceeded) {
			if len(buf) == 0 && !trusted {
				return nil, nil, nil
			}
			return nil, nil, &ProxyRejectError{Reason: ProxyRejectTimeout, Err: rerr}
		}
		switch {
		case !trusted:
			return nil, nilIfEmpty(buf), rerr
		case len(buf) == 0:
			return nil, nil, &ProxyRejectError{Reason: ProxyRejectMissing, Err: rerr}
		default:
			return nil, nil, &ProxyRejectError{Reason: ProxyRejectMalformed, Err: fmt.Errorf("header cut short: %w", rerr)}
		}
	}
}

// decide looks at the bytes read so far. done is false when more bytes are
// needed before anything can be said.
func decide(buf []byte, trusted bool) (info *ProxyInfo, rest []byte, done bool, err error) {
	v1, v2, complete := matchSignature(buf)
	if !v1 && !v2 {
		if trusted {
			return nil, nil, true, &ProxyRejectError{Reason: ProxyRejectMissing, Err: errNoHeader}
		}
		return nil, buf, true, nil
	}
	if !complete {
		return nil, nil, false, nil
	}
	if !trusted {
		return nil, nil, true, &ProxyRejectError{Reason: ProxyRejectUntrusted, Err: errUntrustedHeader}
	}

	var hdrLen int
	if v1 {
		i := bytes.IndexByte(buf[:min(len(buf), v1MaxLen)], '\n')
		switch {
		case i >= 0:
			// The first LF ends the line: the decoder stops there too, and
			// rejects it unless a CR precedes it.
			hdrLen = i + 1
		case len(buf) >= v1MaxLen:
			return nil, nil, true, &ProxyRejectError{Reason: ProxyRejectMalformed, Err: errV1TooLong}
		default:
			return nil, nil, false, nil
		}
	} else {
		if len(buf) < v2FixedLen {
			return nil, nil, false, nil
		}
		length := binary.BigEndian.Uint16(buf[14:16])
		if length > proxyproto.MaxV2HeaderSize {
			// Decided now rather than after reading up to 64 KiB that the
			// decoder is certain to refuse.
			return nil, nil, true, &ProxyRejectError{Reason: ProxyRejectMalformed, Err: errV2TooLong}
		}
		hdrLen = v2FixedLen + int(length)
		if len(buf) < hdrLen {
			return nil, nil, false, nil
		}
	}

	info, err = decodeHeader(buf[:hdrLen])
	if err != nil {
		return nil, nil, true, &ProxyRejectError{Reason: ProxyRejectMalformed, Err: err}
	}
	return info, nilIfEmpty(buf[hdrLen:]), true, nil
}

// matchSignature reports whether buf is a prefix of (or starts with) the v1
// or v2 signature, and whether the whole signature is present. Their first
// bytes differ, so at most one matches.
func matchSignature(buf []byte) (v1, v2, complete bool) {
	if n := min(len(buf), len(v1Sig)); string(buf[:n]) == v1Sig[:n] {
		return true, false, len(buf) >= len(v1Sig)
	}
	if n := min(len(buf), len(v2Sig)); string(buf[:n]) == v2Sig[:n] {
		return false, true, len(buf) >= len(v2Sig)
	}
	return false, false, false
}

// headerDecoder lets decodeHeader reuse its readers: proxyproto.Read needs a
// *bufio.Reader, whose default buffer would otherwise be 4 KiB per connection.
type headerDecoder struct {
	src bytes.Reader
	br  *bufio.Reader
}

// decoderBufSize must hold a whole v1 line: the v1 decoder refuses a line
// that is not already buffered in full.
const decoderBufSize = 512

var decoderPool = sync.Pool{New: func() any {
	d := &headerDecoder{}
	d.br = bufio.NewReaderSize(&d.src, decoderBufSize)
	return d
}}

// decodeHeader decodes exactly one framed header with go-proxyproto and
// turns it into a ProxyInfo.
func decodeHeader(hdr []byte) (*ProxyInfo, error) {
	if len(hdr) >= v2FixedLen && hdr[0] == v2Sig[0] && hdr[12] == v2CmdProxy && hdr[13] == v2FamUnspec {
		// PROXY over UNSPEC is v2's "PROXY UNKNOWN": a sender that does not
		// know the client. The spec lets a receiver accept it with the
		// socket's addresses (HAProxy does) and v1 UNKNOWN is accepted, but
		// go-proxyproto refuses it. Decoded as LOCAL, which carries the
		// same meaning and keeps the TLVs; the byte is restored because hdr
		// is the caller's.
		hdr[12] = v2CmdLocal
		defer func() { hdr[12] = v2CmdProxy }()
	}
	d := decoderPool.Get().(*headerDecoder)
	d.src.Reset(hdr)
	d.br.Reset(&d.src)
	h, err := proxyproto.Read(d.br)
	leftover := d.br.Buffered() + d.src.Len()
	d.src.Reset(nil) // do not keep the connection's buffer alive in the pool
	d.br.Reset(&d.src)
	decoderPool.Put(d)
	if err != nil {
		return nil, err
	}
	if leftover != 0 {
		// Our framing and the decoder disagree; trusting either would
		// misplace the payload boundary.
		return nil, errTrailingBytes
	}

	info := &ProxyInfo{}
	if h.Command.IsLocal() || h.TransportProtocol.IsUnspec() {
		// LOCAL may still carry addresses, but the spec says to ignore them.
		info.Local = true
	} else {
		sip, dip, ok := h.IPs()
		sport, dport, _ := h.Ports()
		s, sok := netip.AddrFromSlice(sip)
		d, dok := netip.AddrFromSlice(dip)
		if ok && sok && dok {
			info.Source = netip.AddrPortFrom(s.Unmap(), uint16(sport))
			info.Destination = netip.AddrPortFrom(d.Unmap(), uint16(dport))
		} else {
			// AF_UNIX: nothing a TCP hop can use as a client address.
			info.Local = true
		}
	}

	tlvs, err := h.TLVs()
	if err != nil {
		return nil, err
	}
	var seenID, seenAuth, seenHops bool
	for _, t := range tlvs {
		switch t.Type {
		case proxyproto.PP2_TYPE_UNIQUE_ID:
			if seenID {
				return nil, fmt.Errorf("%w: unique ID", errDuplicateTLV)
			}
			if len(t.Value) > maxChainIDLen {
				return nil, errChainIDTooLong
			}
			seenID, info.ChainID = true, string(t.Value)
		case proxyproto.PP2_TYPE_AUTHORITY:
			if seenAuth {
				return nil, fmt.Errorf("%w: authority", errDuplicateTLV)
			}
			seenAuth, info.Authority = true, string(t.Value)
		case TLVHops:
			// Duplicates are refused because the hop count drives loop
			// detection and must not be ambiguous.
			if seenHops {
				return nil, fmt.Errorf("%w: hop count", errDuplicateTLV)
			}
			if len(t.Value) != 1 {
				return nil, errBadHops
			}
			seenHops, info.Hops = true, int(t.Value[0])
		}
	}
	return info, nil
}

// isTrusted reports whether any allowed prefix contains peer. Zones and the
// IPv4-mapped form are removed first, because netip.Prefix.Contains never
// matches a zoned address nor an IPv4 address against its mapped form.
func isTrusted(allow []netip.Prefix, peer netip.Addr) bool {
	p := peer.WithZone("").Unmap()
	if !p.IsValid() {
		return false
	}
	for _, pfx := range allow {
		if pa := pfx.Addr(); pa.Is4In6() && pfx.Bits() >= 96 {
			pfx = netip.PrefixFrom(pa.Unmap(), pfx.Bits()-96)
		}
		if pfx.Contains(p) {
			return true
		}
	}
	return false
}

// growTo returns buf with capacity at least c, keeping its contents.
func growTo(buf []byte, c int) []byte {
	if c <= cap(buf) {
		return buf
	}
	nb := make([]byte, len(buf), c)
	copy(nb, buf)
	return nb
}

// nilIfEmpty keeps "no bytes" a single value for callers.
func nilIfEmpty(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return b
}

// screen holds back the first bytes of a client outside the allow list while
// they may still become a PROXY signature. Such a client's header is never
// used, so nobody waits for one: the upstream is dialed at once and the
// server may speak first. But a header sent later must still be refused, and
// none of it may reach the upstream, which would take it for the client's
// own bytes. Only the client→upstream direction uses a screen.
type screen struct {
	// timeout bounds how long a held prefix may take to become a signature
	// or diverge from one, as it bounds a header in Accept.
	timeout time.Duration
	held    [len(v2Sig)]byte
	n       int
	since   time.Time // when the first held byte arrived
}

// verdict is what a screen decided about the bytes it was shown.
type verdict int

const (
	// verdictHold: every byte so far is a prefix of a signature; the bytes
	// are held and more are needed.
	verdictHold verdict = iota
	// verdictForward: the bytes cannot start a signature; the held ones and
	// then the new ones go to the upstream, and screening ends.
	verdictForward
	// verdictReject: a whole signature; the connection is refused.
	verdictReject
)

// next decides on b, the bytes that follow those held. On verdictHold it
// keeps a copy of b. It never looks past the longest signature.
func (s *screen) next(b []byte, now time.Time) verdict {
	var cand [len(v2Sig)]byte
	copy(cand[:], s.held[:s.n])
	k := copy(cand[s.n:], b)
	v1, v2, complete := matchSignature(cand[:s.n+k])
	switch {
	case !v1 && !v2:
		return verdictForward
	case complete:
		return verdictReject
	}
	// Still shorter than a signature, so k is all of b.
	if s.n == 0 && k > 0 {
		s.since = now
	}
	s.n += copy(s.held[s.n:], b)
	return verdictHold
}

// heldBytes returns the prefix held so far.
func (s *screen) heldBytes() []byte { return s.held[:s.n] }

// deadline is when a held prefix is refused as a slow header; zero while
// nothing is held.
func (s *screen) deadline() time.Time {
	if s == nil || s.n == 0 {
		return time.Time{}
	}
	return s.since.Add(s.timeout)
}

// rejectHeader counts a refused PROXY header in r's tracker and records why.
func rejectHeader(r *Record, rej *ProxyRejectError) {
	r.tracker.countProxyRejection(rej.Reason)
	r.setDetail(rej)
}
