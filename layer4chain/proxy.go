package layer4chain

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/pires/go-proxyproto"
)

// DefaultMaxHops is the hop count at which a connection is taken for a loop.
const DefaultMaxHops = 8

// Proxy is one hop's configuration for serving connections: what to accept,
// where to dial, what to tell the next hop and how long to let connections
// live. It is immutable after construction and safe for concurrent use.
type Proxy struct {
	// Tracker records every connection this proxy serves.
	Tracker *Tracker
	// Scope keys the Limits, so that every instance of one configuration
	// (across reloads) shares them.
	Scope string
	// Limits caps this scope's connections.
	Limits Limits
	// Accept, if set, reads a PROXY header from trusted previous hops.
	Accept *ProxyAcceptor
	// EmitVersion is the PROXY protocol version sent upstream: 0 (none), 1 or 2.
	EmitVersion int
	// ForwardTLVs lists the TLV types of a trusted previous hop's v2 header
	// that are copied into the v2 header sent upstream, after the chain's
	// own. Types the header generates itself (IsGeneratedTLV) are never
	// copied. A forwarded ALPN or SSL TLV replaces the one describing a TLS
	// session this hop terminated: like the client address, it describes
	// the original client's connection.
	ForwardTLVs []byte
	// EmitCRC32C adds PP2_TYPE_CRC32C to the v2 header sent upstream.
	EmitCRC32C bool
	// MaxHops closes a connection whose incoming hop count reaches it.
	MaxHops int
	// Balancer orders the upstreams for each connection.
	Balancer *Balancer
	// Dialer connects to upstreams.
	Dialer *Dialer
	// Timeouts limit established connections.
	Timeouts Timeouts
	// TryDuration, if positive, keeps retrying the upstreams (every
	// Dialer.TryInterval) for this long when none connects or none is
	// available, instead of closing the client after one pass.
	TryDuration time.Duration
	// Tracer, if set, makes a span of each connection (see trace.go).
	Tracer Tracer

	parkAfter time.Duration // if set, replaces defaultParkAfter (tests)
}

// ClientMeta is what the server knows about a client beyond its socket.
type ClientMeta struct {
	// Server names the listener that accepted the connection.
	Server string
	// SNI is the TLS server name a matcher found, if any.
	SNI string
	// TLS is the TLS session a handler before this one terminated, nil if
	// none. A v2 header sent upstream describes it (TLSSessionTLVs).
	TLS *tls.ConnectionState
	// Socket is the TCP socket under the client connection when a wrapper
	// this package cannot see through (a TLS handler's) stands between
	// them; nil otherwise. Half-close and resets act on it.
	Socket *net.TCPConn
	// Resolve fills the connection's placeholders into an upstream address
	// or a TLS server name that has some (see HasPlaceholder); nil when no
	// upstream needs it. sni is the TLS server name known for the
	// connection: a matcher's at the first hop (SNI), the authority of the
	// previous hop's header behind one, so that each hop can route by it.
	Resolve func(template, sni string) string
}

// Serve proxies one client connection until it ends and returns why it
// ended. pending holds bytes already read from client (by matchers) that
// must reach the upstream first. Serve owns the upstream socket; the client
// socket stays the caller's, who must close it when Serve returns (on a
// graceful end that close delivers the client's final FIN), but Serve may
// close it earlier to end the connection.
func (p *Proxy) Serve(client net.Conn, pending []byte, meta ClientMeta) (reason CloseReason) {
	r, reason := p.admit(client, meta)
	if r == nil {
		return reason
	}
	defer func() {
		p.Tracker.Remove(r, reason)
		reason = r.Reason()
	}()
	s, reason := p.serve(r, client, pending, meta)
	if s == nil {
		return reason
	}
	defer s.release()
	return s.pipe.run()
}

