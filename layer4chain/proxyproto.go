package layer4chain

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"
)

// TLVHops is the custom PP2 TLV type (in the 0xE0–0xEF application range)
// carrying the hop count. Its value is one byte, so a chain can count up to
// 255 hops; loop detection needs no more than that.
const TLVHops = proxyproto.PP2_TYPE_MIN_CUSTOM

// checkChainIDText refuses a chain ID that is not printable ASCII: it is
// logged, listed and searched for (our IDs are hex; HAProxy's unique-id is
// text).
func checkChainIDText(id []byte) error { return checkPrintable(id, errChainIDNotText) }

// checkPrintable refuses a received text that is not printable ASCII, as
// kind: it would reach logs, listings and terminals as it came.
func checkPrintable(text []byte, kind error) error {
	if i := slices.IndexFunc(text, notPrintable); i >= 0 {
		return fmt.Errorf("%w: byte 0x%02X at %d", kind, text[i], i)
	}
	return nil
}

func notPrintable(b byte) bool { return b < 0x20 || b > 0x7E }

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
	// TraceParent is the TLVTrace value (the previous hop's span), the
	// zero value when absent.
	TraceParent TraceParent
	// Local is set for the LOCAL command, v1 UNKNOWN or v2 PROXY over
	// UNSPEC: the header carries no client address, and the caller should
	// use the socket's peer. TLVs are honoured all the same.
	Local bool
	// TLVs are the v2 header's other TLVs (all but the unique ID, the
	// authority, the hop count, the trace parent and the CRC32C, which are decoded or
	// verified above, and NOOP padding), in the order received; nil for v1. They are bounded
	// by the header's size (at most 64 KiB) and share no memory with the
	// connection's buffers.
	TLVs []proxyproto.TLV
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
	// TraceParent is sent as TLVTrace (v2 only; omitted when not valid).
	TraceParent TraceParent
	// TLVs are sent after the ones above, in order (v2 only): TLVs
	// forwarded from the previous hop and those describing a TLS session.
	// The types this hop generates itself (IsGeneratedTLV) are refused.
	TLVs []proxyproto.TLV
	// CRC32C adds PP2_TYPE_CRC32C, the header's checksum, as the last TLV
	// (v2 only).
	CRC32C bool
}

// IsGeneratedTLV reports whether a TLV type is one that ProxyHeader sends
// from its own fields: the unique ID (chain ID), the authority, the hop
// count, the trace parent and the CRC32C. Such a type cannot be forwarded from a previous
// hop, or the next hop would receive it twice.
func IsGeneratedTLV(t byte) bool {
	switch proxyproto.PP2Type(t) {
	case proxyproto.PP2_TYPE_UNIQUE_ID, proxyproto.PP2_TYPE_AUTHORITY, proxyproto.PP2_TYPE_CRC32C, TLVHops, TLVTrace:
		return true
	}
	return false
}

// castagnoli is the CRC32C table the spec's PP2_TYPE_CRC32C uses.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crcLen is the length of a PP2_TYPE_CRC32C value.
const crcLen = 4

