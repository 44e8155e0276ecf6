package layer4chain

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// transitions records an upstream's health changes.
type transitions struct {
	mu   sync.Mutex
	seen []UpstreamTransition
	ch   chan UpstreamTransition
}

func watch(u *Upstream) *transitions {
	tr := &transitions{ch: make(chan UpstreamTransition, 16)}
	u.OnTransition = func(t UpstreamTransition) {
		tr.mu.Lock()
		tr.seen = append(tr.seen, t)
		tr.mu.Unlock()
		tr.ch <- t
	}
	return tr
}

// next waits for the next transition and checks where it went.
func (tr *transitions) next(t *testing.T, from, to Health) {
	t.Helper()
	select {
	case got := <-tr.ch:
		if got.From != from || got.To != to {
			t.Fatalf("transition %s → %s (%s), want %s → %s", got.From, got.To, got.Cause, from, to)
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("no transition %s → %s", from, to)
	}
}

// countingDialer is a Dialer that counts attempts per upstream.
func countingDialer(passive *PassiveHealth) (*Dialer, func(string) int) {
	var mu sync.Mutex
	counts := map[string]int{}
	d := &Dialer{ConnectTimeout: time.Second, Passive: passive, TryInterval: 50 * time.Millisecond,
		OnAttempt: func(up string, _ time.Duration, _ error) {
			mu.Lock()
			counts[up]++
			mu.Unlock()
		}}
	return d, func(up string) int {
		mu.Lock()
		defer mu.Unlock()
		return counts[up]
	}
}

func TestCircuitOpensAfterMaxFailsThenOneTrialRestoresIt(t *testing.T) {
	deadAddr := chaintest.RefusedAddr(t)
	dead, good := NewUpstream(deadAddr), NewUpstream(chaintest.NewEchoBackend(t).Addr)
	events := watch(dead)
	passive := &PassiveHealth{FailDuration: 300 * time.Millisecond, MaxFails: 2}
	d, attempts := countingDialer(passive)
	dialOnce := func() *Upstream {
		t.Helper()
		c, up, err := d.Dial(context.Background(), []*Upstream{dead, good})
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		c.Close()
		return up
	}

	dialOnce()
	if dead.Health() != HealthHealthy {
		t.Fatalf("one failure of max_fails 2 changed the health to %s", dead.Health())
	}
	dialOnce()
	events.next(t, HealthHealthy, HealthOpen)
	for i := 0; i < 5; i++ {
		start := time.Now()
		dialOnce()
		if took := time.Since(start); took > 100*time.Millisecond {
			t.Fatalf("a connection while the circuit is open took %v", took)
		}
	}
	if n := attempts(deadAddr); n != 2 {
		t.Fatalf("the open upstream was dialed %d times, want only the 2 failures that opened it", n)
	}

	// The cool-down passes: one trial, which fails and reopens the circuit.
	time.Sleep(350 * time.Millisecond) // the cool-down is what is tested
	if h := dead.Health(); h != HealthHalfOpen {
		t.Fatalf("after the cool-down the health is %s, want half_open", h)
	}
	dialOnce()
	events.next(t, HealthOpen, HealthHalfOpen)
	events.next(t, HealthHalfOpen, HealthOpen)
	if n := attempts(deadAddr); n != 3 {
		t.Fatalf("dials of the dead upstream after a trial: %d, want 3", n)
	}

	// The upstream comes back: the next trial closes the circuit.
	ln, err := net.Listen("tcp", deadAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	time.Sleep(350 * time.Millisecond) // the cool-down again
	if up := dialOnce(); up != dead {
		t.Fatalf("the trial connection went to %s", up.Addr)
	}
	events.next(t, HealthOpen, HealthHalfOpen)
	events.next(t, HealthHalfOpen, HealthHealthy)
	if info := dead.Info(); info.Health != HealthHealthy || info.ConsecutiveFailures != 0 || info.LastError == "" {
		t.Fatalf("after recovery: %+v", info)
	}
}

func TestHalfOpenLetsExactlyOneTrialThrough(t *testing.T) {
	u := NewUpstream(chaintest.RefusedAddr(t))
	passive := &PassiveHealth{FailDuration: 50 * time.Millisecond}
	u.failed(u.begin(passive, 0), passive, errors.New("refused"))
	time.Sleep(60 * time.Millisecond) // the cool-down is what is tested
	var wg sync.WaitGroup
	var mu sync.Mutex
	trials := 0
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if a := u.begin(passive, 0); a.ok {
				mu.Lock()
				trials++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if trials != 1 {
		t.Fatalf("%d connections were let through the half-open circuit, want 1", trials)
	}
}

func TestAllUpstreamsOpenFailsFastWithNoHealthyUpstream(t *testing.T) {
	u := NewUpstream(chaintest.RefusedAddr(t))
	passive := &PassiveHealth{FailDuration: time.Minute}
	d, _ := countingDialer(passive)
	if _, _, err := d.Dial(context.Background(), []*Upstream{u}); ClassifyReason(err) != ReasonConnectRefused {
		t.Fatalf("first dial: %v", err)
	}
	start := time.Now()
	_, _, err := d.Dial(context.Background(), []*Upstream{u, u, u})
	if ClassifyReason(err) != ReasonNoHealthyUpstream || time.Since(start) > 50*time.Millisecond {
		t.Fatalf("dial with every upstream open: %v after %v; want no_healthy_upstream at once", err, time.Since(start))
	}
	// The detail names each upstream once, with why it was skipped.
	if want := u.Addr + " (circuit open)"; !strings.HasSuffix(err.Error(), ": "+want) {
		t.Fatalf("error %q does not end with %q", err, want)
	}
}

// ClassifyReason is the Reason of a *DialError, for tests.
func ClassifyReason(err error) CloseReason {
	var de *DialError
	if errors.As(err, &de) {
		return de.Reason
	}
	return ReasonNone
}

func TestTriesBeyondTheUpstreamsArePacedNotATightLoop(t *testing.T) {
	addr := chaintest.RefusedAddr(t)
	u := NewUpstream(addr)
	var times []time.Time
	d := &Dialer{TryInterval: 50 * time.Millisecond, OnAttempt: func(string, time.Duration, error) { times = append(times, time.Now()) }}
	if _, _, err := d.Dial(context.Background(), []*Upstream{u, u, u, u, u}); ClassifyReason(err) != ReasonConnectRefused {
		t.Fatalf("dial: %v", err)
	}
	if len(times) != 5 {
		t.Fatalf("%d attempts, want 5", len(times))
	}
	for i := 1; i < len(times); i++ {
		if gap := times[i].Sub(times[i-1]); gap < 45*time.Millisecond {
			t.Fatalf("attempt %d came %v after the one before on the same upstream, want at least the try interval", i+1, gap)
		}
	}
}

func TestTryDurationWaitsForAnUpstreamToComeBack(t *testing.T) {
	addr := chaintest.RefusedAddr(t)
	p := &Proxy{Balancer: mustBalancer(t, "", []*Upstream{NewUpstream(addr)}, 0), Dialer: &Dialer{TryInterval: 30 * time.Millisecond},
		TryDuration: 2 * time.Second}
	go func() {
		time.Sleep(200 * time.Millisecond) // the upstream starts later: that is the scenario
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return
		}
		t.Cleanup(func() { ln.Close() })
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
	}()
	r := &Record{}
	c, _, err := p.dialUpstream(context.Background(), r, client1.Addr(), nil)
	if err != nil {
		t.Fatalf("dial within try_duration: %v", err)
	}
	c.Close()
	if len(r.failedDials) == 0 {
		t.Fatal("the failed attempts before the upstream came back were not recorded")
	}

	p.TryDuration = 0
	start := time.Now()
	if _, _, err := p.dialUpstream(context.Background(), &Record{}, client1.Addr(), nil); err == nil {
		// the listener accepted only once; a refusal is expected
		t.Log("second dial connected to a lingering backlog entry")
	} else if time.Since(start) > time.Second {
		t.Fatalf("without try_duration a refused dial took %v", time.Since(start))
	}
}

func TestActiveChecksMarkABlackHoledUpstreamDownAndUpAgain(t *testing.T) {
	hole := NewUpstream(chaintest.BlackholeAddr(t))
	events := watch(hole)
	var headers = make(chan []byte, 64)
	live := NewUpstream(chaintest.NewBackend(t, func(c *net.TCPConn) {
		b, _ := io.ReadAll(c)
		headers <- b
	}).Addr)
	liveEvents := watch(live)
	cfg := ActiveHealth{Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond, Fall: 1, Rise: 2, SendProxyHeader: true}
	start := time.Now()
	stop := StartHealthChecks([]*Upstream{hole, live}, cfg)
	events.next(t, HealthHealthy, HealthUnhealthy)
	if took := time.Since(start); took > cfg.Interval+cfg.Timeout+100*time.Millisecond {
		t.Fatalf("marked down after %v, want within interval + timeout", took)
	}
	if got := <-headers; string(got) != string(localHeader) {
		t.Fatalf("probe sent %q, want exactly a PROXY v2 LOCAL header", got)
	}
	if a := hole.begin(nil, 0); a.ok {
		t.Fatal("an upstream marked down by active checks was still selected")
	}
	stop()
	events.next(t, HealthUnhealthy, HealthHealthy) // no checks, nothing holds it down
	select {
	case e := <-liveEvents.ch:
		t.Fatalf("the live upstream changed: %+v", e)
	default:
	}
}

// TestABlackHoledUpstreamDelaysNoVerdictOnAnother: each upstream is probed
// on its own schedule, so a refused upstream is marked down at once while
// a black-holed one's probe waits out its whole timeout.
func TestABlackHoledUpstreamDelaysNoVerdictOnAnother(t *testing.T) {
	hole := NewUpstream(chaintest.BlackholeAddr(t))
	refused := NewUpstream(chaintest.RefusedAddr(t))
	events := watch(refused)
	cfg := ActiveHealth{Interval: 50 * time.Millisecond, Timeout: 5 * time.Second, Fall: 2}
	start := time.Now()
	stop := StartHealthChecks([]*Upstream{hole, refused}, cfg)
	defer stop()
	events.next(t, HealthHealthy, HealthUnhealthy)
	if took := time.Since(start); took > time.Second {
		t.Fatalf("the refused upstream was marked down after %v, behind the black hole's %v probe; want about one interval", took, cfg.Timeout)
	}
}

func TestConcurrentDialsCannotOverrunAnUpstreamsLimit(t *testing.T) {
	u := NewUpstream("127.0.0.1:9")
	var wg sync.WaitGroup
	var mu sync.Mutex
	admitted := 0
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if u.begin(nil, 5).ok {
				mu.Lock()
				admitted++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if admitted != 5 || u.Active() != 5 {
		t.Fatalf("%d dials admitted (active %d) with max_connections 5", admitted, u.Active())
	}
}

func TestAHandlerWithoutABreakerIgnoresAnotherHandlersOpenCircuit(t *testing.T) {
	u := NewUpstream("127.0.0.1:9")
	breaker := &PassiveHealth{FailDuration: time.Hour}
	u.failed(u.begin(breaker, 0), breaker, errors.New("refused"))
	if u.begin(breaker, 0).ok {
		t.Fatal("the breaker's own handler dialed an open circuit")
	}
	if !u.begin(nil, 0).ok {
		t.Fatal("a handler without a breaker (after a reload that removed it) was kept off the upstream")
	}
	time.Sleep(5 * time.Millisecond) // the new, shorter cool-down is what is tested
	if !u.begin(&PassiveHealth{FailDuration: time.Millisecond}, 0).ok {
		t.Fatal("a handler with a shorter fail_duration still waits for the old cool-down")
	}
}

func TestSelectionSpreadsOverTheAvailableUpstreamsOnly(t *testing.T) {
	ups := testUpstreams(3)
	for _, policy := range []string{PolicyRoundRobin, PolicyRandom, PolicyWeightedRoundRobin, PolicyLeastConn} {
		b := mustBalancer(t, policy, ups, 0)
		dead := func(u *Upstream) bool { return u != ups[0] }
		counts := map[*Upstream]int{}
		for i := 0; i < 600; i++ {
			first := b.OrderAvailable(nil, client1.Addr(), dead)[0]
			counts[first]++
			if policy == PolicyLeastConn {
				first.Acquire() // long-lived connections
			}
		}
		if counts[ups[0]] != 0 || counts[ups[1]] < 240 || counts[ups[2]] < 240 {
			t.Errorf("%s with the first upstream dead: %d/%d/%d, want the other two evenly", policy,
				counts[ups[0]], counts[ups[1]], counts[ups[2]])
		}
		for _, u := range ups {
			for u.Active() > 0 {
				u.Release()
			}
		}
	}
}

func TestActiveVerdictSurvivesAReload(t *testing.T) {
	hole := NewUpstream(chaintest.BlackholeAddr(t))
	events := watch(hole)
	cfg := ActiveHealth{Interval: time.Hour, Timeout: 100 * time.Millisecond}
	stopOld := StartHealthChecks([]*Upstream{hole}, cfg)
	events.next(t, HealthHealthy, HealthUnhealthy)
	stopNew := StartHealthChecks([]*Upstream{hole}, cfg) // the reload's checks
	stopOld()
	if h := hole.Health(); h != HealthUnhealthy {
		t.Fatalf("after the reload the upstream is %s before any new probe", h)
	}
	stopNew()
	events.next(t, HealthUnhealthy, HealthHealthy)
	select {
	case e := <-events.ch:
		t.Fatalf("a reload flapped the upstream: %+v", e)
	default:
	}
}

func TestWatchersRunOnTheirStateOnly(t *testing.T) {
	u := NewUpstream("127.0.0.1:9")
	opened, unhealthy := make(chan struct{}, 4), make(chan struct{}, 4)
	cancel := u.OnHealth(HealthOpen, func() { opened <- struct{}{} })
	u.OnHealth(HealthUnhealthy, func() { unhealthy <- struct{}{} })
	p := &PassiveHealth{FailDuration: time.Hour}
	u.failed(u.begin(p, 0), p, errors.New("refused"))
	if len(opened) != 1 || len(unhealthy) != 0 {
		t.Fatalf("on open: %d open and %d unhealthy watchers ran", len(opened), len(unhealthy))
	}
	cancel()
	u.voteActive(true, "down")
	if len(opened) != 1 || len(unhealthy) != 1 {
		t.Fatalf("on unhealthy, after the open watcher was cancelled: %d open and %d unhealthy runs", len(opened), len(unhealthy))
	}
}

func TestAClientThatLeavesEndsItsTryDuration(t *testing.T) {
	p := &Proxy{Balancer: balancerFor(t, chaintest.RefusedAddr(t)),
		Dialer: &Dialer{TryInterval: 20 * time.Millisecond}, TryDuration: time.Minute}
	h := startHop(t, p, nil)
	c := chaintest.Dial(t, h.Addr)
	start := time.Now()
	c.Close()
	if r := h.reason(t); r != ReasonClientClosed || time.Since(start) > time.Second {
		t.Fatalf("a client gone during try_duration ended after %v with %s", time.Since(start), r)
	}
}

func TestMaxLifetimeBoundsTheConnectPhase(t *testing.T) {
	p := &Proxy{Balancer: balancerFor(t, chaintest.RefusedAddr(t)),
		Dialer: &Dialer{TryInterval: 20 * time.Millisecond}, TryDuration: time.Minute,
		Timeouts: Timeouts{MaxLifetime: 200 * time.Millisecond}}
	h := startHop(t, p, nil)
	chaintest.Dial(t, h.Addr)
	start := time.Now()
	if r := h.reason(t); r != ReasonMaxLifetime || time.Since(start) > time.Second {
		t.Fatalf("a connection retrying past max_lifetime ended after %v with %s", time.Since(start), r)
	}
}

func TestCloseUpstreamClosesOneScopesConnectionsOnly(t *testing.T) {
	tr := NewTracker()
	a, _ := tr.Admit("mine", Limits{}, "", client1)
	b, _ := tr.Admit("other", Limits{}, "", client1)
	for _, r := range []*Record{a, b} {
		r.upstream = "127.0.0.1:9"
	}
	if n := tr.CloseUpstream("127.0.0.1:9", "mine", ReasonUpstreamUnhealthy, "circuit opened: refused"); n != 1 || a.Reason() != ReasonUpstreamUnhealthy ||
		a.Info().Detail != "circuit opened: refused" || b.Reason() != ReasonNone {
		t.Fatalf("closed %d; reasons %q %q", n, a.Reason(), b.Reason())
	}
	tr.Remove(a, ReasonNone)
	tr.Remove(b, ReasonClientClosed)
}

// A circuit that a handler's breaker opened, on an upstream that now
// answers, closes at the first connection a handler without a breaker
// makes through it (after a reload that dropped fail_duration): it is not
// left open, or half-open with no handler to run its trial, reported
// unhealthy while it serves.
func TestASuccessWithoutABreakerClosesTheCircuit(t *testing.T) {
	u := NewUpstream(chaintest.NewEchoBackend(t).Addr)
	events := watch(u)
	// A failure under a breaker that one failure opens: the upstream was
	// down when the old config dialed it.
	passive := &PassiveHealth{FailDuration: time.Hour, MaxFails: 1}
	if !u.failed(u.begin(passive, 0), passive, errors.New("connection refused")) {
		t.Fatal("the failure did not open the circuit")
	}
	events.next(t, HealthHealthy, HealthOpen)

	noBreaker := &Dialer{ConnectTimeout: time.Second}
	c, _, err := noBreaker.Dial(context.Background(), []*Upstream{u})
	if err != nil {
		t.Fatalf("a handler without a breaker could not dial: %v", err)
	}
	c.Close()
	u.Release()
	events.next(t, HealthOpen, HealthHealthy)
	if got := u.Health(); got != HealthHealthy {
		t.Fatalf("health %s after a connection succeeded, want healthy", got)
	}
}

// A breaker's own dial that began before its circuit opened and then
// connects does not close it: the cool-down and the one trial decide.
func TestABreakersEarlierDialDoesNotCloseTheCircuit(t *testing.T) {
	u := NewUpstream(chaintest.NewEchoBackend(t).Addr)
	events := watch(u)
	passive := &PassiveHealth{FailDuration: time.Hour, MaxFails: 1}
	early := u.begin(passive, 0)
	if !u.failed(u.begin(passive, 0), passive, errors.New("connection refused")) {
		t.Fatal("the failure did not open the circuit")
	}
	events.next(t, HealthHealthy, HealthOpen)
	u.succeeded(early)
	if got := u.Health(); got != HealthOpen {
		t.Fatalf("health %s after a dial begun before the circuit opened connected, want open until the trial", got)
	}
	u.Release()
}
