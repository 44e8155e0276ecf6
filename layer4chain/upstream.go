package layer4chain

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Upstream is one backend address the hop can dial, with its health: shared
// by every connection of every handler that dials the address, so its
// connection count and its circuit are one for all of them.
type Upstream struct {
	// Addr is the "host:port" dialed over TCP, or "tcp4/host:port" or
	// "tcp6/host:port" to dial over that IP family only (a host name then
	// resolves to addresses of that family alone). It is also the
	// upstream's name in logs, stats and metrics.
	Addr string

	// OnTransition, if set, is told every change of the upstream's health
	// (for logs and metrics). Set it before the upstream is used; it is
	// called without locks held, on the goroutine that caused the change.
	OnTransition func(UpstreamTransition)

	// active counts connections to this upstream, being dialed or
	// established; limits and least_conn read it, stats report it.
	active atomic.Int64

	health health

	// template: Addr has placeholders, filled per connection (see
	// Dialer.connect); such an upstream has no address to probe.
	template bool

	watchMu  sync.Mutex
	watchers []*watcher
}

// NewUpstream returns an Upstream for addr with no active connections. The
// address ("host:port", "tcp4/host:port" or "tcp6/host:port") is not checked
// here; configuration validates it with ValidateUpstreamAddr so that errors
// surface at provisioning, not per dial.
func NewUpstream(addr string) *Upstream {
	return &Upstream{Addr: addr, template: HasPlaceholder(addr)}
}

// HasPlaceholder says whether s (an upstream address, a TLS server name)
// has a placeholder ("{...}") left, which makes it a template.
func HasPlaceholder(s string) bool {
	i := strings.IndexByte(s, '{')
	return i >= 0 && strings.IndexByte(s[i:], '}') > 0
}

// Template says whether Addr has placeholders that each connection fills.
func (u *Upstream) Template() bool { return u.template }

// network is the network Addr is dialed on: its "tcp4/" or "tcp6/" prefix,
// else "tcp".
func (u *Upstream) network() string {
	if n, _, ok := strings.Cut(u.Addr, "/"); ok {
		return n
	}
	return "tcp"
}

// hostPort is the "host:port" part of Addr.
func (u *Upstream) hostPort() string {
	if _, hp, ok := strings.Cut(u.Addr, "/"); ok {
		return hp
	}
	return u.Addr
}

// Active reports the connections to u: being dialed or established. It is a
// snapshot: other connections may start or end while the caller looks at it.
func (u *Upstream) Active() int64 {
	return u.active.Load()
}

// Acquire counts a connection to u that did not come from Dial (which
// counts its own), so that least_conn, limits and stats see it. Every
// Acquire must be paired with exactly one Release.
func (u *Upstream) Acquire() {
	u.active.Add(1)
}

// Release ends a connection counted by Dial or Acquire.
func (u *Upstream) Release() {
	u.active.Add(-1)
}

// Health is an upstream's state as selection sees it. The values are
// stable: they appear in the admin API, logs and metric labels.
type Health string

// The health states. An upstream is dialed only while healthy, or for the
// single trial connection of half_open.
const (
	// HealthHealthy: the circuit is closed and active checks (if any) pass.
	HealthHealthy Health = "healthy"
	// HealthOpen: max_fails dial failures within fail_duration opened the
	// circuit; no connection is sent there until the cool-down is over.
	HealthOpen Health = "open"
	// HealthHalfOpen: the cool-down is over and exactly one trial
	// connection is let through; its dial closes or reopens the circuit.
	HealthHalfOpen Health = "half_open"
	// HealthUnhealthy: active checks marked the upstream down.
	HealthUnhealthy Health = "unhealthy"
)

// Healths lists the health states in a stable order, so that counts by
// state can report zeros for states not reached yet.
var Healths = []Health{HealthHealthy, HealthOpen, HealthHalfOpen, HealthUnhealthy}

// PassiveHealth is a handler's circuit breaker over dial failures. A zero
// FailDuration switches it off: failures are still recorded, but never
// open a circuit.
type PassiveHealth struct {
	// FailDuration is the window in which MaxFails dial failures open an
	// upstream's circuit, and the cool-down after which one trial
	// connection is let through.
	FailDuration time.Duration
	// MaxFails is how many failures within FailDuration open the circuit;
	// 0 means 1.
	MaxFails int
	// UnhealthyConnectionCount skips an upstream with at least this many
	// active connections; 0 means no such limit.
	UnhealthyConnectionCount int
}

