// Package modules holds the Caddy modules of caddy-layer4chain: the
// layer4 handler `chain`, the app `layer4chain` and the admin API
// `admin.api.layer4chain`. They translate JSON config and Caddy's lifecycle
// into calls on the engine in package layer4chain.
package modules

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// Defaults of the handler, documented on the fields they fill.
const (
	defaultConnectTimeout   = 5 * time.Second
	defaultIdleTimeout      = time.Hour
	defaultHalfCloseTimeout = 5 * time.Minute
	defaultAcceptTimeout    = 3 * time.Second
)

// Handler is a layer4 handler that proxies a connection to the next hop of a
// chain of TCP proxies. It dials its upstreams with a connect timeout and
// fails over between them, optionally reads a PROXY header from trusted
// previous hops and sends one to the next hop carrying the original client,
// and copies both directions with correct half-close and inactivity limits.
// Every connection it serves is tracked from admission to removal.
//
// It is a terminal handler: it serves the connection until it ends and does
// not call the next handler.
type Handler struct {
	// Upstreams are the addresses to proxy to, tried in the order the load
	// balancing policy gives. Each upstream is an object with one "dial"
	// address ("host:port"); a plain "host:port" string is accepted too.
	Upstreams []*Upstream `json:"upstreams,omitempty"`

	// LoadBalancing chooses the upstream for each connection and how many
	// dial attempts to make before giving up.
	LoadBalancing *LoadBalancing `json:"load_balancing,omitempty"`

	// ConnectTimeout bounds every dial attempt; a timed-out attempt fails
	// over to the next upstream. Default: 5s.
	ConnectTimeout caddy.Duration `json:"connect_timeout,omitempty"`

	// IdleTimeout closes a connection that moved no byte in either
	// direction for this long (close reason idle_timeout). Default: 1h.
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// HalfCloseTimeout applies once one direction has ended: the remaining
	// direction is closed after moving no byte for this long (close reason
	// half_close_timeout). It is an inactivity limit, so a stream that keeps
	// flowing is never cut. Default: 5m.
	HalfCloseTimeout caddy.Duration `json:"half_close_timeout,omitempty"`

	// MaxLifetime closes a connection this long after it was accepted,
	// however active (close reason max_lifetime). Default: 0, no limit.
	MaxLifetime caddy.Duration `json:"max_lifetime,omitempty"`

	// ProxyProtocol sends a PROXY protocol header of this version ("v1" or
	// "v2") to the upstream, carrying the original client address. v2 also
	// carries the chain ID (PP2_TYPE_UNIQUE_ID), the hop count (TLV 0xE0)
	// and the TLS server name (PP2_TYPE_AUTHORITY) when known.
	// Default: empty, no header.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`

	// AcceptProxyProtocol, if set, reads a PROXY protocol header (v1 or v2)
	// from the previous hop. Only peers in its allow list are trusted; a
	// header from any other peer, a malformed or a slow header closes the
	// connection (close reason proxy_protocol_rejected).
	AcceptProxyProtocol *AcceptProxyProtocol `json:"accept_proxy_protocol,omitempty"`

	// MaxHops closes a connection whose incoming hop count (from a PROXY v2
	// header) has reached this number (close reason loop_detected), so a
	// misconfigured loop cannot multiply connections. Default: 8.
	MaxHops int `json:"max_hops,omitempty"`

	// MaxConnections caps the connections this handler serves at once;
	// more are closed at once (close reason limit_exceeded). Default: 0, no
	// limit.
	MaxConnections int `json:"max_connections,omitempty"`

	// MaxConnectionsPerClient caps the connections of one original client
	// IP (the PROXY header's source when accepted, else the socket peer).
	// Default: 0, no limit.
	MaxConnectionsPerClient int `json:"max_connections_per_client,omitempty"`

	proxy *layer4chain.Proxy
}

// Upstream is one address to proxy to.
type Upstream struct {
	// Dial is the upstream's network address, "host:port". Exactly one
	// address is allowed.
	Dial []string `json:"dial,omitempty"`
}

