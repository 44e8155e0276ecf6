package layer4chain

import (
	"sync"
	"time"
)

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

// Health returns the upstream's health now. An open circuit whose cool-down
// is over shows as half_open: the next connection is its trial.
func (u *Upstream) Health() Health {
	h := &u.health
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stateAt(time.Now().UnixNano())
}

// stateAt is Health with h.mu held.
func (h *health) stateAt(now int64) Health {
	switch {
	case h.activeDown > 0:
		return HealthUnhealthy
	case h.circuit == HealthOpen && now >= h.openedAt+int64(h.coolDown):
		return HealthHalfOpen
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
		Health:              h.stateAt(time.Now().UnixNano()),
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
// the half-open trial whose outcome decides the circuit.
type attempt struct {
	ok    bool
	trial bool
}

// begin decides whether one connection may dial u now, under the
// handler's passive settings and its limit on u's connections, and
// reserves the half-open trial when it is due.
func (u *Upstream) begin(p *PassiveHealth, maxConns int) attempt {
	active := u.Active()
	if maxConns > 0 && active >= int64(maxConns) {
		return attempt{}
	}
	if p != nil && p.UnhealthyConnectionCount > 0 && active >= int64(p.UnhealthyConnectionCount) {
		return attempt{}
	}
	h := &u.health
	h.mu.Lock()
	if h.activeDown > 0 {
		h.mu.Unlock()
		return attempt{}
	}
	switch h.circuit {
	case "", HealthHealthy:
		h.mu.Unlock()
		return attempt{ok: true}
	case HealthOpen:
		if time.Now().UnixNano() < h.openedAt+int64(h.coolDown) {
			h.mu.Unlock()
			return attempt{}
		}
		h.circuit, h.trial = HealthHalfOpen, true
		h.mu.Unlock()
		u.notify(HealthOpen, HealthHalfOpen, "cool-down over: one trial connection")
		return attempt{ok: true, trial: true}
	case HealthHalfOpen:
		if h.trial {
			h.mu.Unlock()
			return attempt{}
		}
		h.trial = true
		h.mu.Unlock()
		return attempt{ok: true, trial: true}
	}
	h.mu.Unlock()
	return attempt{}
}

// succeeded records a connected dial: a trial closes the circuit.
func (u *Upstream) succeeded(a attempt) {
	h := &u.health
	h.mu.Lock()
	h.consecutive = 0
	if !a.trial || h.circuit != HealthHalfOpen {
		h.mu.Unlock()
		return
	}
	h.circuit, h.trial, h.failures = HealthHealthy, false, h.failures[:0]
	h.mu.Unlock()
	u.notify(HealthHalfOpen, HealthHealthy, "trial connection succeeded")
}

// abandoned gives back a trial whose dial was cancelled (the client left):
// that says nothing about the upstream, so the next connection is the trial.
func (u *Upstream) abandoned(a attempt) {
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
	return true
}

// voteActive records that one handler's active checks now hold u down
// (down) or no longer do. u is unhealthy while any handler holds it down, so
// checks of a config being replaced and of its successor do not undo each
// other.
func (u *Upstream) voteActive(down bool, cause string) {
	h := &u.health
	h.mu.Lock()
	now := time.Now().UnixNano()
	before := h.stateAt(now)
	if down {
		h.activeDown++
		h.lastErr, h.lastErrAt = cause, now
	} else if h.activeDown > 0 {
		h.activeDown--
	}
	after := h.stateAt(now)
	h.mu.Unlock()
	u.notify(before, after, cause)
}

// notify reports a transition; it runs without the lock held.
func (u *Upstream) notify(from, to Health, cause string) {
	if from != to && u.OnTransition != nil {
		u.OnTransition(UpstreamTransition{Upstream: u.Addr, From: from, To: to, Cause: cause})
	}
}
