package modules

import (
	"fmt"
	"github.com/layer4chain/caddy-layer4chain/layer4chain"

	"github.com/caddyserver/caddy/v2"
)

// Defaults of the health checks and of retrying, documented on the fields
// they fill.
const (
	defaultMaxFails       = 1
	defaultHealthInterval = layer4chain.DefaultHealthInterval
	defaultHealthTimeout  = layer4chain.DefaultHealthTimeout
	defaultHealthFall     = 1
	defaultHealthRise     = 1
	defaultTryInterval    = layer4chain.DefaultTryInterval
)

// Why a health or retry option cannot be switched off. Each is the end of
// the error an operator sees when trying, and the README says the same.
const (
	// whyMaxFailsOn is the reason max_fails cannot be off.
	whyMaxFailsOn = "fail_duration switches passive health checks off"
	// whyActiveOn is the reason an active check option cannot be off.
	whyActiveOn = "active health checks are switched off by leaving health_checks.active out"
	// whyHealthTimeoutOn is the reason health_checks.active.timeout cannot be off.
	whyHealthTimeoutOn = "a probe of a black-holed upstream would never end"
	// whyTryIntervalOn is the reason load_balancing.try_interval cannot be off.
	whyTryIntervalOn = "without a wait, retrying while every upstream is down would spin on the CPU; try_duration switches retrying off"
)

// HealthChecks configures how the handler learns which upstreams to skip.
// An upstream's health is shared by every handler that dials the same
// address, and kept across config reloads while some handler still lists
// it.
type HealthChecks struct {
	// Passive health checks watch the handler's own dials: a circuit
	// breaker per upstream, and a cap on its active connections. Off
	// unless fail_duration (the breaker) or unhealthy_connection_count
	// (the cap) is set.
	Passive *PassiveHealthChecks `json:"passive,omitempty"`

	// Active health checks connect to every upstream on a timer, in the
	// background. Present: on (an empty object gives every default);
	// absent: off.
	Active *ActiveHealthChecks `json:"active,omitempty"`
}

// PassiveHealthChecks is the circuit breaker over dial failures, with the
// names of caddy-l4's proxy. Unlike caddy-l4, an upstream comes back
// through one trial connection (half-open), not by forgetting failures.
type PassiveHealthChecks struct {
	// FailDuration is the window in which max_fails dial failures (refused,
	// timed out, unreachable; not a client that left during the dial) open
	// an upstream's circuit: every selection policy then skips it. It is
	// also the cool-down: once it has passed, exactly one trial connection
	// is let through (half_open); the trial's success closes the circuit,
	// its failure opens it for another cool-down. Absent or 0: the circuit
	// breaker is off, as in caddy-l4; negative (-1) too. At least 1ms.
	FailDuration caddy.Duration `json:"fail_duration,omitempty"`

	// MaxFails is how many dial failures within fail_duration open the
	// circuit. Absent or 0: 1. It cannot be off: leave fail_duration out
	// to switch the circuit breaker off. Requires fail_duration.
	MaxFails int `json:"max_fails,omitempty"`

	// UnhealthyConnectionCount skips an upstream that already has at least
	// this many active connections (counted across every handler that
	// dials it), as if it were unhealthy, until some of them end. It works
	// without fail_duration. Absent or 0: no limit; negative (-1) too.
	UnhealthyConnectionCount int `json:"unhealthy_connection_count,omitempty"`

	// CloseIfUnhealthy closes the connections already proxied to an
	// upstream when its circuit opens (close reason upstream_unhealthy),
	// so clients reconnect to a healthy one instead of waiting on a
	// failing one. caddy-l4 has it for active checks only; chain has a
	// transition to hook onto for passive ones too. Default: false.
	// Requires fail_duration.
	CloseIfUnhealthy bool `json:"close_if_unhealthy,omitempty"`
}