// ServeDetached is Serve for a caller whose goroutine should not live as
// long as the connection: it returns as soon as the connection is
// established (or has ended before that), and the established connection
// goes on on goroutines of its own, one per direction, each no deeper than
// the copy loop; after a second of quiet both park (see defaultParkAfter).
// An idle connection then holds no goroutine, only its record and its
// sockets; whatever the caller's goroutine held is freed. ServeDetached
// owns client: it closes it when the connection ends, so the caller must
// hand over a socket nobody else closes (see TakeOver).
func (p *Proxy) ServeDetached(client net.Conn, pending []byte, meta ClientMeta) {
	r, _ := p.admit(client, meta)
	if r == nil {
		_ = client.Close()
		return
	}
	s, reason := p.serve(r, client, pending, meta)
	if s == nil {
		r.markShut(shutClient)
		_ = client.Close()
		p.Tracker.Remove(r, reason)
		return
	}
	s.ownsClient = true
	s.pipe.start(func(reason CloseReason) {
		s.release()
		p.Tracker.Remove(r, reason)
	})
}

// admit creates the record of a new connection, or returns nil and why
// the tracker refused it (counted and reported there).
func (p *Proxy) admit(client net.Conn, meta ClientMeta) (*Record, CloseReason) {
	r, err := p.Tracker.Admit(p.Scope, p.Limits, meta.Server, addrPortOf(client.RemoteAddr()))
	switch {
	case err == nil:
		return r, ReasonNone
	case errors.Is(err, ErrShuttingDown):
		return nil, ReasonShutdown
	}
	return nil, ReasonLimitExceeded
}

// session is an established connection: its pipe, and what its end
// releases besides the record.
type session struct {
	r          *Record
	pipe       *pipe
	client     net.Conn
	upConn     net.Conn
	up         *Upstream
	ownsClient bool // the client socket is closed here too (ServeDetached)
}

// release closes what the session owns and gives its upstream slot back.
func (s *session) release() {
	shut := uint32(shutUpstream)
	if s.ownsClient {
		shut |= shutClient
	}
	s.r.markShut(shut)
	_ = s.upConn.Close()
	if s.ownsClient {
		_ = s.client.Close()
	}
	s.up.Release() // the dial counted the connection as up's
}

