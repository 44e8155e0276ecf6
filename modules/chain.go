// Package modules holds the Caddy modules of caddy-layer4chain: the
// layer4 handler `chain`, the app `layer4chain` and the admin API
// `admin.api.layer4chain`. They translate JSON config and Caddy's lifecycle
// into calls on the engine in package layer4chain.
package modules

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// Defaults of the handler, documented on the fields they fill. What 0 and
// negative values mean is decided once, in limits.go.
const (
	defaultConnectTimeout   = layer4chain.DefaultConnectTimeout
	defaultIdleTimeout      = time.Hour
	defaultHalfCloseTimeout = 5 * time.Minute
	defaultAcceptTimeout    = layer4chain.DefaultProxyTimeout
	// maxMaxHops is the most hops the hop-count TLV (one byte) can count.
	maxMaxHops = 255
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
	// address in Caddy's network-address form: "host:port", "[::1]:port",
	// "tcp/host:port", or "tcp4/host:port" and "tcp6/host:port" to dial
	// over that IP family only. A plain address string is accepted in place
	// of the object. Other networks (udp/, unix/) are rejected: chain
	// proxies TCP.
	Upstreams []*Upstream `json:"upstreams,omitempty"`

	// LoadBalancing chooses the upstream for each connection and how many
	// dial attempts to make before giving up.
	LoadBalancing *LoadBalancing `json:"load_balancing,omitempty"`

	// HealthChecks lets the handler skip upstreams known to be failing: a
	// circuit breaker over its dial failures (passive) and background
	// probes (active). Both are off by default. When every upstream is
	// skipped, a new connection fails at once (close reason
	// no_healthy_upstream) unless load_balancing.try_duration retries.
	HealthChecks *HealthChecks `json:"health_checks,omitempty"`

	// ConnectTimeout bounds every dial attempt; a timed-out attempt fails
	// over to the next upstream. Absent or 0: 5s. It cannot be switched
	// off: an unreachable upstream would hold each client for the kernel's
	// minutes of SYN retries. At least 1ms.
	ConnectTimeout caddy.Duration `json:"connect_timeout,omitempty"`

	// IdleTimeout closes a connection that moved no byte in either
	// direction for this long (close reason idle_timeout). Absent or 0: 1h;
	// negative (-1): off, no inactivity limit. At least 1ms.
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// HalfCloseTimeout applies once one direction has ended: the remaining
	// direction is closed after moving no byte for this long (close reason
	// half_close_timeout). It is an inactivity limit, so a stream that keeps
	// flowing is never cut. Absent or 0: 5m; negative (-1): off. At least
	// 1ms.
	HalfCloseTimeout caddy.Duration `json:"half_close_timeout,omitempty"`

	// MaxLifetime closes a connection this long after it was accepted,
	// however active (close reason max_lifetime). Absent or 0: no limit;
	// negative (-1) too. At least 1ms.
	MaxLifetime caddy.Duration `json:"max_lifetime,omitempty"`

	// ProxyProtocol sends a PROXY protocol header of this version ("v1" or
	// "v2") to the upstream, carrying the original client address. v2 also
	// carries the chain ID (PP2_TYPE_UNIQUE_ID), the hop count (TLV 0xE0)
	// and the TLS server name (PP2_TYPE_AUTHORITY) when known. When
	// caddy-l4's tls handler terminated TLS before chain, v2 also describes
	// that session: the negotiated protocol (PP2_TYPE_ALPN) and
	// PP2_TYPE_SSL (version, cipher, and the client certificate's CN when
	// it was verified). Default: empty, no header.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`

	// ProxyProtocolCRC32C adds a checksum (PP2_TYPE_CRC32C) to the v2
	// header sent upstream, so that the next hop can tell a header changed
	// on the way. Requires proxy_protocol v2. Default: false. A received
	// header that carries a CRC32C is always verified; a mismatch closes
	// the connection (proxy_protocol_rejected, malformed).
	ProxyProtocolCRC32C bool `json:"proxy_protocol_crc32c,omitempty"`

	// ForwardTLVs lists the TLV types, as numbers 0 to 255, that are copied
	// from a trusted previous hop's v2 header into the v2 header sent
	// upstream, after the chain ID and hop count, which always travel. For
	// example 32 (0x20, SSL), 1 (0x01, ALPN) or 229 (0xE5, custom); the
	// Caddyfile also takes hex ("0x20"). A forwarded ALPN or SSL TLV
	// replaces the one describing a TLS session terminated on this hop.
	// The types chain sends itself cannot be listed: 2 (authority, which
	// travels anyway), 3 (CRC32C), 5 (unique ID), 224 (0xE0, hop count) and
	// 225 (0xE1, the trace parent of the app's tracing).
	// Requires proxy_protocol v2 and accept_proxy_protocol. Default: none.
	ForwardTLVs []int `json:"forward_tlvs,omitempty"`

	// AcceptProxyProtocol, if set, reads a PROXY protocol header (v1 or v2)
	// from the previous hop. Peers in its allow list are trusted and must
	// send one (unless its policy is optional); a malformed or slow header
	// from them closes the connection before any dial (close reason
	// proxy_protocol_rejected). Any other peer is a direct client, dialed
	// at once; a PROXY header it sends is refused the same way, and none of
	// it reaches the upstream.
	AcceptProxyProtocol *AcceptProxyProtocol `json:"accept_proxy_protocol,omitempty"`

	// MaxHops closes a connection whose incoming hop count (from a PROXY v2
	// header) has reached this number (close reason loop_detected), so a
	// misconfigured loop cannot multiply connections. Absent or 0: 8. It
	// cannot be switched off (a loop would multiply connections without
	// end); at most 255, the most the hop count carries.
	MaxHops int `json:"max_hops,omitempty"`

	// MaxConnections caps the connections this handler serves at once;
	// more are closed at once (close reason limit_exceeded). Absent or 0:
	// no limit; negative (-1) too.
	MaxConnections int `json:"max_connections,omitempty"`

	// MaxConnectionsPerClient caps the connections of one original client
	// IP (the PROXY header's source when accepted, else the socket peer).
	// Absent or 0: no limit; negative (-1) too.
	MaxConnectionsPerClient int `json:"max_connections_per_client,omitempty"`

	proxy *layer4chain.Proxy
	// dials are the engine addresses of Upstreams, as check normalized
	// them ("tcp/" dropped, so the same address shares one Upstream).
	dials []string
	// acquired are the addresses whose pool references Cleanup gives back.
	acquired []string
	// noTLSWarning says once that allow_certificates cannot match.
	noTLSWarning sync.Once
	// l4ProxyProtocolWarning says once that caddy-l4's proxy_protocol
	// handler read the header before chain could.
	l4ProxyProtocolWarning sync.Once
	// templates: an upstream address or TLS server name has placeholders
	// that each connection fills (see dialAddr).
	templates bool
}

