package modules

import (
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// The convention every option of the handler and the app follows, kept in
// this one file so that it cannot drift between options:
//
//   - absent or 0 means the documented default;
//   - a negative value switches a limit off (JSON -1, or "-1s" for a
//     duration; the Caddyfile word `off` adapts to -1), where the option
//     can be off at all;
//   - an option that cannot be off rejects a negative value with the
//     reason it must stay on;
//   - a duration below minDuration is rejected as the mistake it almost
//     always is: a bare JSON number is read as nanoseconds by
//     caddy.Duration, so `"connect_timeout": 5` means 5ns, not 5s.
//
// Options are checked with checkDuration or checkLimit and then turned into
// the engine's value with resolveDuration or resolveLimit. The engine's own
// convention differs: in layer4chain, a zero Timeouts field is disabled and a
// zero Limits field is no limit, so "off" resolves to 0 there.

// minDuration is the smallest duration an option may have, other than 0
// (the default) and negative (off). No timeout or interval below it makes
// sense on a network, so one below it is a unit mistake.
const minDuration = time.Millisecond

// maxDuration is the longest duration an option may have: longer ones
// overflow a deadline computed from now (time.Time's nanoseconds end in
// 2262), and mean "never", which is what off (-1) is for.
const maxDuration = 100 * 365 * 24 * time.Hour

// maxTries bounds load_balancing.tries: each try is planned per connection,
// and beyond the upstreams each one waits try_interval first.
const maxTries = 100

// Why an option cannot be switched off. Each is the end of the error an
// operator sees when trying, and the README says the same.
const (
	// whyConnectTimeoutOn is the reason connect_timeout cannot be off.
	whyConnectTimeoutOn = "an unreachable upstream would hold each client for the kernel's minutes of SYN retries"
	// whyAcceptTimeoutOn is the reason accept_proxy_protocol.timeout cannot be off.
	whyAcceptTimeoutOn = "a peer that never finishes its header would hold the connection forever"
	// whyTriesOn is the reason load_balancing.tries cannot be off.
	whyTriesOn = "every connection needs a bounded number of dial attempts (the default: one per upstream)"
	// whyMaxHopsOn is the reason max_hops cannot be off.
	whyMaxHopsOn = "a loop between hops would multiply connections without end"
	// whySweepIntervalOn is the reason the app's sweep_interval cannot be off.
	whySweepIntervalOn = "the sweep is the safety net that enforces the limits no deadline caught and reaps zombie records"
	// whyShutdownGraceOn is the reason the app's shutdown_grace cannot be off.
	whyShutdownGraceOn = "it is the most a shutdown waits, not a limit on connections; set a short duration to close connections sooner"
)

// checkDuration validates the duration option name, whose value is d:
// 0 (the default) passes; a negative value passes if the option can be
// switched off (whyNotOff is empty) and is an error carrying whyNotOff
// otherwise; a positive value below 1ms is an error that suggests the
// likely intent, in the form `connect_timeout: 5ns; did you mean "5s"?`.
// Errors start with name, so they read as the field at fault.
func checkDuration(name string, d caddy.Duration, whyNotOff string) error {
	switch {
	case d == 0:
		return nil
	case d < 0:
		if whyNotOff != "" {
			return fmt.Errorf("%s: cannot be switched off (got %s): %s; leave it out or set 0 for the default", name, time.Duration(d), whyNotOff)
		}
		return nil
	case time.Duration(d) < minDuration && (d < 1000 || d%1000 != 0):
		// A count of nanoseconds like this is almost always a count of
		// seconds written as a bare JSON number; one written with a unit
		// ("500us") is a whole number of microseconds.
		return fmt.Errorf("%s: %s; did you mean \"%ds\"?", name, time.Duration(d), int64(d))
	case time.Duration(d) < 100*time.Microsecond:
		// A bare JSON number of thousands (1000, 5000) reads as a few
		// microseconds, and was milliseconds; nobody writes "5us" for a
		// network timeout.
		return fmt.Errorf("%s: %s is below the 1ms minimum (written as the JSON number %d? that counts nanoseconds: did you mean \"%dms\"?)", name, time.Duration(d), int64(d), int64(d))
	case time.Duration(d) < minDuration:
		return fmt.Errorf("%s: %s is below the 1ms minimum; no timeout that short works on a network", name, time.Duration(d))
	case time.Duration(d) > maxDuration && whyNotOff == "":
		return fmt.Errorf("%s: %s is longer than 100 years; for no limit set -1 (Caddyfile: off)", name, time.Duration(d))
	case time.Duration(d) > maxDuration:
		return fmt.Errorf("%s: %s is longer than 100 years; set a shorter duration", name, time.Duration(d))
	}
	return nil
}

// resolveDuration turns a duration option that passed checkDuration into
// the engine's value: absent or 0 gives def; negative (off) gives 0, which
// the engine reads as disabled; anything else is used as is.
func resolveDuration(d caddy.Duration, def time.Duration) time.Duration {
	switch {
	case d == 0:
		return def
	case d < 0:
		return 0
	}
	return time.Duration(d)
}

// checkLimit validates the count option name, whose value is n: 0 (the
// default) passes; a negative value passes if the option can be switched
// off (whyNotOff is empty) and is an error carrying whyNotOff otherwise; a
// value above max is an error (max 0 means no cap).
func checkLimit(name string, n int, whyNotOff string, max int) error {
	switch {
	case n < 0 && whyNotOff != "":
		return fmt.Errorf("%s: cannot be switched off (got %d): %s; leave it out or set 0 for the default", name, n, whyNotOff)
	case max > 0 && n > max:
		return fmt.Errorf("%s: at most %d, got %d", name, max, n)
	}
	return nil
}

// resolveLimit turns a count option that passed checkLimit into the
// engine's value: absent or 0 gives def; negative (off) gives 0, which the
// engine reads as no limit; anything else is used as is.
func resolveLimit(n, def int) int {
	switch {
	case n == 0:
		return def
	case n < 0:
		return 0
	}
	return n
}