// serve takes an admitted connection from its PROXY header to an
// established pipe. It returns the session, or nil and why the connection
// ended before that (having released what it took).
func (p *Proxy) serve(r *Record, client net.Conn, pending []byte, meta ClientMeta) (*session, CloseReason) {
	r.setSNI(meta.SNI) // a header from a previous hop replaces it (readOrigin)
	// max_lifetime counts from admission: it bounds the connect phase too.
	ctx, cancel := context.WithCancel(context.Background())
	if lim := p.Timeouts.MaxLifetime; lim > 0 {
		ctx, cancel = context.WithDeadline(context.Background(), r.Started.Add(lim))
		r.lifetimeEnd.Store(r.Started.Add(lim).UnixNano())
	}
	established := false
	defer func() {
		if !established {
			cancel()
		}
	}()
	r.connectBy.Store(r.Started.Add(p.connectPhase()).UnixNano())
	r.setInterrupt(func() {
		cancel()
		r.markShut(shutClient)
		_ = client.Close()
	})

	o, pending, sc, reason := p.readOrigin(r, client, pending, meta.TLS)
	if reason != ReasonNone {
		return nil, reason
	}
	if maxHops := p.maxHops(); o.hops >= maxHops {
		// The rejected header's chain ID and client are what an operator
		// needs to find the loop.
		p.Tracker.setOrigin(r, o.chainID, o.hops+1, o.client)
		r.setDetail(fmt.Errorf("%d hops before this one, max_hops is %d", o.hops, maxHops))
		return nil, ReasonLoopDetected
	}
	if o.chainID == "" {
		// A new chain is a new trace: a span ID sent without the chain it
		// belongs to would name a parent outside it.
		o.chainID, o.parent = newChainID(), TraceParent{}
	}
	if meta.SNI != "" && !o.viaHop && !strings.ContainsFunc(meta.SNI, func(r rune) bool { return r > 0x7E || notPrintable(byte(r)) }) {
		// A client's SNI that is no server name (controls, raw bytes)
		// travels no further than this hop's own record.
		o.authority = meta.SNI
	}
	p.Tracker.setOrigin(r, o.chainID, o.hops+1, o.client)
	if p.Tracer != nil {
		p.startSpan(r, &o)
	}
	if err := p.Tracker.admitClient(r, p.Limits.MaxConnectionsPerClient, o.client.Addr()); err != nil {
		r.setDetail(err)
		return nil, ReasonLimitExceeded
	}

	// The header depends on nothing the dial decides: made first, a header
	// that cannot be sent costs no upstream connection.
	first, reason := p.firstBytes(r, o, pending)
	if reason != ReasonNone {
		return nil, reason
	}

	var resolve func(string) string
	if fill, sni := meta.Resolve, o.authority; fill != nil {
		// Copies, so that only connections that fill placeholders pay for
		// what the closure keeps.
		resolve = func(s string) string { return fill(s, sni) }
	}
	// A client that leaves while its upstream is dialed ends the dial: no
	// record, limit slot or upstream connection waits out connect_timeout
	// (and every failover) for nobody. One that sent bytes and then
	// half-closed has not left: it may be waiting for the answer. Behind a
	// wrapper (TLS) the socket cannot say what the client sent, as the
	// wrapper may hold its bytes: only a reset is leaving then.
	sock := tcpOf(client, meta.Socket)
	silent := len(pending) == 0 && sc == nil && net.Conn(sock) == client
	watch := watchPeer(sock, watchClientAfter, silent, cancel)
	upConn, up, err := p.dialUpstream(ctx, r, o.client.Addr(), resolve)
	left := watch.stop()
	if err != nil {
		if errors.Is(ctxErr(ctx), context.DeadlineExceeded) {
			return nil, ReasonMaxLifetime
		}
		if left {
			r.setDetail(errClientGone)
			return nil, ReasonClientClosed
		}
		var de *DialError
		if errors.As(err, &de) {
			r.mu.Lock()
			r.upstream = de.Upstream // the last one tried, if any
			r.mu.Unlock()
		}
		if closed := r.Reason(); closed != ReasonNone {
			// Closed from outside while dialing (admin, shutdown): the
			// dial it cancelled failed for no reason of the upstream's.
			return nil, closed
		}
		r.setDetail(err)
		if de != nil {
			return nil, de.Reason
		}
		return nil, ReasonConnectFailed
	}
	// The context bounded the dials; from here the sockets' deadlines and
	// the interrupt do. Released now, it holds nothing for the
	// connection's life (a dial's child context leaves a map in it).
	established = true
	cancel()
	s := &session{r: r, client: client, upConn: upConn, up: up} // dial set r's upstream
	r.setSockets(sock, tcpOf(upConn, nil))
	r.setInterrupt(func() {
		r.markShut(shutClient | shutUpstream)
		_ = client.Close()
		_ = upConn.Close()
	})

	if reason := p.writeFirst(r, upConn, first, len(pending)); reason != ReasonNone {
		s.release()
		return nil, reason
	}

	r.setLimits(p.Timeouts)
	now := time.Now()
	r.established.Store(now.UnixNano())
	r.touch(now)
	r.setState(StateEstablished)
	s.pipe = newPipe(r, client, sock, upConn, p.Timeouts, sc)
	s.pipe.parkAfter = p.parkAfter
	s.pipe.up.sniff = len(pending) == 0 && sc == nil && p.sniffsHeader()
	return s, ReasonNone
}

