package layer4chain

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// Defaults of active health checks, as caddy-l4's proxy has them.
const (
	// DefaultHealthInterval is the time between two probes of an upstream.
	DefaultHealthInterval = 30 * time.Second
	// DefaultHealthTimeout bounds one probe.
	DefaultHealthTimeout = 5 * time.Second
)

// ActiveHealth is a handler's active health checks: a TCP connect to every
// upstream every Interval.
type ActiveHealth struct {
	// Port is probed instead of the upstream's own port; 0 means its own.
	Port int
	// Interval is the time between two probes of an upstream; 0 means 30s.
	Interval time.Duration
	// Timeout bounds one probe; 0 means 5s.
	Timeout time.Duration
	// Fall is how many failed probes in a row mark an upstream unhealthy;
	// 0 means 1.
	Fall int
	// Rise is how many passed probes in a row mark it healthy again; 0
	// means 1.
	Rise int
	// SendProxyHeader makes each probe send a PROXY v2 LOCAL header, for a
	// next hop that requires a header: it accepts the probe as a check
	// instead of rejecting it as missing.
	SendProxyHeader bool
	// TLS, if set, returns the TLS config an upstream is dialed with (nil
	// for plain TCP), as Dialer.TLS does: a probe of such an upstream
	// completes a handshake, and sends its LOCAL header inside the
	// session, where the next hop reads headers.
	TLS func(*Upstream) *tls.Config
}

// localHeader is the PROXY v2 LOCAL header a probe sends.
var localHeader = func() []byte {
	b, err := ProxyHeader{Version: 2}.AppendTo(nil)
	if err != nil {
		panic(err) // a constant input: cannot fail
	}
	return b
}()

// StartHealthChecks probes every upstream at once and then every Interval,
// and marks an upstream unhealthy after Fall failed probes in a row and
// healthy after Rise passed ones. An upstream that active checks already
// hold down (those of the config a reload replaces) starts down, so a
// reload does not send connections to it until Rise probes pass. Calling
// the returned stop ends the checks and waits for probes in flight.
func StartHealthChecks(upstreams []*Upstream, cfg ActiveHealth) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	c := &checker{cfg: cfg, upstreams: upstreams,
		streaks: make([]int, len(upstreams)), down: make([]bool, len(upstreams))}
	for i, u := range upstreams {
		if u.heldDown() {
			c.down[i] = true
			u.voteActive(true, "held down by the active checks before a reload")
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.run(ctx)
	}()
	return func() {
		cancel()
		<-done
		c.withdraw()
	}
}

// checker is one handler's active health checks.
type checker struct {
	cfg       ActiveHealth
	upstreams []*Upstream
	// streaks[i] counts upstream i's probes in a row with one outcome:
	// positive for passes, negative for failures.
	streaks []int
	// down[i] is this checker's verdict on upstream i. Both belong to
	// upstream i's watch goroutine.
	down []bool
}

// withdraw takes back this checker's down verdicts when it stops: with no
// checks running, nothing holds an upstream down any more.
func (c *checker) withdraw() {
	for i, u := range c.upstreams {
		if c.down[i] {
			c.down[i] = false
			u.voteActive(false, "active health checks stopped")
		}
	}
}

// run probes each upstream on a schedule of its own until ctx ends.
func (c *checker) run(ctx context.Context) {
	var wg sync.WaitGroup
	for i, u := range c.upstreams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.watch(ctx, i, u)
		}()
	}
	wg.Wait()
}

// watch probes upstream i every interval and records each outcome at
// once: a black-holed upstream, whose probes last the whole timeout,
// delays no verdict on the others.
func (c *checker) watch(ctx context.Context, i int, u *Upstream) {
	interval := c.cfg.Interval
	if interval <= 0 {
		interval = DefaultHealthInterval
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		err := c.probe(ctx, u)
		if ctx.Err() != nil {
			return // stopping: a cancelled probe says nothing
		}
		c.record(i, u, err)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// probe connects to u (on Port, if set), completes a TLS handshake if u is
// dialed over TLS, sends the LOCAL header if asked to, and closes.
func (c *checker) probe(ctx context.Context, u *Upstream) error {
	timeout := c.cfg.Timeout
	if timeout <= 0 {
		timeout = DefaultHealthTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	addr := u.hostPort()
	if c.cfg.Port > 0 {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return err
		}
		addr = net.JoinHostPort(host, strconv.Itoa(c.cfg.Port))
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, u.network(), addr)
	if err != nil {
		return err
	}
	conn := nc
	deadline, _ := ctx.Deadline()
	if c.cfg.TLS != nil {
		if cfg := c.cfg.TLS(u); cfg != nil {
			// clientHandshake closes the socket when it fails.
			if conn, err = clientHandshake(ctx, nc.(*net.TCPConn), cfg, deadline); err != nil {
				return err
			}
		}
	}
	defer conn.Close()
	if c.cfg.SendProxyHeader {
		_ = conn.SetWriteDeadline(deadline)
		if _, err := conn.Write(localHeader); err != nil {
			return fmt.Errorf("sending the PROXY LOCAL header: %w", err)
		}
	}
	return nil
}

// record counts one probe's outcome and changes this checker's verdict on
// u once Fall or Rise outcomes in a row agree.
func (c *checker) record(i int, u *Upstream, err error) {
	fall, rise := max(c.cfg.Fall, 1), max(c.cfg.Rise, 1)
	if err != nil {
		c.streaks[i] = min(c.streaks[i], 0) - 1
		if -c.streaks[i] >= fall && !c.down[i] {
			c.down[i] = true
			u.voteActive(true, "active health check failed: "+err.Error())
		}
		return
	}
	c.streaks[i] = max(c.streaks[i], 0) + 1
	if c.streaks[i] >= rise && c.down[i] {
		c.down[i] = false
		u.voteActive(false, fmt.Sprintf("active health check passed %d times in a row", c.streaks[i]))
	}
}