// ActiveHealthChecks probes every upstream with a TCP connect. When the
// handler sends PROXY headers (proxy_protocol), a probe first sends a v2
// LOCAL header, so a next hop that requires one accepts the probe without
// logging a rejection.
type ActiveHealthChecks struct {
	// Port is the port to probe, if not the upstream's own, 1 to 65535.
	// Absent or 0: the upstream's port.
	Port int `json:"port,omitempty"`

	// Interval is the time between two probes of an upstream. Absent or
	// 0: 30s. It cannot be off: leave health_checks.active out. At least
	// 1ms.
	Interval caddy.Duration `json:"interval,omitempty"`

	// Timeout bounds each probe's connect. Absent or 0: 5s. It cannot be
	// off: a probe of a black-holed upstream would never end. At least 1ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Fall is how many failed probes in a row mark a healthy upstream
	// unhealthy. Absent or 0: 1. At least 1 when set.
	Fall int `json:"fall,omitempty"`

	// Rise is how many successful probes in a row mark an unhealthy
	// upstream healthy again. Absent or 0: 1. At least 1 when set.
	Rise int `json:"rise,omitempty"`

	// CloseIfUnhealthy closes the connections already proxied to an
	// upstream when the probes mark it unhealthy (close reason
	// upstream_unhealthy). Default: false.
	CloseIfUnhealthy bool `json:"close_if_unhealthy,omitempty"`
}

// checkHealthChecks rejects bad health check values with an error naming
// the field.
func checkHealthChecks(hc *HealthChecks) error {
	if hc == nil {
		return nil
	}
	if p := hc.Passive; p != nil {
		const pre = "health_checks.passive."
		if err := checkDuration(pre+"fail_duration", p.FailDuration, ""); err != nil {
			return err
		}
		if err := checkLimit(pre+"max_fails", p.MaxFails, whyMaxFailsOn, 0); err != nil {
			return err
		}
		if err := checkLimit(pre+"unhealthy_connection_count", p.UnhealthyConnectionCount, "", 0); err != nil {
			return err
		}
		// Both only make sense with the breaker on: accepting them without
		// it would let an operator believe failures are acted upon.
		const breakerOff = "the circuit breaker is off (fail_duration is absent, 0 or negative)"
		switch {
		case p.FailDuration > 0:
		case p.MaxFails > 0:
			return fmt.Errorf("%smax_fails: %s, so no failure is counted; set fail_duration", pre, breakerOff)
		case p.CloseIfUnhealthy:
			return fmt.Errorf("%sclose_if_unhealthy: %s, so no circuit opens to close connections on; set fail_duration", pre, breakerOff)
		}
	}
	if a := hc.Active; a != nil {
		const pre = "health_checks.active."
		if a.Port < 0 || a.Port > 65535 {
			return fmt.Errorf("%sport: want a port from 1 to 65535, or 0 for the upstream's own, got %d", pre, a.Port)
		}
		if err := checkDuration(pre+"interval", a.Interval, whyActiveOn); err != nil {
			return err
		}
		if err := checkDuration(pre+"timeout", a.Timeout, whyHealthTimeoutOn); err != nil {
			return err
		}
		for _, opt := range []struct {
			name string
			n    int
		}{{"fall", a.Fall}, {"rise", a.Rise}} {
			if opt.n < 0 {
				return fmt.Errorf("%s%s: want at least 1, or 0 for the default 1, got %d", pre, opt.name, opt.n)
			}
		}
	}
	return nil
}

// checkUpstreamLimits rejects bad per-upstream values; i is the upstream's
// index, for the field's name.
func checkUpstreamLimits(i int, u *Upstream) error {
	if err := checkLimit(fmt.Sprintf("upstreams[%d].max_connections", i), u.MaxConnections, "", 0); err != nil {
		return err
	}
	if u.Weight < 0 {
		return fmt.Errorf("upstreams[%d].weight: want at least 1, or 0 for the default 1, got %d", i, u.Weight)
	}
	return nil
}

// checkRetry rejects bad load_balancing retry values.
func checkRetry(lb *LoadBalancing) error {
	if lb == nil {
		return nil
	}
	if err := checkDuration("load_balancing.try_duration", lb.TryDuration, ""); err != nil {
		return err
	}
	return checkDuration("load_balancing.try_interval", lb.TryInterval, whyTryIntervalOn)
}
