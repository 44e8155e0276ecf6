package layer4chain

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Defaults for a zero Dialer, chosen so an unreachable backend costs a client
// seconds rather than the kernel's minutes of SYN retries, and so dead peers
// behind NAT are noticed well before typical idle timeouts.
const (
	// DefaultConnectTimeout bounds each dial attempt when no timeout is set.
	DefaultConnectTimeout = 5 * time.Second
	// DefaultKeepAlive is the TCP keepalive period of the upstream socket.
	// (Client sockets accepted by Caddy's listeners get the same period
	// from Go's listener default.)
	DefaultKeepAlive = 15 * time.Second
)

// DialError is one failed connect attempt. The Reason is what the caller
// closes the client with, so logs, metrics and stats agree on why.
type DialError struct {
	// Upstream is the address that was dialed, or empty when there was
	// nothing to dial.
	Upstream string
	// Reason is connect_timeout, connect_refused or connect_failed.
	Reason CloseReason
	// Err is the underlying error, kept for errors.Is/As and for logs.
	Err error
}

// Error reads "dialing upstream 127.0.0.1:9: connect_refused: <err>", the
// reason word in the middle so it can be grepped without parsing.
func (e *DialError) Error() string {
	var b strings.Builder
	if e.Upstream == "" {
		b.WriteString("dialing: ") // nothing was dialed
	} else {
		b.WriteString("dialing upstream ")
		b.WriteString(e.Upstream)
		b.WriteString(": ")
	}
	b.WriteString(string(e.Reason))
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap exposes the underlying error so callers can still test for
// syscall errnos or context errors.
func (e *DialError) Unwrap() error {
	return e.Err
}

// ClassifyDialError maps a dial error to the reason a client is closed with.
// Only refusals and timeouts get their own words because they mean different
// things to an operator (backend down vs. backend or path black-holed);
// everything else, unreachable routes, bad addresses and cancellation
// included, is connect_failed. A nil error has no reason.
func ClassifyDialError(err error) CloseReason {
	if err == nil {
		return ReasonNone
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return ReasonConnectRefused
	}
	// Checked before the generic Timeout() test: a cancelled context is not
	// a timeout, and EAGAIN from connect means local port exhaustion, which
	// syscall.Errno would otherwise report as a timeout.
	if errors.Is(err, context.Canceled) || errors.Is(err, syscall.EAGAIN) {
		return ReasonConnectFailed
	}
	if errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, os.ErrDeadlineExceeded) ||
		errors.Is(err, syscall.ETIMEDOUT) {
		return ReasonConnectTimeout
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return ReasonConnectTimeout
	}
	return ReasonConnectFailed
}

// Dialer dials upstreams with a connect timeout per attempt and fails over
// to the next upstream on any failure. A zero Dialer is usable; it is safe
// for concurrent use as long as its fields are not changed meanwhile.
type Dialer struct {
	// ConnectTimeout bounds each attempt, not the whole Dial, so one
	// black-holed upstream cannot use up the time meant for the others.
	// Zero or negative means 5s.
	ConnectTimeout time.Duration
	// KeepAlive is the TCP keepalive idle time and probe interval for
	// upstream sockets, so a vanished upstream is noticed on long-lived
	// quiet connections. Zero means 15s; negative disables keepalives.
	KeepAlive time.Duration
	// OnFailure, if set, is called for every failed attempt (for metrics and
	// logs), synchronously and before the next attempt starts; not for one
	// that ended because ctx did (the caller stopped it, the upstream did
	// not fail).
	OnFailure func(*DialError)
	// OnAttempt, if set, is called after every attempt with how long it
	// took and its error (nil when it connected): for dial metrics. An
	// attempt that ended because ctx did is not one: it measured neither
	// the upstream's health nor its speed.
	OnAttempt func(upstream string, took time.Duration, err error)
	// Passive is the circuit breaker over dial failures; nil or a zero
	// FailDuration records failures without ever opening a circuit.
	Passive *PassiveHealth
	// MaxConnections, if set, returns the handler's limit on an upstream's
	// active connections (0: none); a full upstream is skipped.
	MaxConnections func(*Upstream) int
	// TryInterval is the pause before dialing an upstream a second time
	// within one Dial (when the order holds it twice), so tries beyond the
	// number of upstreams never hammer a failing one in a tight loop.
	// Zero or negative means 250ms.
	TryInterval time.Duration
	// TLS, if set, returns the client config for dialing an upstream over
	// TLS, or nil to dial it as plain TCP. The handshake is part of the
	// attempt: ConnectTimeout bounds connect and handshake together, and a
	// failed handshake fails over like a failed connect (connect_failed;
	// connect_timeout when the time ran out).
	TLS func(*Upstream) *tls.Config
}