// dialUpstream dials the upstreams in the balancer's order for client. With
// a TryDuration it starts over, after TryInterval, until an upstream
// connects or TryDuration has passed since the first attempt; without one,
// a single pass decides.
func (p *Proxy) dialUpstream(ctx context.Context, r *Record, clientIP netip.Addr, resolve func(string) string) (net.Conn, *Upstream, error) {
	var orderBuf [8]*Upstream
	deadline := time.Now().Add(p.TryDuration)
	for {
		c, up, err := p.Dialer.dial(ctx, p.Balancer.OrderAvailable(orderBuf[:0], clientIP, p.available), r, resolve)
		if err == nil || p.TryDuration <= 0 || ctx.Err() != nil {
			return c, up, err
		}
		// The last round starts at the deadline, as Caddy's reverse proxy
		// makes its last try at lb_try_duration.
		remaining := time.Until(deadline)
		if remaining <= 0 {
			return nil, nil, err
		}
		if serr := sleepCtx(ctx, min(p.Dialer.tryInterval(), remaining)); serr != nil {
			return nil, nil, err
		}
	}
}

// errClientGone is the detail of a client that left while its upstream was
// dialed.
var errClientGone = errors.New("the client closed its connection while waiting for an upstream")

// watchClientAfter is how long a dial runs before the client is watched
// for leaving: a dial that connects sooner costs no watch.
const watchClientAfter = 20 * time.Millisecond

// available says whether the dialer would let a connection through to u
// now, for the balancer to pick among those that can take one.
func (p *Proxy) available(u *Upstream) bool {
	return u.selectable(p.Dialer.Passive, p.Dialer.maxConns(u))
}

// origin is what this hop knows about where a connection comes from.
type origin struct {
	client    netip.AddrPort       // the original client
	dest      netip.AddrPort       // the address the original client connected to
	chainID   string               // "" until one is made at the first hop
	hops      int                  // hops before this one
	authority string               // the TLS server name, if known
	tlvs      []proxyproto.TLV     // received TLVs listed in ForwardTLVs
	session   *tls.ConnectionState // the client's TLS session, if this hop terminated it
	viaHop    bool                 // a trusted hop's header told the origin
	parent    TraceParent          // the previous hop's span, if it sent one
	next      TraceParent          // this hop's span, to send upstream
}

