package layer4chain

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
)

// testUpstreams returns n upstreams with distinct, never-dialed addresses.
func testUpstreams(n int) []*Upstream {
	ups := make([]*Upstream, n)
	for i := range ups {
		ups[i] = NewUpstream(fmt.Sprintf("127.0.0.1:%d", 10001+i))
	}
	return ups
}

func mustBalancer(t testing.TB, policy string, ups []*Upstream, tries int) *Balancer {
	t.Helper()
	b, err := NewBalancer(policy, ups, tries)
	if err != nil {
		t.Fatalf("NewBalancer(%q): %v", policy, err)
	}
	return b
}

// indexes turns an order into upstream positions, which read better in
// failure messages than addresses.
func indexes(ups, order []*Upstream) []int {
	out := make([]int, len(order))
	for i, u := range order {
		out[i] = slices.Index(ups, u)
	}
	return out
}

var client = netip.MustParseAddr("127.0.0.1")

func TestBalancerFirstAlwaysStartsAtFirstUpstreamThenFailsOverInOrder(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(3)
	for _, policy := range []string{"", PolicyFirst} {
		b := mustBalancer(t, policy, ups, 0)
		for range 3 {
			if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, []int{0, 1, 2}) {
				t.Fatalf("policy %q: order %v, want [0 1 2]", policy, got)
			}
		}
	}
}

func TestBalancerRoundRobinRotatesStartAcrossCalls(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(3)
	b := mustBalancer(t, PolicyRoundRobin, ups, 0)
	want := [][]int{{0, 1, 2}, {1, 2, 0}, {2, 0, 1}, {0, 1, 2}}
	for i, w := range want {
		if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, w) {
			t.Fatalf("call %d: order %v, want %v", i, got, w)
		}
	}
}

func TestBalancerRoundRobinSharesEvenlyUnderConcurrency(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(4)
	b := mustBalancer(t, PolicyRoundRobin, ups, 1)
	const perWorker, workers = 100, 8
	counts := make([][]int, workers)
	var wg sync.WaitGroup
	for w := range workers {
		counts[w] = make([]int, len(ups))
		wg.Go(func() {
			buf := make([]*Upstream, 0, 1)
			for range perWorker {
				counts[w][slices.Index(ups, b.Order(buf[:0], client)[0])]++
			}
		})
	}
	wg.Wait()
	total := make([]int, len(ups))
	for _, c := range counts {
		for i, n := range c {
			total[i] += n
		}
	}
	for i, n := range total {
		if n != perWorker*workers/len(ups) {
			t.Fatalf("upstream %d picked %d times, want exactly %d: %v", i, n, perWorker*workers/len(ups), total)
		}
	}
}

func TestBalancerLeastConnPicksFewestActiveLowestIndexOnTies(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(3)
	b := mustBalancer(t, PolicyLeastConn, ups, 0)
	if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, []int{0, 1, 2}) {
		t.Fatalf("all idle: order %v, want [0 1 2]", got)
	}
	ups[0].Acquire()
	ups[0].Acquire()
	ups[1].Acquire()
	if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, []int{2, 0, 1}) {
		t.Fatalf("active 2,1,0: order %v, want [2 0 1]", got)
	}
	ups[2].Acquire()
	if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, []int{1, 2, 0}) {
		t.Fatalf("active 2,1,1: order %v, want [1 2 0] (tie goes to the lower index)", got)
	}
	ups[0].Release()
	ups[0].Release()
	if ups[0].Active() != 0 || ups[1].Active() != 1 {
		t.Fatalf("Active after release: %d, %d", ups[0].Active(), ups[1].Active())
	}
	if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, []int{0, 1, 2}) {
		t.Fatalf("active 0,1,1: order %v, want [0 1 2]", got)
	}
}

func TestBalancerRandomEventuallyStartsAtEveryUpstream(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(4)
	b := mustBalancer(t, PolicyRandom, ups, 0)
	seen := make([]int, len(ups))
	for range 1000 {
		order := indexes(ups, b.Order(nil, client))
		if len(order) != len(ups) {
			t.Fatalf("order %v has %d entries, want %d", order, len(order), len(ups))
		}
		for i := 1; i < len(order); i++ {
			if order[i] != (order[0]+i)%len(ups) {
				t.Fatalf("order %v does not fail over in configured order", order)
			}
		}
		seen[order[0]]++
	}
	// With 1000 uniform draws over 4, missing one has probability ~1e-125.
	for i, n := range seen {
		if n == 0 {
			t.Fatalf("upstream %d never picked first in 1000 calls: %v", i, seen)
		}
	}
}