// UnmarshalJSON accepts an upstream object or a plain "host:port" string.
func (u *Upstream) UnmarshalJSON(b []byte) error {
	if b = bytes.TrimSpace(b); len(b) > 0 && b[0] == '"' {
		var addr string
		if err := json.Unmarshal(b, &addr); err != nil {
			return err
		}
		u.Dial = []string{addr}
		return nil
	}
	type plain Upstream
	return json.Unmarshal(b, (*plain)(u))
}

// LoadBalancing chooses upstreams.
type LoadBalancing struct {
	// Selection is the policy that picks the first upstream to try; on
	// failure the following upstreams are tried in configured order.
	Selection *Selection `json:"selection,omitempty"`

	// Tries is how many dial attempts to make, across upstreams, before
	// closing the client. Default: one per upstream.
	Tries int `json:"tries,omitempty"`
}

// Selection names a load balancing policy.
type Selection struct {
	// Policy is one of first (default: always the first upstream that
	// connects), round_robin, least_conn, random, ip_hash (by original
	// client IP).
	Policy string `json:"policy,omitempty"`
}

// AcceptProxyProtocol configures reading PROXY headers from previous hops.
type AcceptProxyProtocol struct {
	// Allow lists the peers (CIDRs or single IPs) whose PROXY headers are
	// trusted; a trusted peer must send one. A peer outside the list that
	// sends a header is rejected; one that sends anything else is served
	// as a direct client (a client that waits for the server to speak
	// first is served once Timeout has passed without a byte).
	Allow []string `json:"allow,omitempty"`

	// Timeout bounds how long a header may take to arrive whole.
	// Default: 3s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.chain",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision fills defaults and builds the engine's proxy.
func (h *Handler) Provision(ctx caddy.Context) error {
	if err := h.check(); err != nil {
		return err
	}
	// The app runs the sweeps, the metrics and the shutdown drain; load it
	// (with defaults when the config has none) so they exist.
	if _, err := ctx.App("layer4chain"); err != nil {
		return fmt.Errorf("loading the layer4chain app: %w", err)
	}

	upstreams := make([]*layer4chain.Upstream, len(h.Upstreams))
	for i, u := range h.Upstreams {
		upstreams[i] = sharedUpstream(u.Dial[0])
	}
	policy, tries := "", 0
	if lb := h.LoadBalancing; lb != nil {
		tries = lb.Tries
		if lb.Selection != nil {
			policy = lb.Selection.Policy
		}
	}
	balancer, err := layer4chain.NewBalancer(policy, upstreams, tries)
	if err != nil {
		return fmt.Errorf("load_balancing.selection.policy: %w", err)
	}

	tracker := processTracker()
	p := &layer4chain.Proxy{
		Tracker: tracker,
		Scope:   h.scopeKey(),
		Limits: layer4chain.Limits{
			MaxConnections:          h.MaxConnections,
			MaxConnectionsPerClient: h.MaxConnectionsPerClient,
		},
		MaxHops:  h.MaxHops,
		Balancer: balancer,
		Dialer: &layer4chain.Dialer{
			ConnectTimeout: orDefault(h.ConnectTimeout, defaultConnectTimeout),
			KeepAlive:      layer4chain.DefaultKeepAlive,
			OnAttempt:      tracker.ReportDial,
		},
		Timeouts: layer4chain.Timeouts{
			Idle:        orDefault(h.IdleTimeout, defaultIdleTimeout),
			HalfClose:   orDefault(h.HalfCloseTimeout, defaultHalfCloseTimeout),
			MaxLifetime: time.Duration(h.MaxLifetime),
		},
	}
	switch h.ProxyProtocol {
	case "v1":
		p.EmitVersion = 1
	case "v2":
		p.EmitVersion = 2
	}
	if app := h.AcceptProxyProtocol; app != nil {
		allow, err := parsePrefixes(app.Allow)
		if err != nil {
			return fmt.Errorf("accept_proxy_protocol.allow: %w", err)
		}
		p.Accept = &layer4chain.ProxyAcceptor{Allow: allow, Timeout: orDefault(app.Timeout, defaultAcceptTimeout)}
	}
	h.proxy = p
	return nil
}

// check rejects bad values with an error naming the field. It runs in
// Provision, before anything is built from them.
func (h *Handler) check() error {
	if len(h.Upstreams) == 0 {
		return fmt.Errorf("upstreams: at least one upstream is required")
	}
	for i, u := range h.Upstreams {
		if u == nil || len(u.Dial) != 1 {
			return fmt.Errorf("upstreams[%d].dial: exactly one address is required", i)
		}
		if err := layer4chain.ValidateUpstreamAddr(u.Dial[0]); err != nil {
			return fmt.Errorf("upstreams[%d].dial: %w", i, err)
		}
	}
	for name, d := range map[string]caddy.Duration{
		"connect_timeout":    h.ConnectTimeout,
		"idle_timeout":       h.IdleTimeout,
		"half_close_timeout": h.HalfCloseTimeout,
		"max_lifetime":       h.MaxLifetime,
	} {
		if d < 0 {
			return fmt.Errorf("%s: must not be negative, got %s", name, time.Duration(d))
		}
	}
	if app := h.AcceptProxyProtocol; app != nil && app.Timeout < 0 {
		return fmt.Errorf("accept_proxy_protocol.timeout: must not be negative, got %s", time.Duration(app.Timeout))
	}
	switch h.ProxyProtocol {
	case "", "v1", "v2":
	default:
		return fmt.Errorf("proxy_protocol: unknown version %q (want v1 or v2)", h.ProxyProtocol)
	}
	if lb := h.LoadBalancing; lb != nil && lb.Tries < 0 {
		return fmt.Errorf("load_balancing.tries: must not be negative, got %d", lb.Tries)
	}
	for name, n := range map[string]int{
		"max_hops":                   h.MaxHops,
		"max_connections":            h.MaxConnections,
		"max_connections_per_client": h.MaxConnectionsPerClient,
	} {
		if n < 0 {
			return fmt.Errorf("%s: must not be negative, got %d", name, n)
		}
	}
	return nil
}

// Handle serves one connection until it ends.
func (h *Handler) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	if network := cx.LocalAddr().Network(); strings.HasPrefix(network, "udp") {
		return fmt.Errorf("chain proxies stream connections only, not %s", network)
	}
	// Bytes that matchers already read sit in cx's buffer: read them out
	// through cx (which empties the buffer), so that from here on the
	// underlying connection alone carries the stream and can be used raw.
	var pending []byte
	if n := len(cx.MatchingBytes()); n > 0 {
		pending = make([]byte, n)
		if _, err := io.ReadFull(cx, pending); err != nil {
			return fmt.Errorf("reading matched bytes: %w", err)
		}
	}
	meta := layer4chain.ClientMeta{Server: cx.LocalAddr().String()}
	if sni, ok := cx.Replacer().GetString("l4.tls.server_name"); ok {
		meta.SNI = sni
	}
	h.proxy.Serve(cx.Conn, pending, meta)
	// The outcome is in the tracker, its metrics and the access log;
	// returning an error would only add a duplicate line from caddy-l4.
	return nil
}

// scopeKey identifies this handler's configuration, so its connection
// limits are shared with the same configuration loaded again on a reload.
func (h *Handler) scopeKey() string {
	b, _ := json.Marshal(h)
	return string(b)
}

func orDefault(d caddy.Duration, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return time.Duration(d)
}

// parsePrefixes parses CIDRs and single IPs.
func parsePrefixes(list []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(list))
	for _, s := range list {
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("invalid CIDR %q: %w", s, err)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("invalid IP or CIDR %q: %w", s, err)
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// Interface guards
var (
	_ caddy.Provisioner  = (*Handler)(nil)
	_ layer4.NextHandler = (*Handler)(nil)
)