// Upstream is one address to proxy to.
type Upstream struct {
	// Dial is the upstream's network address: "host:port", "[::1]:port",
	// "tcp/host:port", "tcp4/host:port" or "tcp6/host:port". Exactly one
	// address is allowed.
	Dial []string `json:"dial,omitempty"`

	// MaxConnections caps the connections established to this upstream at
	// once, counted across every handler of the process that dials the
	// same address; a full upstream is skipped like an unhealthy one.
	// Absent or 0: no limit; negative (-1) too.
	MaxConnections int `json:"max_connections,omitempty"`

	// Weight is the upstream's share of connections under the
	// weighted_round_robin policy: an upstream of weight 3 gets three
	// connections for every one of an upstream of weight 1. Other policies
	// ignore it. Absent or 0: 1. At least 1 when set.
	Weight int `json:"weight,omitempty"`

	// TLS dials this upstream over TLS, with caddy-l4 proxy's upstream
	// "tls" object (Caddy reverse_proxy's TLS config): "server_name"
	// (default: the dial address's host, which the certificate must
	// match), "ca" (a tls.ca_pool.source module, e.g. {"provider":
	// "file", "pem_files": [...]}) or "root_ca_pem_files" (default: the
	// system's roots), "client_certificate_file" and
	// "client_certificate_key_file" (a certificate the next hop can
	// verify; default none), "insecure_skip_verify" (default false; never
	// between machines: the header could be read and forged), "curves",
	// "renegotiation". connect_timeout bounds the TCP connect and the
	// handshake together ("handshake_timeout" and "except_ports" are
	// rejected). The PROXY header and every byte go inside the session.
	// Active health checks stay plain TCP connects. Absent: plain TCP.
	TLS *reverseproxy.TLSConfig `json:"tls,omitempty"`

	// rejected holds the fields of the JSON object that are not accepted,
	// in the object's order, so that check can name them with the
	// upstream's index, which UnmarshalJSON does not know.
	rejected []string
}