func TestBalancerIPHashIsStablePerClientAndSpreadsClients(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(4)
	b := mustBalancer(t, PolicyIPHash, ups, 0)
	starts := make(map[int]bool)
	for i := range 64 {
		c := netip.AddrFrom4([4]byte{127, 0, byte(i), 1})
		first := b.Order(nil, c)[0]
		for range 5 {
			if got := b.Order(nil, c)[0]; got != first {
				t.Fatalf("client %v moved from %s to %s", c, first.Addr, got.Addr)
			}
		}
		starts[slices.Index(ups, first)] = true
	}
	if len(starts) != len(ups) {
		t.Fatalf("64 clients only reached upstreams %v of %d", starts, len(ups))
	}

	// An IPv4 client reaches the same upstream whether or not it is seen
	// through a dual-stack (IPv4-mapped) socket.
	v4 := netip.MustParseAddr("127.0.0.7")
	mapped := netip.AddrFrom16(v4.As16())
	if a, m := b.Order(nil, v4)[0], b.Order(nil, mapped)[0]; a != m {
		t.Fatalf("%v hashes to %s but %v to %s", v4, a.Addr, mapped, m.Addr)
	}

	// A fresh balancer over the same upstreams agrees, so the mapping
	// survives a config reload that keeps the upstream list.
	b2 := mustBalancer(t, PolicyIPHash, ups, 0)
	c := netip.MustParseAddr("::1")
	if x, y := b.Order(nil, c)[0], b2.Order(nil, c)[0]; x != y {
		t.Fatalf("two balancers disagree for %v: %s vs %s", c, x.Addr, y.Addr)
	}
	// A missing client address must not panic.
	_ = b.Order(nil, netip.Addr{})
}

func TestBalancerTriesBeyondUpstreamsCyclesAgain(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(2)
	b := mustBalancer(t, PolicyRoundRobin, ups, 5)
	if b.Tries() != 5 {
		t.Fatalf("Tries() = %d, want 5", b.Tries())
	}
	if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, []int{0, 1, 0, 1, 0}) {
		t.Fatalf("order %v, want [0 1 0 1 0]", got)
	}
	if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, []int{1, 0, 1, 0, 1}) {
		t.Fatalf("second order %v, want [1 0 1 0 1]", got)
	}
}

func TestBalancerTriesBelowUpstreamsLimitsAttempts(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(3)
	b := mustBalancer(t, PolicyFirst, ups, 1)
	if got := indexes(ups, b.Order(nil, client)); !slices.Equal(got, []int{0}) {
		t.Fatalf("order %v, want [0]", got)
	}
	if b := mustBalancer(t, PolicyFirst, ups, -3); b.Tries() != 3 {
		t.Fatalf("tries -3: Tries() = %d, want one per upstream (3)", b.Tries())
	}
}

func TestBalancerOrderAppendsToDst(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(2)
	b := mustBalancer(t, PolicyFirst, ups, 0)
	prefix := NewUpstream("127.0.0.1:1")
	got := b.Order([]*Upstream{prefix}, client)
	if len(got) != 3 || got[0] != prefix || got[1] != ups[0] || got[2] != ups[1] {
		t.Fatalf("Order did not append: %v", indexes(ups, got))
	}
}

func TestBalancerKeepsItsOwnCopyOfUpstreams(t *testing.T) {
	t.Parallel()
	ups := testUpstreams(2)
	b := mustBalancer(t, PolicyFirst, ups, 0)
	orig := ups[0]
	ups[0] = NewUpstream("127.0.0.1:1")
	if got := b.Order(nil, client)[0]; got != orig {
		t.Fatalf("balancer follows the caller's slice: got %s", got.Addr)
	}
}

func TestNewBalancerRejectsUnknownPolicyByName(t *testing.T) {
	t.Parallel()
	_, err := NewBalancer("bogus", testUpstreams(2), 0)
	if err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Fatalf("NewBalancer(bogus) error = %v, want one naming bogus", err)
	}
	for _, p := range Policies {
		if _, err := NewBalancer(p, testUpstreams(1), 0); err != nil {
			t.Errorf("listed policy %q rejected: %v", p, err)
		}
	}
}

func TestNewBalancerRejectsMissingUpstreams(t *testing.T) {
	t.Parallel()
	if _, err := NewBalancer(PolicyFirst, nil, 0); err == nil {
		t.Error("no upstreams accepted")
	}
	if _, err := NewBalancer(PolicyFirst, []*Upstream{NewUpstream("127.0.0.1:1"), nil}, 0); err == nil {
		t.Error("nil upstream accepted")
	}
}

func TestBalancerOrderDoesNotAllocate(t *testing.T) {
	ups := testUpstreams(4)
	for _, p := range Policies {
		b := mustBalancer(t, p, ups, 0)
		buf := make([]*Upstream, 0, b.Tries())
		if n := testing.AllocsPerRun(100, func() { buf = b.Order(buf[:0], client) }); n != 0 {
			t.Errorf("policy %s: Order allocates %v times per call", p, n)
		}
	}
}

func BenchmarkBalancerOrder(b *testing.B) {
	ups := testUpstreams(4)
	c := netip.MustParseAddr("::1")
	for _, p := range Policies {
		b.Run(p, func(b *testing.B) {
			bal := mustBalancer(b, p, ups, 0)
			buf := make([]*Upstream, 0, bal.Tries())
			b.ReportAllocs()
			for b.Loop() {
				buf = bal.Order(buf[:0], c)
			}
		})
	}
}