// DefaultTryInterval is the pause between two attempts on one upstream, and
// between retry rounds, when no try_interval is set (caddy-l4's default).
const DefaultTryInterval = 250 * time.Millisecond

// DialAttempt is one failed dial attempt of a connection, for its access
// log line and its record.
type DialAttempt struct {
	// Upstream is the address dialed.
	Upstream string `json:"upstream"`
	// Reason classifies the failure.
	Reason CloseReason `json:"reason"`
	// Error is the dial error.
	Error string `json:"error"`
	// Duration is how long the attempt took, in nanoseconds.
	Duration time.Duration `json:"duration_ns"`
}

// errNoHealthyUpstream is the cause of a no_healthy_upstream DialError.
var errNoHealthyUpstream = errors.New("every upstream is unhealthy, open or full")

// Dial tries each upstream in order until one connects (and, when TLS says
// so, completes a TLS handshake), returning the connection (a
// *net.TCPConn, or a *tls.Conn over one) and the upstream used, which counts the connection among its
// active ones until the caller's Release. Upstreams that are unhealthy, whose
// circuit is open (or half-open with its trial taken) or that are full are
// skipped without a dial; when every one was skipped the error's Reason is
// no_healthy_upstream. When every attempt fails it returns the last
// attempt's *DialError, whose Reason the caller closes the client with.
// If ctx ends it stops at once, returning a *DialError wrapping ctx.Err()
// whose Reason is connect_failed for cancellation (connect_timeout if the
// context's own deadline passed); such an attempt is not held against the
// upstream, nor reported to OnFailure or OnAttempt. An empty order is a
// connect_failed DialError. Dial never panics.
func (d *Dialer) Dial(ctx context.Context, order []*Upstream) (net.Conn, *Upstream, error) {
	return d.dial(ctx, order, nil, nil)
}

// dial is Dial, recording failed attempts in rec when it is not nil.
func (d *Dialer) dial(ctx context.Context, order []*Upstream, rec *Record, resolve func(string) string) (net.Conn, *Upstream, error) {
	nd := d.netDialer()
	var last *DialError
	var triedBuf [8]*Upstream
	tried := triedBuf[:0]
	for _, u := range order {
		if err := ctxErr(ctx); err != nil {
			return nil, nil, &DialError{Upstream: addrOf(u), Reason: ClassifyDialError(err), Err: err}
		}
		if u == nil {
			last = &DialError{Reason: ReasonConnectFailed, Err: errors.New("nil upstream")}
			d.report(last)
			continue
		}
		if slices.Contains(tried, u) {
			if err := sleepCtx(ctx, d.tryInterval()); err != nil {
				return nil, nil, &DialError{Upstream: u.Addr, Reason: ClassifyDialError(err), Err: err}
			}
		}
		a := u.begin(d.Passive, d.maxConns(u))
		if !a.ok {
			continue
		}
		tried = append(tried, u)
		start := time.Now()
		c, addr, chosen, err := d.connect(ctx, &nd, u, start, resolve)
		took := time.Since(start)
		if err == nil {
			if d.OnAttempt != nil {
				d.OnAttempt(u.Addr, took, nil)
			}
			u.succeeded(a)
			if rec != nil {
				rec.mu.Lock()
				rec.upstream, rec.template = addr, ""
				if u.template {
					rec.template = u.Addr
				}
				rec.mu.Unlock()
			}
			return c, u, nil
		}
		last = &DialError{Upstream: addr, Reason: ClassifyDialError(err), Err: err}
		ctxErr := ctxErr(ctx)
		if d.OnAttempt != nil && ctxErr == nil {
			d.OnAttempt(u.Addr, took, err)
		}
		if ctxErr != nil {
			// The failure may be the cancellation itself or a coincidence;
			// either way the caller asked us to stop, and that is the reason
			// it must see. The upstream is not to blame, nor counted as
			// failing.
			u.abandoned(a)
			if !errors.Is(err, ctxErr) {
				err = fmt.Errorf("%w: %w", ctxErr, err)
			}
			return nil, nil, &DialError{Upstream: addr, Reason: ClassifyDialError(ctxErr), Err: err}
		}
		if chosen {
			// This connection's values made the address or the TLS name
			// (or none): a client could pick a failing one on purpose, so
			// no step towards opening the circuit every client shares.
			u.abandoned(a)
		} else {
			u.failed(a, d.Passive, err)
		}
		d.report(last)
		if rec != nil {
			rec.addFailedDial(DialAttempt{Upstream: addr, Reason: last.Reason, Error: err.Error(), Duration: took})
		}
	}
	if last == nil {
		if err := ctx.Err(); err != nil {
			return nil, nil, &DialError{Reason: ClassifyDialError(err), Err: err}
		}
		if len(order) > 0 {
			return nil, nil, &DialError{Reason: ReasonNoHealthyUpstream, Err: d.noneAvailable(order)}
		}
		return nil, nil, &DialError{Reason: ReasonConnectFailed, Err: errors.New("no upstreams to dial")}
	}
	return nil, nil, last
}