// notYet says what to use instead of an upstream field that caddy-l4 has
// and that chain does not have yet.
var notYet = map[string]string{}

// UnmarshalJSON decodes the handler's config strictly, naming the field of
// a bad value (see strictDecode).
func (h *Handler) UnmarshalJSON(b []byte) error {
	type plain Handler // the same fields, without this method
	return strictDecode(b, (*plain)(h))
}

// UnmarshalJSON accepts an upstream object or a plain address string. It
// is strict like Caddy's own decoding: an unknown field fails the load, in
// check, with the upstream's index.
func (u *Upstream) UnmarshalJSON(b []byte) error {
	if b = bytes.TrimSpace(b); len(b) > 0 && b[0] == '"' {
		var addr string
		if err := json.Unmarshal(b, &addr); err != nil {
			return err
		}
		u.Dial = []string{addr}
		return nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	for name, v := range fields {
		var dst any
		switch name {
		case "dial":
			dst = &u.Dial
		case "max_connections":
			dst = &u.MaxConnections
		case "weight":
			dst = &u.Weight
		case "tls":
			dst = &u.TLS
		default:
			u.rejected = append(u.rejected, name)
			continue
		}
		if err := strictDecode(v, dst); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	slices.Sort(u.rejected)
	return nil
}

// LoadBalancing chooses upstreams.
type LoadBalancing struct {
	// Selection is the policy that picks the first upstream to try; on
	// failure the following upstreams are tried in configured order.
	Selection *Selection `json:"selection,omitempty"`

	// Tries is how many dial attempts to make, across upstreams, before
	// closing the client. Default: one per upstream. When it exceeds the
	// number of upstreams, two attempts on the same upstream are
	// try_interval apart.
	Tries int `json:"tries,omitempty"`

	// TryDuration is how long a connection keeps retrying, in rounds of
	// Tries attempts try_interval apart, while no upstream can be dialed
	// (all unhealthy, full or failing), before it is closed. Absent or 0:
	// no retrying: when no upstream is available the connection fails at
	// once with close reason no_healthy_upstream; negative (-1) too. At
	// least 1ms.
	TryDuration caddy.Duration `json:"try_duration,omitempty"`

	// TryInterval is the wait between two retry rounds, and between two
	// attempts on the same upstream when tries exceeds the number of
	// upstreams, so a dead upstream is never hammered in a tight loop.
	// Absent or 0: 250ms. It cannot be off: without a wait, retrying while
	// every upstream is down would spin on the CPU. At least 1ms.
	TryInterval caddy.Duration `json:"try_interval,omitempty"`
}

// Selection names a load balancing policy.
type Selection struct {
	// Policy is one of first (default: always the first upstream that
	// connects), round_robin, weighted_round_robin (by each upstream's
	// weight), least_conn, random, ip_hash (by original client IP).
	// Unhealthy and full upstreams are skipped by every policy.
	Policy string `json:"policy,omitempty"`
}

// AcceptProxyProtocol configures reading PROXY headers from previous hops.
type AcceptProxyProtocol struct {
	// Allow lists the peers (CIDRs or single IPs) whose PROXY headers are
	// trusted. Required: an empty list would trust nobody. Under the
	// require policy a trusted peer must send a header; one that sends
	// nothing is rejected (missing) once Timeout has passed (see Policy).
	// A peer outside the list is served as a direct client without
	// waiting, so protocols where the server speaks first work; its first
	// bytes are screened: a PROXY header is rejected (untrusted), and bytes
	// that start like one are held until decided. A prefix of length 0 (0.0.0.0/0, ::/0) trusts every peer, so any client
	// could forge its address; it loads with a warning.
	Allow []string `json:"allow,omitempty"`

	// AllowCertificates trusts a previous hop by its client certificate,
	// whatever its address: a peer whose certificate was verified by
	// caddy-l4's tls handler before chain in the same route, and whose
	// Subject CN or one of whose DNS SANs is in this list (compared
	// without case), is trusted like a peer in Allow. It requires that
	// handler to verify client certificates against the previous hop's
	// CA: tls { connection_policies { client_auth { mode
	// require_and_verify; trusted_ca_cert_file ... } } }; a certificate
	// that was not verified never matches. Allow may then be empty.
	// Default: none, trust by address only.
	AllowCertificates []string `json:"allow_certificates,omitempty"`

	// Timeout bounds how long a trusted peer's header may take to arrive
	// whole, and how long an untrusted peer's bytes that start like a
	// PROXY signature may stay undecided. Absent or 0: 3s. It cannot be switched off: a peer that never
	// finishes its header would hold the connection forever. At least 1ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Policy says whether a trusted peer must send a header. "require"
	// (default, also when empty): it must, or the connection is closed
	// (proxy_protocol_rejected). "optional": a trusted peer may send a
	// header or none on the same port; its first bytes decide: a PROXY
	// signature is read and used, bytes that cannot start one make it a
	// direct client, forwarded as they are, and a partial signature is held
	// until decided. A trusted peer that sends nothing is served as a
	// direct client once Timeout has passed, so under optional a
	// server-speaks-first protocol (SMTP, MySQL, SSH) from a trusted
	// address waits Timeout for its greeting. Untrusted peers are screened
	// the same under both policies: their headers are never used.
	Policy string `json:"policy,omitempty"`
}

// The values of accept_proxy_protocol.policy.
const (
	policyRequire  = "require"
	policyOptional = "optional"
)

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.chain",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision fills defaults and builds the engine's proxy.
func (h *Handler) Provision(ctx caddy.Context) error {
	if err := h.check(false); err != nil {
		return err
	}
	// The app runs the sweeps, the metrics, the shutdown drain and this
	// handler's health checks; load it (with defaults when the config has
	// none) so they exist.
	appModule, err := ctx.App("layer4chain")
	if err != nil {
		return fmt.Errorf("loading the layer4chain app: %w", err)
	}

	// References to the pool's upstreams; Cleanup gives them back, also
	// when Provision fails below (Caddy calls Cleanup then).
	upstreams := make([]*layer4chain.Upstream, len(h.dials))
	limits := make([]layer4chain.UpstreamLimits, len(h.dials))
	for i, addr := range h.dials {
		upstreams[i] = acquireUpstream(addr)
		h.acquired = append(h.acquired, addr)
		limits[i] = layer4chain.UpstreamLimits{
			MaxConnections: resolveLimit(h.Upstreams[i].MaxConnections, 0),
			Weight:         resolveLimit(h.Upstreams[i].Weight, 1),
		}
	}
	policy, tries := "", 0
	var tryDuration, tryInterval time.Duration = 0, defaultTryInterval
	if lb := h.LoadBalancing; lb != nil {
		tries = lb.Tries
		if lb.Selection != nil {
			policy = lb.Selection.Policy
		}
		tryDuration = resolveDuration(lb.TryDuration, 0)
		tryInterval = resolveDuration(lb.TryInterval, defaultTryInterval)
	}
	balancer, err := layer4chain.NewBalancer(policy, upstreams, tries)
	if err != nil {
		return fmt.Errorf("load_balancing.selection.policy: %w", err)
	}
	if err := balancer.SetUpstreamLimits(limits); err != nil {
		return fmt.Errorf("upstreams: %w", err)
	}

	upstreamTLS, err := h.upstreamTLS(ctx, upstreams)
	if err != nil {
		return err
	}
	for _, u := range upstreams {
		var serverName string
		if upstreamTLS != nil {
			if cfg := upstreamTLS(u); cfg != nil {
				serverName = cfg.ServerName
			}
		}
		h.templates = h.templates || u.Template() || layer4chain.HasPlaceholder(serverName)
	}

	tracker := processTracker()
	p := &layer4chain.Proxy{
		Tracker: tracker,
		Scope:   h.scopeKey(),
		Limits: layer4chain.Limits{
			MaxConnections:          resolveLimit(h.MaxConnections, 0),
			MaxConnectionsPerClient: resolveLimit(h.MaxConnectionsPerClient, 0),
		},
		MaxHops:  h.MaxHops,
		Balancer: balancer,
		Dialer: &layer4chain.Dialer{
			ConnectTimeout: resolveDuration(h.ConnectTimeout, defaultConnectTimeout),
			KeepAlive:      layer4chain.DefaultKeepAlive,
			OnAttempt:      tracker.ReportDial,
			MaxConnections: balancer.MaxConnectionsOf,
			TryInterval:    tryInterval,
			TLS:            upstreamTLS,
		},
		TryDuration: tryDuration,
		Timeouts: layer4chain.Timeouts{
			Idle:        resolveDuration(h.IdleTimeout, defaultIdleTimeout),
			HalfClose:   resolveDuration(h.HalfCloseTimeout, defaultHalfCloseTimeout),
			MaxLifetime: resolveDuration(h.MaxLifetime, 0),
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
		for _, pfx := range allow {
			if pfx.Bits() == 0 {
				ctx.Logger().Warn("accept_proxy_protocol.allow trusts every peer: any client can forge the client address it forwards; list the previous hops instead",
					zap.String("prefix", pfx.String()))
			}
		}
		p.Accept = &layer4chain.ProxyAcceptor{Allow: allow, Timeout: resolveDuration(app.Timeout, defaultAcceptTimeout),
			Optional: app.Policy == policyOptional}
	}
	p.EmitCRC32C = h.ProxyProtocolCRC32C
	for _, t := range h.ForwardTLVs {
		p.ForwardTLVs = append(p.ForwardTLVs, byte(t))
	}
	if hc := h.HealthChecks; hc != nil && hc.Passive != nil {
		ps := hc.Passive
		p.Dialer.Passive = &layer4chain.PassiveHealth{
			FailDuration:             resolveDuration(ps.FailDuration, 0),
			MaxFails:                 resolveLimit(ps.MaxFails, defaultMaxFails),
			UnhealthyConnectionCount: resolveLimit(ps.UnhealthyConnectionCount, 0),
		}
	}
	if app := h.AcceptProxyProtocol; app != nil {
		p.Accept.AllowCertificates = app.AllowCertificates
	}
	p.Tracer = appModule.(*App).tracer
	h.proxy = p
	// Checks and close_if_unhealthy act on the running config only: the
	// app starts them when this config starts, so a config that fails to
	// load never probes or closes anything.
	appModule.(*App).onStart(h.healthRuntime(tracker, uniqueUpstreams(upstreams), p.EmitVersion != 0, upstreamTLS))
	return nil
}

// healthRuntime returns what starts this handler's active checks, its
// close_if_unhealthy watchers and its hold on its upstreams' circuits, and
// what stops them.
func (h *Handler) healthRuntime(tracker *layer4chain.Tracker, upstreams []*layer4chain.Upstream, sendsProxy bool, upstreamTLS func(*layer4chain.Upstream) *tls.Config) func() (stop func()) {
	hc := h.HealthChecks
	if hc == nil {
		return nil
	}
	scope := h.proxy.Scope
	return func() (stop func()) {
		var stops []func()
		watch := func(on layer4chain.Health, why string) {
			for _, u := range upstreams {
				stops = append(stops, u.OnHealth(on, func() {
					tracker.CloseUpstream(u.Addr, scope, layer4chain.ReasonUpstreamUnhealthy, why+u.Info().LastError)
				}))
			}
		}
		if hc.Passive != nil && resolveDuration(hc.Passive.FailDuration, 0) > 0 {
			for _, u := range upstreams {
				stops = append(stops, u.UseBreaker())
			}
		}
		if hc.Passive != nil && hc.Passive.CloseIfUnhealthy {
			watch(layer4chain.HealthOpen, "its circuit opened: ")
		}
		if a := hc.Active; a != nil {
			if a.CloseIfUnhealthy {
				watch(layer4chain.HealthUnhealthy, "active checks marked it unhealthy: ")
			}
			stops = append(stops, layer4chain.StartHealthChecks(upstreams, layer4chain.ActiveHealth{
				Port:            a.Port,
				Interval:        resolveDuration(a.Interval, defaultHealthInterval),
				Timeout:         resolveDuration(a.Timeout, defaultHealthTimeout),
				Fall:            resolveLimit(a.Fall, defaultHealthFall),
				Rise:            resolveLimit(a.Rise, defaultHealthRise),
				SendProxyHeader: sendsProxy,
				TLS:             upstreamTLS,
			}))
		}
		return func() {
			for _, s := range stops {
				s()
			}
		}
	}
}

// Cleanup gives back the handler's references to the pool's upstreams, so
// an upstream no loaded config lists leaves nothing behind. Caddy calls it
// when the handler's config is unloaded, and when Provision failed. (Its
// health checks ended with its config's app.)
func (h *Handler) Cleanup() error {
	for _, addr := range h.acquired {
		releaseUpstream(addr)
	}
	h.acquired = nil
	return nil
}

// uniqueUpstreams drops repeats of an upstream listed twice, so active
// checks probe it once per interval.
func uniqueUpstreams(list []*layer4chain.Upstream) []*layer4chain.Upstream {
	out := make([]*layer4chain.Upstream, 0, len(list))
	for _, u := range list {
		if !slices.Contains(out, u) {
			out = append(out, u)
		}
	}
	return out
}

// check rejects bad values with an error naming the field. It runs in
// Provision, before anything is built from them, and fills h.dials; and
// at the end of UnmarshalCaddyfile (adapting), so that a mistake between
// options fails `caddy adapt` at the directive's line. Adapting, an
// address with a placeholder is left for the load: {env.*} may be set only
// where Caddy runs.
func (h *Handler) check(adapting bool) error {
	if len(h.Upstreams) == 0 {
		return fmt.Errorf("upstreams: at least one upstream is required")
	}
	h.dials = make([]string, len(h.Upstreams))
	for i, u := range h.Upstreams {
		if u == nil {
			return fmt.Errorf("upstreams[%d]: an upstream object is required, got null", i)
		}
		for _, name := range u.rejected {
			if why, ok := notYet[name]; ok {
				return fmt.Errorf("upstreams[%d].%s: %s", i, name, why)
			}
			return fmt.Errorf("upstreams[%d]: unknown field %q", i, name)
		}
		if len(u.Dial) != 1 {
			return fmt.Errorf("upstreams[%d].dial: exactly one address is required", i)
		}
		if err := checkUpstreamLimits(i, u); err != nil {
			return err
		}
		if err := checkUpstreamTLS(i, u.TLS); err != nil {
			return err
		}
		if adapting && strings.Contains(u.Dial[0], "{") {
			continue
		}
		addr, err := dialAddr(u.Dial[0])
		if err != nil {
			return fmt.Errorf("upstreams[%d].dial: %w", i, err)
		}
		h.dials[i] = addr
	}
	for _, opt := range []struct {
		name      string
		value     caddy.Duration
		whyNotOff string
	}{
		{"connect_timeout", h.ConnectTimeout, whyConnectTimeoutOn},
		{"idle_timeout", h.IdleTimeout, ""},
		{"half_close_timeout", h.HalfCloseTimeout, ""},
		{"max_lifetime", h.MaxLifetime, ""},
	} {
		if err := checkDuration(opt.name, opt.value, opt.whyNotOff); err != nil {
			return err
		}
	}
	if app := h.AcceptProxyProtocol; app != nil {
		if len(app.Allow) == 0 && len(app.AllowCertificates) == 0 {
			return fmt.Errorf("accept_proxy_protocol.allow: empty, so no peer is trusted and every PROXY header would be rejected; list the previous hops' IPs or CIDRs (e.g. \"10.0.0.0/8\") or their certificate names in allow_certificates, or leave accept_proxy_protocol out")
		}
		if _, err := parsePrefixes(app.Allow); err != nil {
			return fmt.Errorf("accept_proxy_protocol.allow: %w", err)
		}
		for i, name := range app.AllowCertificates {
			// Names are compared literally: a pattern would match only a
			// certificate that carries the pattern itself.
			switch {
			case name == "" || strings.ContainsAny(name, "*? "):
				return fmt.Errorf("accept_proxy_protocol.allow_certificates[%d]: %q is not a certificate name; list each previous hop's exact CN or DNS SAN (patterns are not supported)", i, name)
			case strings.ContainsAny(name, "=,"):
				return fmt.Errorf("accept_proxy_protocol.allow_certificates[%d]: %q is a distinguished name, as HAProxy and nginx write them; list the CN or a DNS SAN itself (for CN=outer.chain.test: \"outer.chain.test\")", i, name)
			case strings.HasSuffix(name, "."):
				return fmt.Errorf("accept_proxy_protocol.allow_certificates[%d]: %q ends with a dot, which no certificate name has; drop it", i, name)
			}
		}
		if err := checkDuration("accept_proxy_protocol.timeout", app.Timeout, whyAcceptTimeoutOn); err != nil {
			return err
		}
		switch app.Policy {
		case "", policyRequire, policyOptional:
		default:
			return fmt.Errorf("accept_proxy_protocol.policy: unknown policy %q (want %s or %s)", app.Policy, policyRequire, policyOptional)
		}
	}
	switch h.ProxyProtocol {
	case "", "v1", "v2":
	default:
		return fmt.Errorf("proxy_protocol: unknown version %q (want v1 or v2)", h.ProxyProtocol)
	}
	if h.ProxyProtocolCRC32C && h.ProxyProtocol != "v2" {
		return fmt.Errorf("proxy_protocol_crc32c: the checksum is a v2 TLV; set proxy_protocol to v2")
	}
	if err := h.checkForwardTLVs(); err != nil {
		return err
	}
	if lb := h.LoadBalancing; lb != nil {
		if err := checkLimit("load_balancing.tries", lb.Tries, whyTriesOn, maxTries); err != nil {
			return err
		}
	}
	if err := checkRetry(h.LoadBalancing); err != nil {
		return err
	}
	if err := checkHealthChecks(h.HealthChecks); err != nil {
		return err
	}
	if hc := h.HealthChecks; hc != nil && hc.Active != nil {
		for i, d := range h.dials {
			if layer4chain.HasPlaceholder(d) {
				return fmt.Errorf("health_checks.active: upstreams[%d] (%q) has placeholders that each connection fills, and a probe has no connection to fill them; list the addresses, or leave active checks out (in a Caddyfile, any health_* option, and close_if_unhealthy without fail_duration, switch them on)", i, d)
			}
		}
	}
	if err := checkLimit("max_hops", h.MaxHops, whyMaxHopsOn, maxMaxHops); err != nil {
		return err
	}
	if err := checkLimit("max_connections", h.MaxConnections, "", 0); err != nil {
		return err
	}
	return checkLimit("max_connections_per_client", h.MaxConnectionsPerClient, "", 0)
}

// checkForwardTLVs rejects forward_tlvs that could not work: types out of
// range, listed twice, or generated by chain itself, and a list without a
// header to read them from or one to copy them into.
func (h *Handler) checkForwardTLVs() error {
	if len(h.ForwardTLVs) == 0 {
		return nil
	}
	if h.ProxyProtocol != "v2" {
		return fmt.Errorf("forward_tlvs: TLVs travel in PROXY v2 only; set proxy_protocol to v2")
	}
	if h.AcceptProxyProtocol == nil {
		return fmt.Errorf("forward_tlvs: there is no header to forward TLVs from; set accept_proxy_protocol")
	}
	for i, t := range h.ForwardTLVs {
		switch {
		case t < 0 || t > 255:
			return fmt.Errorf("forward_tlvs[%d]: %d is not a TLV type (0 to 255)", i, t)
		case layer4chain.IsGeneratedTLV(byte(t)):
			return fmt.Errorf("forward_tlvs[%d]: type %d (0x%02X) is sent by chain itself (authority, CRC32C, unique ID, hop count or trace parent) and cannot be forwarded", i, t, t)
		case slices.Contains(h.ForwardTLVs[:i], t):
			return fmt.Errorf("forward_tlvs[%d]: type %d (0x%02X) is listed twice", i, t, t)
		}
	}
	return nil
}

// placeholders matches one placeholder of an address or a server name.
var placeholders = regexp.MustCompile(`\{[^{}]*\}`)

// templateAddr checks an upstream address with placeholders that only a
// connection fills: caddy-l4's ({l4.tls.server_name}, {l4.regexp.*}, ...),
// any other being a typo that would fill to nothing. Its shape is checked
// with each placeholder standing for one character, or for a whole
// host:port when it is the whole address, as caddy-l4's proxy allows.
func templateAddr(addr string) (string, error) {
	for _, ph := range placeholders.FindAllString(addr, -1) {
		if !strings.HasPrefix(ph, "{l4.") {
			return "", fmt.Errorf("%q: %s is no placeholder a connection fills (those are caddy-l4's {l4.*}) nor one known at load ({env.*}, {system.*}, ...)", addr, ph)
		}
	}
	if whole := strings.TrimPrefix(addr, "tcp/"); placeholders.FindString(whole) == whole {
		return whole, nil
	}
	shape := placeholders.ReplaceAllString(addr, "1")
	if _, err := dialAddr(shape); err != nil {
		return "", fmt.Errorf("%q, its placeholders aside: %w", addr, err)
	}
	return strings.TrimPrefix(addr, "tcp/"), nil
}

// dialAddr turns an upstream address in Caddy's network-address form into
// the engine's: "tcp/" is dropped, so "tcp/h:p" and "h:p" are one upstream;
// "tcp4/" and "tcp6/" are kept, for the engine dials over that family.
func dialAddr(addr string) (_ string, err error) {
	var written string // addr before placeholders known at load filled it
	defer func() {
		if err != nil && written != "" {
			err = fmt.Errorf("%w (written %q: placeholders known at load filled it, an unset {env.*} with nothing)", err, written)
		}
	}()
	// Placeholders known at load ({env.*}, {system.*}, ...) are resolved
	// here, once, as caddy-l4's proxy does; what is left needs the
	// connection ({l4.tls.server_name}, ...): the address is a template,
	// filled per connection (see Handle), whose shape is checked here
	// with each placeholder standing for one character.
	if strings.ContainsAny(addr, "{}") {
		if filled := caddy.NewReplacer().ReplaceKnown(addr, ""); filled != addr {
			written, addr = addr, filled
		}
		if layer4chain.HasPlaceholder(addr) {
			return templateAddr(addr)
		}
		if strings.ContainsAny(addr, "{}") {
			return "", fmt.Errorf("%q has a brace that opens or closes no placeholder", addr)
		}
	}
	na, err := caddy.ParseNetworkAddress(addr)
	if err == nil {
		switch {
		case na.Network != "tcp" && na.Network != "tcp4" && na.Network != "tcp6":
			return "", fmt.Errorf("%q is a %s address; chain proxies TCP: use host:port, tcp4/host:port or tcp6/host:port", addr, na.Network)
		case na.PortRangeSize() > 1:
			return "", fmt.Errorf("%q is a port range; give one port per upstream", addr)
		}
	}
	hostPort := addr
	if _, rest, ok := strings.Cut(addr, "/"); ok {
		hostPort = rest
	}
	// The engine's checks say more precisely what is wrong with a host or
	// a port than Caddy's parser does, so they run even when it failed.
	if err := layer4chain.ValidateUpstreamAddr(hostPort); err != nil {
		return "", err
	}
	if err != nil {
		return "", err
	}
	if na.Network == "tcp" {
		return hostPort, nil
	}
	// With its family, an IP of the other one is caught too.
	addr = na.Network + "/" + hostPort
	return addr, layer4chain.ValidateUpstreamAddr(addr)
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
	// caddy-l4's tls handler records each session it terminated; the
	// first is the client's own.
	if states, ok := cx.GetVar(layer4.TLSConnectionStatesVarName).([]*tls.ConnectionState); ok && len(states) > 0 {
		meta.TLS = states[0]
	}
	meta.Socket = clientSocket(cx)
	if h.templates {
		repl := cx.Replacer()
		meta.Resolve = func(s, sni string) string {
			// Behind a previous hop no tls matcher saw the client's SNI:
			// the header's authority stands in for it.
			if v, _ := repl.GetString("l4.tls.server_name"); v == "" && sni != "" {
				repl.Set("l4.tls.server_name", sni)
			}
			return repl.ReplaceAll(s, "")
		}
	}
	if meta.TLS == nil && h.AcceptProxyProtocol != nil && len(h.AcceptProxyProtocol.AllowCertificates) > 0 {
		h.noTLSWarning.Do(func() {
			logger().Warn("accept_proxy_protocol.allow_certificates trusts nobody here: no tls handler terminated TLS before chain, so no peer has a verified certificate; put caddy-l4's tls handler with client_auth before chain in the route",
				zap.String("server", meta.Server))
		})
	}
	if _, ok := cx.Conn.(*proxyproto.Conn); ok {
		h.l4ProxyProtocolWarning.Do(func() {
			logger().Warn("caddy-l4's proxy_protocol handler read the PROXY header before chain: the chain ID and hop count it carried are lost (trace cannot join this hop to the previous one, loops go uncounted), and with go-proxyproto v0.15 that handler does not enforce its allow list; remove it from the route and set chain's accept_proxy_protocol instead",
				zap.String("server", meta.Server))
		})
	}
	// The outcome is in the tracker, its metrics and the access log;
	// returning an error would only add a duplicate line from caddy-l4.
	if tc, ok := cx.Conn.(*net.TCPConn); ok {
		// A plain socket is taken over, so that caddy-l4's goroutine (the
		// deepest stack of the connection), its prefetch buffer and its
		// wrapper end once the connection is established: an idle
		// connection then costs two small stacks of ours and its sockets.
		if own, err := layer4chain.TakeOver(tc); err == nil {
			h.proxy.ServeDetached(own, pending, meta)
			return nil
		}
	}
	h.proxy.Serve(cx.Conn, pending, meta)
	return nil
}

// scopeKey identifies this handler's configuration, so its connection
// limits are shared with the same configuration loaded again on a reload.
func (h *Handler) scopeKey() string {
	b, _ := json.Marshal(h)
	return string(b)
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
	_ caddy.CleanerUpper = (*Handler)(nil)
	_ layer4.NextHandler = (*Handler)(nil)
)