// AppendTo appends the encoded header to dst, so the caller can put it in
// front of the first payload bytes and send both in one write (the spec asks
// senders to send the header at once). The fields ChainID, Hops, Authority
// and TraceParent are ignored for version 1, which has no TLVs. On error dst is returned
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
		// No receiver of ours would accept either.
		if err := checkChainIDText([]byte(h.ChainID)); err != nil {
			return dst, fmt.Errorf("proxy protocol: %w", err)
		}
		if err := checkPrintable([]byte(h.Authority), errAuthorityNotText); err != nil {
			return dst, fmt.Errorf("proxy protocol: %w", err)
		}
		if h.Hops < 0 || h.Hops > 255 {
			return dst, fmt.Errorf("proxy protocol: hop count %d out of range 0..255", h.Hops)
		}
		for _, t := range h.TLVs {
			if IsGeneratedTLV(byte(t.Type)) {
				return dst, fmt.Errorf("proxy protocol: TLV type 0x%02X is generated by this hop and cannot be given", byte(t.Type))
			}
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
		var arr [5]proxyproto.TLV
		var hops [1]byte
		var trace [traceParentLen]byte
		var crc [crcLen]byte
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
		if h.TraceParent.IsValid() {
			tlvs = append(tlvs, proxyproto.TLV{Type: TLVTrace, Value: h.TraceParent.appendValue(trace[:0])})
		}
		tlvs = append(tlvs, h.TLVs...)
		if h.CRC32C {
			// Last, so that its value is the header's last four bytes.
			tlvs = append(tlvs, proxyproto.TLV{Type: proxyproto.PP2_TYPE_CRC32C, Value: crc[:]})
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
	if h.Version == 2 && len(b)-v2FixedLen > int(proxyproto.MaxV2HeaderSize) {
		// Receivers, this one included, refuse a longer header: refuse to
		// send it rather than have the next hop reject the connection.
		return dst, fmt.Errorf("proxy protocol: the header would carry %d bytes after its fixed part, more than receivers accept (%d); a long authority or forwarded TLVs make it so",
			len(b)-v2FixedLen, proxyproto.MaxV2HeaderSize)
	}
	if h.Version == 2 && h.CRC32C {
		// The spec's checksum covers the whole header with its own value
		// zeroed, which is how it was formatted.
		binary.BigEndian.PutUint32(b[len(b)-crcLen:], crc32.Checksum(b, castagnoli))
	}
	return append(dst, b...), nil
}

// TLSSessionTLVs returns the v2 TLVs that describe a TLS session this hop
// terminated: PP2_TYPE_ALPN (when a protocol was negotiated) and
// PP2_TYPE_SSL with the client flags, the verify result (0 only when the
// client presented a certificate that was verified), and the sub-TLVs
// PP2_SUBTYPE_SSL_VERSION ("TLSv1.3", as OpenSSL and HAProxy spell it),
// PP2_SUBTYPE_SSL_CIPHER (Go's name of the suite, the IANA one) and, when
// the client's certificate was verified and has a common name,
// PP2_SUBTYPE_SSL_CN. The authority (the SNI) is not among them: it
// travels in ProxyHeader.Authority. nil when cs is nil.
func TLSSessionTLVs(cs *tls.ConnectionState) []proxyproto.TLV {
	if cs == nil {
		return nil
	}
	var out []proxyproto.TLV
	if cs.NegotiatedProtocol != "" {
		out = append(out, proxyproto.TLV{Type: proxyproto.PP2_TYPE_ALPN, Value: []byte(cs.NegotiatedProtocol)})
	}
	ssl := tlvparse.PP2SSL{Client: tlvparse.PP2_BITFIELD_CLIENT_SSL, Verify: 1}
	if len(cs.PeerCertificates) > 0 {
		// Go does not send a certificate on a resumed session: a
		// certificate seen now was sent on this connection.
		ssl.Client |= tlvparse.PP2_BITFIELD_CLIENT_CERT_CONN | tlvparse.PP2_BITFIELD_CLIENT_CERT_SESS
	}
	if len(cs.VerifiedChains) > 0 {
		ssl.Verify = 0
	}
	ssl.TLV = append(ssl.TLV, proxyproto.TLV{Type: proxyproto.PP2_SUBTYPE_SSL_VERSION, Value: []byte(tlsVersionName(cs.Version))})
	if name := tls.CipherSuiteName(cs.CipherSuite); name != "" {
		ssl.TLV = append(ssl.TLV, proxyproto.TLV{Type: proxyproto.PP2_SUBTYPE_SSL_CIPHER, Value: []byte(name)})
	}
	if ssl.Verify == 0 && len(cs.PeerCertificates) > 0 {
		if cn := cs.PeerCertificates[0].Subject.CommonName; cn != "" {
			ssl.TLV = append(ssl.TLV, proxyproto.TLV{Type: proxyproto.PP2_SUBTYPE_SSL_CN, Value: []byte(cn)})
		}
	}
	t, err := ssl.Marshal()
	if err != nil {
		// Only a sub-TLV over 64 KiB fails, which a CN cannot be.
		return out
	}
	return append(out, t)
}

// tlsVersionName spells a TLS version as OpenSSL does ("TLSv1.3"), which
// is what HAProxy sends in PP2_SUBTYPE_SSL_VERSION.
func tlsVersionName(v uint16) string {
	switch v {
	case tls.VersionTLS10:
		return "TLSv1"
	case tls.VersionTLS11:
		return "TLSv1.1"
	case tls.VersionTLS12:
		return "TLSv1.2"
	case tls.VersionTLS13:
		return "TLSv1.3"
	}
	return fmt.Sprintf("0x%04X", v)
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
	// ProxyRejectMissing is a trusted peer that sent no header (other bytes,
	// or nothing before the deadline or its close): a trusted hop always
	// sends one, so its absence means a misconfigured chain.
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
	errUntrustedHeader  = errors.New("PROXY signature from a peer that is neither in allow nor presents a verified certificate named in allow_certificates")
	errHeaderNotRead    = errors.New("PROXY header from a peer, but this hop has no accept_proxy_protocol: it sends its own header, and this one would reach the upstream after it as payload; set accept_proxy_protocol with the previous hop in allow")
	errNoHeader         = errors.New("trusted peer sent data that is not a PROXY header (is proxy_protocol set on the hop before this one?)")
	errV1TooLong        = errors.New("v1 header has no line end within 107 bytes")
	errV2TooLong        = errors.New("v2 header length exceeds proxyproto.MaxV2HeaderSize")
	errTrailingBytes    = errors.New("decoder did not consume the whole header")
	errChainIDTooLong   = errors.New("unique ID TLV longer than 128 bytes")
	errChainIDNotText   = errors.New("unique ID TLV is not printable ASCII")
	errAuthorityNotText = errors.New("authority TLV is not printable ASCII")
	errBadHops          = errors.New("hop-count TLV is not exactly one byte")
	errDuplicateTLV     = errors.New("duplicate TLV")
	errBadCRC           = errors.New("CRC32C TLV does not match the header")
)

// ProxyAcceptor reads PROXY headers from previous hops it trusts. It is safe
// for concurrent use once configured.
type ProxyAcceptor struct {
	// Allow lists the peers whose headers are trusted. IPv4-mapped IPv6 peers
	// and prefixes are compared as IPv4.
	Allow []netip.Prefix
	// Timeout is how long the whole header may take; <= 0 means 3s. A
	// trusted peer that sends nothing is rejected (ProxyRejectMissing) once
	// it has passed, one that sent part of a header (ProxyRejectTimeout). Proxy never waits on an untrusted peer, which may be
	// waiting for the server to speak first: it dials at once and screens
	// the peer's first bytes, and Timeout then bounds only how long a
	// partial signature may stay undecided.
	Timeout time.Duration
	// AllowCertificates trusts a peer, whatever its address, whose client
	// certificate was verified by a TLS handshake before this hop
	// (ClientMeta.TLS) and is known by one of these names (Subject CN or a
	// DNS SAN, compared without case). Empty: trust by address only.
	AllowCertificates []string
	// Optional lets a trusted peer send no header: its first bytes decide,
	// as for an untrusted peer, except that a header it sends is used. A
	// trusted peer that sends nothing for Timeout is then served without
	// one (a client waiting for the server to speak first waits that long).
	Optional bool
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
//   - trusted peer, bytes that cannot start a signature: ProxyRejectMissing;
//     with Optional, (nil, bytes, nil) like an untrusted peer.
//   - deadline with part of a header read (a trusted peer's, or an untrusted
//     peer's partial signature): ProxyRejectTimeout.
//   - trusted peer, deadline with zero bytes: ProxyRejectMissing wrapping
//     the deadline error (no header is a missing one, however it ends);
//     with Optional, (nil, nil, nil) like an untrusted peer.
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
//   - trusted peer with Optional, zero bytes or part of a signature (a
//     header is no longer possible): like an untrusted peer, below.
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
	optional := a != nil && a.Optional

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
			if info, rest, done, err := decide(buf, trusted, optional); done {
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
			switch {
			case len(buf) > 0:
				return nil, nil, &ProxyRejectError{Reason: ProxyRejectTimeout, Err: rerr}
			case trusted && !optional:
				return nil, nil, &ProxyRejectError{Reason: ProxyRejectMissing, Err: fmt.Errorf("trusted peer sent nothing within %s: %w", timeout, rerr)}
			}
			return nil, nil, nil
		}
		_, _, signed := matchSignature(buf)
		switch {
		case !trusted, optional && !signed:
			return nil, nilIfEmpty(buf), rerr
		case len(buf) == 0:
			return nil, nil, &ProxyRejectError{Reason: ProxyRejectMissing, Err: rerr}
		default:
			return nil, nil, &ProxyRejectError{Reason: ProxyRejectMalformed, Err: fmt.Errorf("header cut short: %w", rerr)}
		}
	}
}

