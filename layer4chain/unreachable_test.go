//go:build linux

// The black-hole listener relies on Linux dropping SYNs for a listener whose
// accept queue is full, so it and the tests that need it are Linux-only.

package layer4chain

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

func newBlackholeListener(t *testing.T) string { return chaintest.BlackholeAddr(t) }

func TestBlackholeListenerTimesOutConnects(t *testing.T) {
	t.Parallel()
	addr := newBlackholeListener(t)
	start := time.Now()
	_, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	elapsed := time.Since(start)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("dial %s: got %v, want a timeout", addr, err)
	}
	if elapsed < 150*time.Millisecond {
		t.Fatalf("dial %s gave up after %v, before its 200ms timeout", addr, elapsed)
	}
}

func TestDialUnreachableUpstreamTimesOutWithinConnectTimeout(t *testing.T) {
	t.Parallel()
	up := NewUpstream(newBlackholeListener(t))
	var failures []*DialError
	d := &Dialer{
		ConnectTimeout: 300 * time.Millisecond,
		OnFailure:      func(e *DialError) { failures = append(failures, e) },
	}
	start := time.Now()
	c, used, err := d.Dial(context.Background(), []*Upstream{up})
	elapsed := time.Since(start)
	if err == nil {
		c.Close()
		t.Fatalf("dial to black hole connected via %v", used.Addr)
	}
	var de *DialError
	if !errors.As(err, &de) {
		t.Fatalf("error %T %v is not a *DialError", err, err)
	}
	if de.Reason != ReasonConnectTimeout || de.Upstream != up.Addr {
		t.Fatalf("got %+v, want connect_timeout for %s", de, up.Addr)
	}
	if elapsed < 250*time.Millisecond || elapsed > 800*time.Millisecond {
		t.Fatalf("failed after %v, want about the 300ms connect timeout (at most 800ms)", elapsed)
	}
	if len(failures) != 1 || failures[0].Reason != ReasonConnectTimeout {
		t.Fatalf("OnFailure got %v, want one connect_timeout", failures)
	}
}

func TestDialFailsOverFromUnreachableToHealthyAfterConnectTimeout(t *testing.T) {
	t.Parallel()
	hole := NewUpstream(newBlackholeListener(t))
	good := NewUpstream(newAcceptingListener(t))
	var failures []*DialError
	d := &Dialer{
		ConnectTimeout: 300 * time.Millisecond,
		OnFailure:      func(e *DialError) { failures = append(failures, e) },
	}
	start := time.Now()
	c, used, err := d.Dial(context.Background(), []*Upstream{hole, good})
	elapsed := time.Since(start)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if used != good {
		t.Fatalf("connected via %s, want %s", used.Addr, good.Addr)
	}
	if elapsed < 250*time.Millisecond || elapsed > 800*time.Millisecond {
		t.Fatalf("failover took %v, want about the 300ms connect timeout", elapsed)
	}
	if len(failures) != 1 || failures[0].Upstream != hole.Addr || failures[0].Reason != ReasonConnectTimeout {
		t.Fatalf("OnFailure got %v, want one connect_timeout for %s", failures, hole.Addr)
	}
}

// doneWatchCtx reports the first time someone waits on it, which for
// net.Dialer means an attempt has started.
type doneWatchCtx struct {
	context.Context
	once    sync.Once
	waiting chan struct{}
}

func (c *doneWatchCtx) Done() <-chan struct{} {
	c.once.Do(func() { close(c.waiting) })
	return c.Context.Done()
}

func TestDialCancelledWhileWaitingOnUnreachableUpstreamStops(t *testing.T) {
	t.Parallel()
	hole := NewUpstream(newBlackholeListener(t))
	good := NewUpstream(newAcceptingListener(t))
	parent, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctx := &doneWatchCtx{Context: parent, waiting: make(chan struct{})}
	var failures []*DialError
	d := &Dialer{
		ConnectTimeout: 10 * time.Second,
		OnFailure:      func(e *DialError) { failures = append(failures, e) },
	}
	type result struct {
		used *Upstream
		err  error
	}
	done := make(chan result, 1)
	go func() {
		c, used, err := d.Dial(ctx, []*Upstream{hole, good})
		if c != nil {
			c.Close()
		}
		done <- result{used, err}
	}()
	<-ctx.waiting
	start := time.Now()
	cancel()
	r := <-done
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Fatalf("dial kept going for %v after cancel", elapsed)
	}
	if r.err == nil {
		t.Fatalf("dial connected via %s despite cancel", r.used.Addr)
	}
	var de *DialError
	if !errors.As(r.err, &de) || de.Reason != ReasonConnectFailed || de.Upstream != hole.Addr ||
		!errors.Is(r.err, context.Canceled) {
		t.Fatalf("got %v, want connect_failed for %s wrapping context.Canceled", r.err, hole.Addr)
	}
	// The caller stopped the attempt: no failure of the upstream's.
	if len(failures) != 0 {
		t.Fatalf("OnFailure got %v for an attempt the caller cancelled, want none", failures)
	}
}