func (p *PassiveHealth) on() bool { return p != nil && p.FailDuration > 0 }

func (p *PassiveHealth) maxFails() int {
	if p.MaxFails <= 0 {
		return 1
	}
	return p.MaxFails
}

// maxFailWindow bounds the failure times an upstream keeps: no handler's
// max_fails is expected beyond it, and a longer history only costs memory.
const maxFailWindow = 64

// UpstreamTransition is one change of an upstream's health.
type UpstreamTransition struct {
	// Upstream is the upstream's address.
	Upstream string
	// From and To are the health before and after.
	From, To Health
	// Cause says why, in words: the failure that opened the circuit, the
	// trial's outcome, the active check's result.
	Cause string
}

// health is the part of Upstream that selection consults: the circuit, the
// active checks' verdict and the last error. It is shared by every handler
// that dials the same address, across config reloads.
type health struct {
	mu          sync.Mutex
	circuit     Health  // healthy (closed), open or half_open
	failures    []int64 // recent failure times, unix ns, oldest first
	openedAt    int64   // unix ns when the circuit last opened
	coolDown    time.Duration
	trial       bool // the half-open trial is in flight
	consecutive int  // failed dials since the last successful one
	lastErr     string
	lastErrAt   int64
	activeDown  int // how many handlers' active checks hold it unhealthy
	breakers    int // how many started handlers' circuit breakers watch it (UseBreaker)
}

// UpstreamInfo is a snapshot of an upstream, for the admin API.
type UpstreamInfo struct {
	// Address is the dial address.
	Address string `json:"address"`
	// Health is healthy, open, half_open or unhealthy.
	Health Health `json:"health"`
	// ConsecutiveFailures counts failed dials since the last successful one.
	ConsecutiveFailures int `json:"consecutive_failures"`
	// ActiveConnections counts the connections established through it now.
	ActiveConnections int64 `json:"active_connections"`
	// LastError is the last failed dial's or active check's error.
	LastError string `json:"last_error,omitempty"`
	// LastErrorAt is when LastError happened.
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
}

// Health returns the upstream's health now.
func (u *Upstream) Health() Health {
	h := &u.health
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.state()
}

// state is Health with h.mu held.
func (h *health) state() Health {
	switch {
	case h.activeDown > 0:
		return HealthUnhealthy
	case h.circuit == "":
		return HealthHealthy
	}
	return h.circuit
}

// Info returns a snapshot of the upstream.
func (u *Upstream) Info() UpstreamInfo {
	h := &u.health
	h.mu.Lock()
	info := UpstreamInfo{
		Address:             u.Addr,
		Health:              h.state(),
		ConsecutiveFailures: h.consecutive,
		LastError:           h.lastErr,
	}
	if h.lastErrAt != 0 {
		t := time.Unix(0, h.lastErrAt)
		info.LastErrorAt = &t
	}
	h.mu.Unlock()
	info.ActiveConnections = u.Active()
	return info
}

// attempt is the verdict of begin: whether to dial, and whether the dial is
// the half-open trial whose outcome decides the circuit. An attempt that is
// ok holds a place in u's active connections, which succeeded keeps for the
// connection and failed or abandoned give back.
type attempt struct {
	ok      bool
	trial   bool
	breaker bool // the handler dialing has a circuit breaker (fail_duration)
}

// selectable says, without reserving anything, whether begin would let a
// connection through to u now: selection uses it to spread connections
// over the upstreams that can take them.
func (u *Upstream) selectable(p *PassiveHealth, maxConns int) bool {
	if limit := connLimit(p, maxConns); limit > 0 && u.Active() >= limit {
		return false
	}
	h := &u.health
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.activeDown > 0 {
		return false
	}
	if !p.on() {
		return true // this handler has no breaker: the circuit is not its business
	}
	switch h.circuit {
	case HealthOpen:
		return time.Now().UnixNano() >= h.openedAt+int64(min(h.coolDown, p.FailDuration))
	case HealthHalfOpen:
		return !h.trial
	}
	return true
}

// whyUnavailable says, in a few words, why selectable would skip u now.
func (u *Upstream) whyUnavailable(p *PassiveHealth, maxConns int) string {
	if limit := connLimit(p, maxConns); limit > 0 && u.Active() >= limit {
		return fmt.Sprintf("(full: %d connections)", u.Active())
	}
	h := &u.health
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.activeDown > 0:
		return "(unhealthy: active checks)"
	case p.on() && h.circuit == HealthOpen:
		return "(circuit open)"
	case p.on() && h.circuit == HealthHalfOpen:
		return "(half-open: its trial connection is under way)"
	}
	return "(available again)"
}