// readOrigin reads the PROXY header, if this hop accepts them, and returns
// the connection's origin and the bytes to forward first. Without a
// trusted header the origin is the socket's own peer.
//
// A peer outside the allow list is not read from: its header would never be
// used, and it may be waiting for the server to speak first. Its first bytes
// are screened instead, while the connection flows: sc, when not nil, holds
// the pending bytes that may yet become a signature (none are forwarded
// first then), and the pipe goes on screening what the client sends.
//
// A trusted peer is read from under the acceptor's policy: with Optional,
// bytes that cannot start a header, a half-close before any, or silence
// for the whole timeout make it a direct client.
func (p *Proxy) readOrigin(r *Record, client net.Conn, pending []byte, session *tls.ConnectionState) (o origin, first []byte, sc *screen, reason CloseReason) {
	o = origin{client: r.Client, dest: addrPortOf(client.LocalAddr()), session: session}
	if p.Accept == nil {
		if !p.sniffsHeader() || len(pending) == 0 {
			return o, pending, nil, ReasonNone // the pipe sniffs, if at all
		}
		first, sc, reason := p.screenPending(r, pending)
		return o, first, sc, reason
	}
	acc, trusted := p.Accept.forPeer(r.Client.Addr(), session)
	if !trusted {
		first, sc, reason := p.screenPending(r, pending)
		return o, first, sc, reason
	}
	pr := &prefixedConn{Conn: client, pending: pending}
	if end := r.lifetimeEnd.Load(); end != 0 {
		pr.notAfter = time.Unix(0, end)
	}
	info, rest, err := acc.Accept(pr, r.Client.Addr())
	if err != nil && !pr.notAfter.IsZero() && !time.Now().Before(pr.notAfter) {
		// max_lifetime, not the peer, ended the wait: no header refused.
		return o, nil, nil, ReasonMaxLifetime
	}
	if rej := (*ProxyRejectError)(nil); err != nil && p.Accept.Optional && errors.Is(err, io.EOF) && !errors.As(err, &rej) {
		// A direct client that half-closed before a header could start:
		// its bytes go on, and the pipe reads the EOF again.
		err = nil
	}
	if err != nil && r.closedFromOutside() {
		// Closed while waiting for the header (admin, shutdown): that
		// close is the reason, and the header was never refused.
		return o, nil, nil, r.Reason()
	}
	if err != nil {
		var rej *ProxyRejectError
		if !errors.As(err, &rej) {
			// For a trusted peer every outcome of reading is a header or a
			// rejection; this is SetReadDeadline failing on a dead socket.
			r.setDetail(err)
			return o, nil, nil, ReasonClientClosed
		}
		rejectHeader(r, rej)
		return o, nil, nil, ReasonProxyProtocolRejected
	}
	pending = append(rest, pr.pending...)
	if info == nil {
		return o, pending, nil, ReasonNone
	}
	if !info.Local && info.Source.IsValid() {
		o.client, o.dest = info.Source, info.Destination
	}
	// The connection came through a hop: a TLS session this hop
	// terminated is the link from that hop, not the client's, and its
	// server name is the link's. Only the header speaks for the client.
	o.viaHop, o.session = true, nil
	o.chainID, o.hops, o.authority, o.parent = info.ChainID, info.Hops, info.Authority, info.TraceParent
	r.setSNI(info.Authority)
	for _, t := range info.TLVs {
		if slices.Contains(p.ForwardTLVs, byte(t.Type)) {
			o.tlvs = append(o.tlvs, t)
		}
	}
	if o.hops == 0 {
		// A v1 header (or a v2 one from another proxy) carries no hop
		// count, but there was at least the hop that sent it.
		o.hops = 1
	}
	return o, pending, nil, ReasonNone
}

// sniffsHeader says whether the client's first bytes are checked for a
// PROXY header that this hop does not read: a hop that sends its own
// header would pass the client's on after it, as payload, which no
// upstream can use (a previous hop's header, and accept_proxy_protocol
// forgotten). When the first bytes could start a signature the client is
// screened like an untrusted one; a hop that sends no header of its own
// passes every byte on untouched.
func (p *Proxy) sniffsHeader() bool { return p.Accept == nil && p.EmitVersion != 0 }

// screenPending shows a screened client's pending bytes to a new screen:
// they go on first, or are refused as a header, or are held, and the pipe
// screens on (sc not nil).
func (p *Proxy) screenPending(r *Record, pending []byte) (first []byte, sc *screen, reason CloseReason) {
	sc = p.newScreen()
	switch sc.next(pending, time.Now()) {
	case verdictForward:
		return pending, nil, ReasonNone
	case verdictReject:
		rejectHeader(r, &ProxyRejectError{Reason: ProxyRejectUntrusted, Err: sc.refusal})
		return nil, nil, ReasonProxyProtocolRejected
	}
	return nil, sc, ReasonNone
}

// firstBytes returns what goes to the upstream before the pipe starts: the
// PROXY header, if this hop emits one, and the pending bytes. A header that
// cannot be encoded is one whose forwarded TLVs would not fit in a v2
// header: the received header is refused as malformed for this hop.
func (p *Proxy) firstBytes(r *Record, o origin, pending []byte) ([]byte, CloseReason) {
	if p.EmitVersion == 0 {
		return pending, ReasonNone
	}
	hdr := ProxyHeader{Version: p.EmitVersion, Source: o.client, Destination: o.dest,
		ChainID: o.chainID, Hops: o.hops + 1, Authority: o.authority, CRC32C: p.EmitCRC32C, TraceParent: o.next}
	if p.EmitVersion == 2 {
		hdr.TLVs = headerTLVs(o)
	}
	b, err := hdr.AppendTo(make([]byte, 0, 256+len(pending)))
	if err != nil {
		rejectHeader(r, &ProxyRejectError{Reason: ProxyRejectMalformed,
			Err: fmt.Errorf("the header to send upstream, with the forwarded TLVs, cannot be encoded: %w", err)})
		return nil, ReasonProxyProtocolRejected
	}
	return append(b, pending...), ReasonNone
}

