package layer4chain

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
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
	// MaxHops closes a connection whose incoming hop count reaches it.
	MaxHops int
	// Balancer orders the upstreams for each connection.
	Balancer *Balancer
	// Dialer connects to upstreams.
	Dialer *Dialer
	// Timeouts limit established connections.
	Timeouts Timeouts
	// Logger receives debug lines about connections; nil logs nothing.
	Logger *zap.Logger
}

// ClientMeta is what the server knows about a client beyond its socket.
type ClientMeta struct {
	// Server names the listener that accepted the connection.
	Server string
	// SNI is the TLS server name a matcher found, if any.
	SNI string
}

// Serve proxies one client connection until it ends and returns why it
// ended. pending holds bytes already read from client (by matchers) that
// must reach the upstream first. Serve owns the upstream socket; the client
// socket stays the caller's, but Serve may close it to end the connection.
func (p *Proxy) Serve(client net.Conn, pending []byte, meta ClientMeta) (reason CloseReason) {
	r, err := p.Tracker.Admit(p.Scope, p.Limits, meta.Server, addrPortOf(client.RemoteAddr()))
	if err != nil {
		reason = ReasonLimitExceeded
		if errors.Is(err, ErrShuttingDown) {
			reason = ReasonShutdown
		}
		p.Tracker.countRefused(reason)
		return reason
	}
	defer func() {
		p.Tracker.Remove(r, reason)
		reason = r.Reason()
	}()
	return p.serve(r, client, pending, meta)
}

func (p *Proxy) serve(r *Record, client net.Conn, pending []byte, meta ClientMeta) CloseReason {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r.connectBy.Store(r.Started.Add(p.connectPhase()).UnixNano())
	r.setInterrupt(func() {
		cancel()
		r.markShut(shutClient)
		_ = client.Close()
	})

	peer := r.Client
	origClient, dest := peer, addrPortOf(client.LocalAddr())
	var chainID, authority string
	var hops int
	if p.Accept != nil {
		pr := &prefixedConn{Conn: client, pending: pending}
		info, rest, err := p.Accept.Accept(pr, peer.Addr())
		if err != nil {
			var rej *ProxyRejectError
			if !errors.As(err, &rej) {
				return ReasonClientClosed
			}
			p.Tracker.countProxyRejection(rej.Reason)
			p.debug("proxy protocol header rejected", r, zap.String("reject_reason", string(rej.Reason)), zap.Error(err))
			return ReasonProxyProtocolRejected
		}
		pending = append(rest, pr.pending...)
		if info != nil {
			if !info.Local && info.Source.IsValid() {
				origClient, dest = info.Source, info.Destination
			}
			chainID, hops, authority = info.ChainID, info.Hops, info.Authority
			if hops == 0 {
				// A v1 header (or a v2 one from another proxy) carries no
				// hop count, but there was at least the hop that sent it.
				hops = 1
			}
		}
	}
	if maxHops := p.maxHops(); hops >= maxHops {
		p.debug("loop detected", r, zap.Int("hops", hops), zap.Int("max_hops", maxHops))
		return ReasonLoopDetected
	}
	if chainID == "" {
		chainID = newChainID()
	}
	if meta.SNI != "" {
		authority = meta.SNI
	}
	r.mu.Lock()
	r.chainID, r.hop, r.originalClient = chainID, hops+1, origClient
	r.mu.Unlock()
	if err := p.Tracker.admitClient(r, p.Limits.MaxConnectionsPerClient, origClient.Addr()); err != nil {
		return ReasonLimitExceeded
	}

	var orderBuf [8]*Upstream
	upConn, up, err := p.Dialer.Dial(ctx, p.Balancer.Order(orderBuf[:0], origClient.Addr()))
	if err != nil {
		var de *DialError
		if errors.As(err, &de) {
			return de.Reason
		}
		return ReasonConnectFailed
	}
	defer func() {
		r.markShut(shutUpstream)
		_ = upConn.Close()
	}()
	up.Acquire()
	defer up.Release()
	r.mu.Lock()
	r.upstream = up.Addr
	r.mu.Unlock()
	r.setSockets(client, upConn)
	r.setInterrupt(func() {
		cancel()
		r.markShut(shutClient | shutUpstream)
		_ = client.Close()
		_ = upConn.Close()
	})

	first := pending
	if p.EmitVersion != 0 {
		hdr := ProxyHeader{Version: p.EmitVersion, Source: origClient, Destination: dest,
			ChainID: chainID, Hops: hops + 1, Authority: authority}
		b, err := hdr.AppendTo(make([]byte, 0, 256+len(pending)))
		if err != nil {
			p.debug("encoding proxy protocol header", r, zap.Error(err))
			return ReasonConnectFailed
		}
		first = append(b, pending...)
	}
	if len(first) > 0 {
		_ = upConn.SetWriteDeadline(time.Now().Add(p.Dialer.connectTimeout()))
		if _, err := upConn.Write(first); err != nil {
			return ReasonUpstreamReset
		}
		_ = upConn.SetWriteDeadline(time.Time{})
		r.bytesUp.Add(int64(len(pending)))
	}

	r.setLimits(p.Timeouts)
	now := time.Now()
	r.established.Store(now.UnixNano())
	r.touch(now)
	r.setState(StateEstablished)
	p.debug("established", r)
	return runPipe(r, client, upConn, p.Timeouts)
}

// connectPhase bounds how long a connection may stay connecting: the PROXY
// header's deadline plus every dial attempt.
func (p *Proxy) connectPhase() time.Duration {
	d := time.Duration(p.Balancer.Tries()) * p.Dialer.connectTimeout()
	if p.Accept != nil {
		d += p.Accept.timeout()
	}
	return d
}

func (p *Proxy) maxHops() int {
	if p.MaxHops > 0 {
		return p.MaxHops
	}
	return DefaultMaxHops
}

func (p *Proxy) debug(msg string, r *Record, fields ...zap.Field) {
	if p.Logger == nil {
		return
	}
	if ce := p.Logger.Check(zap.DebugLevel, msg); ce != nil {
		ce.Write(append(fields, zap.Uint64("id", r.ID), zap.String("client", r.Client.String()))...)
	}
}

// prefixedConn reads pending bytes before the connection's own, so a PROXY
// header is found even when matchers already read part of it.
type prefixedConn struct {
	net.Conn
	pending []byte
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