// connLimit is the number of active connections at which u is skipped:
// the smaller of the handler's limit on u and unhealthy_connection_count,
// 0 for none.
func connLimit(p *PassiveHealth, maxConns int) int64 {
	limit := int64(maxConns)
	if p != nil && p.UnhealthyConnectionCount > 0 && (limit == 0 || int64(p.UnhealthyConnectionCount) < limit) {
		limit = int64(p.UnhealthyConnectionCount)
	}
	return limit
}

// begin decides whether one connection may dial u now, under the
// handler's passive settings and its limit on u's connections. When it may,
// begin takes the connection's place among u's active connections (so that
// concurrent dials cannot overrun a limit) and, when the cool-down is over,
// the half-open trial.
func (u *Upstream) begin(p *PassiveHealth, maxConns int) attempt {
	h := &u.health
	h.mu.Lock()
	if h.activeDown > 0 {
		h.mu.Unlock()
		return attempt{}
	}
	a := attempt{breaker: p.on()}
	var from Health
	switch {
	case !p.on(), h.circuit == "", h.circuit == HealthHealthy:
		a.ok = true
	case h.circuit == HealthOpen:
		if time.Now().UnixNano() >= h.openedAt+int64(min(h.coolDown, p.FailDuration)) {
			h.circuit, h.trial, from = HealthHalfOpen, true, HealthOpen
			a.ok, a.trial = true, true
		}
	case h.circuit == HealthHalfOpen && !h.trial:
		h.trial = true
		a.ok, a.trial = true, true
	}
	if a.ok && !u.reserve(connLimit(p, maxConns)) {
		h.trial = h.trial && !a.trial
		if from == HealthOpen {
			h.circuit = HealthOpen
		}
		h.mu.Unlock()
		return attempt{}
	}
	h.mu.Unlock()
	if from == HealthOpen {
		u.notify(HealthOpen, HealthHalfOpen, "cool-down over: one trial connection")
	}
	return a
}

// reserve counts one more active connection unless that would pass limit
// (0: none).
func (u *Upstream) reserve(limit int64) bool {
	for {
		n := u.active.Load()
		if limit > 0 && n >= limit {
			return false
		}
		if u.active.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// succeeded records a connected dial. The trial closes the circuit, and so
// does a connection of a handler without a breaker (which the circuit does
// not hold back: after a reload that dropped fail_duration, say), which
// would otherwise leave it open, or half-open with no trial to come, while
// the upstream serves. A breaker's other dials, begun before the circuit
// opened, leave it to the cool-down and the trial.
func (u *Upstream) succeeded(a attempt) {
	h := &u.health
	h.mu.Lock()
	h.consecutive = 0
	from := h.circuit
	if (from != HealthOpen && from != HealthHalfOpen) || (a.breaker && !a.trial) {
		h.mu.Unlock()
		return
	}
	h.circuit, h.trial, h.failures = HealthHealthy, false, h.failures[:0]
	h.mu.Unlock()
	cause := "trial connection succeeded"
	if !a.trial {
		cause = "a connection of a handler without fail_duration succeeded"
	}
	u.notify(from, HealthHealthy, cause)
}

// abandoned gives back a trial whose dial was cancelled (the client left):
// that says nothing about the upstream, so the next connection is the trial.
func (u *Upstream) abandoned(a attempt) {
	u.Release()
	if !a.trial {
		return
	}
	h := &u.health
	h.mu.Lock()
	h.trial = false
	h.mu.Unlock()
}

// failed records a failed dial and opens the circuit when the handler's
// passive settings say so. It reports whether this failure opened it.
func (u *Upstream) failed(a attempt, p *PassiveHealth, err error) (opened bool) {
	u.Release()
	now := time.Now()
	ns := now.UnixNano()
	h := &u.health
	h.mu.Lock()
	h.consecutive++
	h.lastErr, h.lastErrAt = err.Error(), ns
	if !p.on() {
		if a.trial { // another handler's trial, this one has no breaker
			h.trial = false
		}
		h.mu.Unlock()
		return false
	}
	window := int64(p.FailDuration)
	keep := h.failures[:0]
	for _, t := range h.failures {
		if ns-t < window {
			keep = append(keep, t)
		}
	}
	h.failures = append(keep, ns)
	if len(h.failures) > maxFailWindow {
		h.failures = h.failures[len(h.failures)-maxFailWindow:]
	}
	from := h.circuit
	if from == "" {
		from = HealthHealthy
	}
	switch {
	case a.trial && h.circuit == HealthHalfOpen:
	case h.circuit != HealthOpen && h.circuit != HealthHalfOpen && len(h.failures) >= p.maxFails():
	default:
		h.mu.Unlock()
		return false
	}
	h.circuit, h.trial, h.openedAt, h.coolDown = HealthOpen, false, ns, p.FailDuration
	h.mu.Unlock()
	cause := err.Error()
	if from == HealthHalfOpen {
		cause = "trial connection failed: " + cause
	}
	u.notify(from, HealthOpen, cause)
	// Report the end of the cool-down when it comes, not only when the
	// next connection notices it, so the admin API, the metrics and the
	// log agree while no traffic arrives.
	time.AfterFunc(p.FailDuration, func() { u.coolDownOver(ns) })
	return true
}

// UseBreaker counts one more handler of a started config whose circuit
// breaker watches u, until the returned function is called. When the last one
// stops (a reload dropped fail_duration), a circuit left open or half-open
// closes: no handler would run its trial, and handlers without a breaker
// are not held back by it, so it would only report u down while it serves.
func (u *Upstream) UseBreaker() (stop func()) {
	h := &u.health
	h.mu.Lock()
	h.breakers++
	h.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			h.breakers--
			if h.breakers > 0 || (h.circuit != HealthOpen && h.circuit != HealthHalfOpen) {
				h.mu.Unlock()
				return
			}
			before := h.state()
			h.circuit, h.trial, h.failures = HealthHealthy, false, h.failures[:0]
			after := h.state()
			h.mu.Unlock()
			u.notify(before, after, "no started config with fail_duration dials it")
		})
	}
}