// writeFirst sends first (see firstBytes) to the upstream, in one write;
// the last pending of its bytes are the client's.
func (p *Proxy) writeFirst(r *Record, upConn net.Conn, first []byte, pending int) CloseReason {
	if len(first) == 0 {
		return ReasonNone
	}
	_ = upConn.SetWriteDeadline(time.Now().Add(p.Dialer.connectTimeout()))
	if _, err := upConn.Write(first); err != nil {
		return ReasonUpstreamReset
	}
	_ = upConn.SetWriteDeadline(time.Time{})
	r.bytesUp.Add(int64(pending))
	return ReasonNone
}

// headerTLVs returns the TLVs a v2 header carries besides the chain's own:
// those describing the TLS session this hop terminated, then the forwarded
// ones, which replace a session TLV of the same type.
func headerTLVs(o origin) []proxyproto.TLV {
	var out []proxyproto.TLV
	for _, t := range TLSSessionTLVs(o.session) {
		if !slices.ContainsFunc(o.tlvs, func(f proxyproto.TLV) bool { return f.Type == t.Type }) {
			out = append(out, t)
		}
	}
	return append(out, o.tlvs...)
}

// connectPhase bounds how long a connection may stay connecting: the PROXY
// header's deadline plus every dial attempt.
func (p *Proxy) connectPhase() time.Duration {
	// In float seconds, so that long timeouts times many tries saturate
	// instead of overflowing into a deadline in the past.
	s := float64(p.Balancer.Tries())*(p.Dialer.connectTimeout()+p.Dialer.tryInterval()).Seconds() + p.TryDuration.Seconds()
	if p.Accept != nil {
		s += p.Accept.timeout().Seconds()
	}
	if s >= maxConnectPhase.Seconds() {
		return maxConnectPhase
	}
	return time.Duration(s * float64(time.Second))
}

// maxConnectPhase caps connectPhase far beyond any sensible configuration
// and far before the nanosecond clock ends (2262).
const maxConnectPhase = 100 * 365 * 24 * time.Hour

func (p *Proxy) maxHops() int {
	if p.MaxHops > 0 {
		return p.MaxHops
	}
	return DefaultMaxHops
}

// prefixedConn reads pending bytes before the connection's own, so a PROXY
// header is found even when matchers already read part of it. Its read
// deadlines are never later than notAfter (the connection's max_lifetime),
// when set.
type prefixedConn struct {
	net.Conn
	pending  []byte
	notAfter time.Time
}

func (c *prefixedConn) SetReadDeadline(t time.Time) error {
	if !c.notAfter.IsZero() && !t.IsZero() && c.notAfter.Before(t) {
		t = c.notAfter
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *prefixedConn) Read(b []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(b, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

func addrPortOf(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.AddrPort()
	case nil:
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// Chain IDs are a random per-process prefix and a counter: unique across
// hops with overwhelming probability, and cheap enough to make per
// connection.
var (
	chainPrefix  [8]byte
	chainCounter atomic.Uint64
)

func init() { _, _ = rand.Read(chainPrefix[:]) }

func newChainID() string {
	var b [16]byte
	copy(b[:8], chainPrefix[:])
	n := chainCounter.Add(1)
	for i := 15; i >= 8; i-- {
		b[i] = byte(n)
		n >>= 8
	}
	return hex.EncodeToString(b[:])
}

// startSpan asks the Tracer for the connection's span and keeps what it
// says to send upstream in o.
func (p *Proxy) startSpan(r *Record, o *origin) {
	r.span, o.next = p.Tracer.StartSpan(r, o.parent)
}