// decide looks at the bytes read so far. done is false when more bytes are
// needed before anything can be said. optional lets a trusted peer be a
// direct client.
func decide(buf []byte, trusted, optional bool) (info *ProxyInfo, rest []byte, done bool, err error) {
	v1, v2, complete := matchSignature(buf)
	if !v1 && !v2 {
		if trusted && !optional {
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
	unspec := len(hdr) >= v2FixedLen && hdr[0] == v2Sig[0] && hdr[12] == v2CmdProxy && hdr[13] == v2FamUnspec
	if unspec {
		// PROXY over UNSPEC is v2's "PROXY UNKNOWN": a sender that does not
		// know the client. The spec lets a receiver accept it with the
		// socket's addresses (HAProxy does) and v1 UNKNOWN is accepted, but
		// go-proxyproto refuses it. Decoded as LOCAL, which carries the
		// same meaning and keeps the TLVs. hdr is the caller's, so the byte
		// is restored right after decoding, before the CRC32C check reads
		// the header as sent.
		hdr[12] = v2CmdLocal
	}
	d := decoderPool.Get().(*headerDecoder)
	d.src.Reset(hdr)
	d.br.Reset(&d.src)
	h, err := proxyproto.Read(d.br)
	if unspec {
		hdr[12] = v2CmdProxy
	}
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
	// The TLVs fill the end of the header; their offsets there let the
	// CRC32C be checked against the bytes that were sent.
	off := len(hdr)
	for _, t := range tlvs {
		off -= 3 + len(t.Value)
	}
	var seenID, seenAuth, seenHops, seenTrace, seenCRC bool
	for _, t := range tlvs {
		valueAt := off + 3
		off = valueAt + len(t.Value)
		switch t.Type {
		case proxyproto.PP2_TYPE_CRC32C:
			if seenCRC {
				return nil, fmt.Errorf("%w: CRC32C", errDuplicateTLV)
			}
			seenCRC = true
			if err := checkCRC32C(hdr, valueAt, len(t.Value)); err != nil {
				return nil, err
			}
		case proxyproto.PP2_TYPE_UNIQUE_ID:
			if seenID {
				return nil, fmt.Errorf("%w: unique ID", errDuplicateTLV)
			}
			if len(t.Value) > maxChainIDLen {
				return nil, errChainIDTooLong
			}
			if err := checkChainIDText(t.Value); err != nil {
				return nil, err
			}
			seenID, info.ChainID = true, string(t.Value)
		case proxyproto.PP2_TYPE_AUTHORITY:
			if seenAuth {
				return nil, fmt.Errorf("%w: authority", errDuplicateTLV)
			}
			if err := checkPrintable(t.Value, errAuthorityNotText); err != nil {
				return nil, err // a server name is printable ASCII (IDNs are punycode)
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
		case TLVTrace:
			// Like the hop count: a second parent would make the trace
			// ambiguous.
			if seenTrace {
				return nil, fmt.Errorf("%w: trace parent", errDuplicateTLV)
			}
			p, err := parseTraceParent(t.Value)
			if err != nil {
				return nil, err
			}
			seenTrace, info.TraceParent = true, p
		case proxyproto.PP2_TYPE_NOOP:
			// Padding: nothing to keep or forward.
		default:
			info.TLVs = append(info.TLVs, t)
		}
	}
	return info, nil
}

// checkCRC32C verifies a PP2_TYPE_CRC32C value found at hdr[at:at+n]: the
// checksum of the whole header with those bytes zeroed. hdr is the
// caller's, so the value is put back.
func checkCRC32C(hdr []byte, at, n int) error {
	if n != crcLen || at < v2FixedLen || at+n > len(hdr) {
		return errBadCRC
	}
	var saved [crcLen]byte
	copy(saved[:], hdr[at:at+n])
	clear(hdr[at : at+n])
	sum := crc32.Checksum(hdr, castagnoli)
	copy(hdr[at:at+n], saved[:])
	if sum != binary.BigEndian.Uint32(saved[:]) {
		return errBadCRC
	}
	return nil
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
//
// A hop that sends a header of its own and reads none screens its clients
// the same way (see Proxy.sniffsHeader), from the first byte that could
// start a signature.
type screen struct {
	// timeout bounds how long a held prefix may take to become a signature
	// or diverge from one, as it bounds a header in Accept.
	timeout time.Duration
	// refusal is why a whole signature is refused (a ProxyRejectUntrusted
	// cause).
	refusal error
	// stallForwards: a held prefix that stalls for timeout is the
	// client's own bytes, forwarded, not a slow header, refused.
	stallForwards bool
	held          [len(v2Sig)]byte
	n             int
	since         time.Time // when the first held byte arrived
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

// newScreen returns a screen for a client whose header this hop does not
// read: by policy (an untrusted peer), or because it reads none at all.
func (p *Proxy) newScreen() *screen {
	if p.Accept == nil {
		return headerNotReadScreen()
	}
	return &screen{timeout: p.Accept.timeout(), refusal: errUntrustedHeader}
}

// headerNotReadScreen is the screen of a hop that reads no header at all,
// whose clients are mostly direct ones: one that sends "\r\n" or "P" and
// waits for an answer is held briefly (sniffHold), then served. A header
// from a previous hop arrives whole, or its pieces well within that time.
func headerNotReadScreen() *screen {
	return &screen{timeout: sniffHold, refusal: errHeaderNotRead, stallForwards: true}
}

// sniffHold is how long a hop that reads no header holds first bytes that
// may start one.
const sniffHold = 200 * time.Millisecond

// rejectHeader counts a refused PROXY header in r's tracker and records why.
func rejectHeader(r *Record, rej *ProxyRejectError) {
	r.tracker.countProxyRejection(rej.Reason)
	r.setDetail(rej)
}

// forPeer returns the acceptor that reads peer's header and whether peer is
// trusted: by its address (a itself), or by its verified client certificate
// alone (a copy that allows exactly peer, so Accept reads it as trusted).
func (a *ProxyAcceptor) forPeer(peer netip.Addr, session *tls.ConnectionState) (*ProxyAcceptor, bool) {
	if isTrusted(a.Allow, peer) {
		return a, true
	}
	if len(a.AllowCertificates) == 0 || !trustedByCertificate(a.AllowCertificates, CertificateNames(session)) {
		return a, false
	}
	p := peer.WithZone("").Unmap()
	if !p.IsValid() {
		return a, false
	}
	cp := *a
	cp.Allow = []netip.Prefix{netip.PrefixFrom(p, p.BitLen())}
	return &cp, true
}