// ctxErr is ctx.Err(), or the error of ctx's deadline as soon as it has
// passed: a dial that its context's deadline cut short can return before
// the context's own timer has marked it done, and must not read as a
// connect timeout of the upstream.
func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}

// noneAvailable is the error of a connection none of whose upstreams could
// be tried: it says why each was skipped, for the close line.
func (d *Dialer) noneAvailable(order []*Upstream) error {
	var why []string
	var seen []*Upstream
	for _, u := range order {
		if u == nil || slices.Contains(seen, u) {
			continue
		}
		seen = append(seen, u)
		why = append(why, u.Addr+" "+u.whyUnavailable(d.Passive, d.maxConns(u)))
	}
	return fmt.Errorf("%w: %s", errNoHealthyUpstream, strings.Join(why, ", "))
}

// connect makes one attempt on u: the TCP connect and, when u is dialed
// over TLS, the handshake, both within one connect timeout from start.
//
// An upstream whose address has placeholders (a template) is dialed at
// what resolve makes of it for this connection, and a TLS server name with
// placeholders is filled the same way, both before the dial; its health,
// limits and metrics stay the template's, while addr, the address dialed,
// is the filled one (u.Addr for a fixed address, or a template that could
// not be filled), for the connection's record. chosen says that the attempt
// went where this connection's values (an SNI, say: the client's choice)
// sent it: its failure is not the upstream's (see dial).
func (d *Dialer) connect(ctx context.Context, nd *net.Dialer, u *Upstream, start time.Time, resolve func(string) string) (c net.Conn, addr string, chosen bool, err error) {
	fill := func(what, s string) (string, error) {
		if resolve == nil {
			return "", fmt.Errorf("%w: %s %q has placeholders and nothing to fill them", errUnresolvedUpstream, what, s)
		}
		return resolve(s), nil
	}
	addr, hostPort := u.Addr, u.hostPort()
	if u.template {
		if hostPort, err = fill("address", hostPort); err != nil {
			return nil, addr, true, err
		}
		if strings.ContainsFunc(hostPort, notInAddress) {
			// The connection's values can be anything a client sent: the
			// message quotes them escaped, and the resolver never sees them.
			return nil, addr, true, fmt.Errorf("%w: %q, filled for this connection, is %q: no address has such characters", errUnresolvedUpstream, u.Addr, hostPort)
		}
		if err := validateHostPort(hostPort); err != nil {
			return nil, addr, true, fmt.Errorf("%w: %q, filled for this connection: %w", errUnresolvedUpstream, u.Addr, err)
		}
		if addr = hostPort; u.Addr != u.hostPort() {
			addr = u.network() + "/" + hostPort
		}
	}
	var cfg *tls.Config
	if d.TLS != nil {
		cfg = d.TLS(u)
	}
	if cfg != nil && HasPlaceholder(cfg.ServerName) {
		name, err := fill("TLS server name", cfg.ServerName)
		if err != nil {
			return nil, addr, true, err
		}
		if name == "" || strings.ContainsFunc(name, notInAddress) {
			return nil, addr, true, fmt.Errorf("%w: TLS server name %q, filled for this connection, is %q: empty, or characters no server name has", errUnresolvedUpstream, cfg.ServerName, name)
		}
		cfg = cfg.Clone()
		cfg.ServerName = name
		chosen = true
	}
	chosen = chosen || u.template
	nc, err := nd.DialContext(ctx, u.network(), hostPort)
	if err != nil {
		return nil, addr, u.template, err // a fixed address refusing is the upstream's failure
	}
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		// Unreachable for TCP networks, but a wrong type must not crash
		// the hop.
		nc.Close()
		return nil, addr, chosen, fmt.Errorf("dial returned %T, not *net.TCPConn", nc)
	}
	if cfg == nil {
		return tc, addr, chosen, nil
	}
	c, err = clientHandshake(ctx, tc, cfg, start.Add(d.connectTimeout()))
	return c, addr, chosen, err
}