// coolDownOver moves a circuit still open since openedAt to half_open.
func (u *Upstream) coolDownOver(openedAt int64) {
	h := &u.health
	h.mu.Lock()
	if h.circuit != HealthOpen || h.openedAt != openedAt {
		h.mu.Unlock()
		return
	}
	h.circuit = HealthHalfOpen
	h.mu.Unlock()
	u.notify(HealthOpen, HealthHalfOpen, "cool-down over: the next connection is the trial")
}

// voteActive records that one handler's active checks now hold u down
// (down) or no longer do. u is unhealthy while any handler holds it down, so
// checks of a config being replaced and of its successor do not undo each
// other.
func (u *Upstream) voteActive(down bool, cause string) {
	h := &u.health
	h.mu.Lock()
	now := time.Now().UnixNano()
	before := h.state()
	if down {
		h.activeDown++
		h.lastErr, h.lastErrAt = cause, now
	} else if h.activeDown > 0 {
		h.activeDown--
	}
	after := h.state()
	h.mu.Unlock()
	u.notify(before, after, cause)
}

// heldDown reports whether active checks hold u down.
func (u *Upstream) heldDown() bool {
	h := &u.health
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.activeDown > 0
}

// notify reports a transition and runs the watchers of its new state; it
// runs without the lock held.
func (u *Upstream) notify(from, to Health, cause string) {
	if from == to {
		return
	}
	if u.OnTransition != nil {
		u.OnTransition(UpstreamTransition{Upstream: u.Addr, From: from, To: to, Cause: cause})
	}
	u.watchMu.Lock()
	var run []func()
	for _, w := range u.watchers {
		if w.on == to {
			run = append(run, w.f)
		}
	}
	u.watchMu.Unlock()
	for _, f := range run {
		f()
	}
}

// watcher is a function run when an upstream turns to a health state.
type watcher struct {
	on Health
	f  func()
}

// OnHealth runs f every time u turns to the health state on (open or
// unhealthy: a handler's close_if_unhealthy), on the goroutine that caused
// the change. Calling the returned cancel stops it.
func (u *Upstream) OnHealth(on Health, f func()) (cancel func()) {
	w := &watcher{on: on, f: f}
	u.watchMu.Lock()
	u.watchers = append(u.watchers, w)
	u.watchMu.Unlock()
	return func() {
		u.watchMu.Lock()
		defer u.watchMu.Unlock()
		u.watchers = slices.DeleteFunc(u.watchers, func(x *watcher) bool { return x == w })
	}
}