func (d *Dialer) maxConns(u *Upstream) int {
	if d.MaxConnections == nil {
		return 0
	}
	return d.MaxConnections(u)
}

func (d *Dialer) tryInterval() time.Duration {
	if d.TryInterval <= 0 {
		return DefaultTryInterval
	}
	return d.TryInterval
}

// sleepCtx waits for d or until ctx ends, whichever is first.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// netDialer turns the Dialer's settings into the net.Dialer used for every
// attempt of one Dial.
func (d *Dialer) netDialer() net.Dialer {
	nd := net.Dialer{Timeout: d.connectTimeout()}
	switch ka := d.KeepAlive; {
	case ka < 0:
		nd.KeepAlive = -1
	default:
		if ka == 0 {
			ka = DefaultKeepAlive
		}
		nd.KeepAliveConfig = net.KeepAliveConfig{Enable: true, Idle: ka, Interval: ka, Count: 3}
	}
	return nd
}

func (d *Dialer) connectTimeout() time.Duration {
	if d.ConnectTimeout <= 0 {
		return DefaultConnectTimeout
	}
	return d.ConnectTimeout
}

// report passes a failed attempt to OnFailure.
func (d *Dialer) report(e *DialError) {
	if d.OnFailure != nil {
		d.OnFailure(e)
	}
}

func addrOf(u *Upstream) string {
	if u == nil {
		return ""
	}
	return u.Addr
}

// notInAddress says whether r can be no part of a host:port or a server
// name: controls, spaces, and anything beyond ASCII (IDNs are punycode).
func notInAddress(r rune) bool { return r <= ' ' || r > '~' }

// errUnresolvedUpstream is an upstream template that does not make an
// address or a TLS server name for a connection (a placeholder with no
// value, say).
var errUnresolvedUpstream = errors.New("template upstream")

// ValidateUpstreamAddr checks an Upstream.Addr for dialing: "host:port",
// optionally after a "tcp/", "tcp4/" or "tcp6/" network; a host and a
// numeric port 1..65535 are required. It runs at provisioning so a bad
// address fails the config load instead of every connection; messages say
// what is wrong.
func ValidateUpstreamAddr(addr string) error {
	if network, hostPort, ok := strings.Cut(addr, "/"); ok {
		switch network {
		case "tcp", "tcp4", "tcp6":
		default:
			return fmt.Errorf("upstream address %q is on network %q; chain proxies TCP: use host:port, tcp4/host:port or tcp6/host:port", addr, network)
		}
		if err := validateHostPort(hostPort); err != nil {
			return fmt.Errorf("%w (in %q)", err, addr)
		}
		// An IP literal of the other family could never be dialed.
		host, _, _ := net.SplitHostPort(hostPort)
		if ip, err := netip.ParseAddr(host); err == nil {
			if v4 := ip.Unmap().Is4(); (network == "tcp4" && !v4) || (network == "tcp6" && v4) {
				return fmt.Errorf("upstream address %q: %s is not an address of %s", addr, host, network)
			}
		}
		return nil
	}
	return validateHostPort(addr)
}

// validateHostPort checks the "host:port" part of an upstream address.
func validateHostPort(addr string) error {
	if addr == "" {
		return errors.New("upstream address is empty; want host:port")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		// An IPv6 address without brackets: with a port after it, or
		// without one (::1:9 is both).
		var forms []string
		if i := strings.LastIndexByte(addr, ':'); i > 0 {
			if ip, perr := netip.ParseAddr(addr[:i]); perr == nil && ip.Is6() {
				forms = append(forms, "["+addr[:i]+"]:"+addr[i+1:])
			}
		}
		if ip, perr := netip.ParseAddr(addr); perr == nil && ip.Is6() {
			forms = append(forms, "["+addr+"]:PORT")
		}
		if len(forms) > 0 {
			return fmt.Errorf("upstream address %q is not host:port: an IPv6 host goes in brackets, with the port after them: %s", addr, strings.Join(forms, " or "))
		}
		return fmt.Errorf("upstream address %q is not host:port: %w", addr, err)
	}
	if host == "" {
		return fmt.Errorf("upstream address %q has no host", addr)
	}
	if strings.ContainsAny(host, " \t\r\n/") {
		return fmt.Errorf("upstream address %q has an invalid host %q", addr, host)
	}
	if port == "" {
		return fmt.Errorf("upstream address %q has no port", addr)
	}
	for _, c := range port {
		if c < '0' || c > '9' {
			return fmt.Errorf("upstream address %q has a non-numeric port %q (service names are not resolved)", addr, port)
		}
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("upstream address %q has port %s outside 1..65535", addr, port)
	}
	return nil
}
