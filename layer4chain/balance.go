package layer4chain

import (
	"errors"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
)

// Policy names, as the JSON "load_balancing.selection.policy" accepts them.
const (
	// PolicyFirst always starts at the first configured upstream, so the
	// others are only used as fallbacks. It is the default.
	PolicyFirst = "first"
	// PolicyRoundRobin rotates the starting upstream across connections.
	PolicyRoundRobin = "round_robin"
	// PolicyLeastConn starts at the upstream with the fewest active
	// connections, the lowest index winning ties so the choice is stable.
	PolicyLeastConn = "least_conn"
	// PolicyRandom starts at a uniformly random upstream.
	PolicyRandom = "random"
	// PolicyIPHash starts at an upstream chosen by hashing the client
	// address, so one client keeps reaching the same backend while the set
	// of upstreams is unchanged.
	PolicyIPHash = "ip_hash"
	// PolicyWeightedRoundRobin rotates the starting upstream in proportion
	// to each upstream's weight, spreading the picks evenly (nginx's smooth
	// weighted round robin).
	PolicyWeightedRoundRobin = "weighted_round_robin"
)

// Policies lists the accepted policy names, for validation messages and docs.
var Policies = []string{PolicyFirst, PolicyRoundRobin, PolicyLeastConn, PolicyRandom, PolicyIPHash, PolicyWeightedRoundRobin}

// UpstreamLimits are one handler's settings for one of its upstreams.
type UpstreamLimits struct {
	// MaxConnections skips the upstream while it has this many active
	// connections; 0 means no limit.
	MaxConnections int
	// Weight is the upstream's share under weighted_round_robin; 0 means 1.
	Weight int
}

// policy is the parsed form of a policy name, so Order switches on an int
// rather than comparing strings on every connection.
type policy uint8

const (
	policyFirst policy = iota
	policyRoundRobin
	policyLeastConn
	policyRandom
	policyIPHash
	policyWeightedRoundRobin
)

// Balancer orders upstreams for one connection's dial attempts. It is shared
// by all connections of a handler and is immutable after NewBalancer except
// for its round-robin counter, so it is safe for concurrent use.
type Balancer struct {
	policy    policy
	upstreams []*Upstream
	limits    []UpstreamLimits // parallel to upstreams; nil: none
	tries     int
	next      atomic.Uint64 // round_robin position; wraps harmlessly

	wrrMu      sync.Mutex
	wrrCurrent []int // smooth weighted round robin state
}

// NewBalancer builds a Balancer over upstreams. An empty policy means first;
// an unknown one is an error naming it, so a typo in config fails loudly
// instead of silently falling back. tries <= 0 means one attempt per
// upstream. At least one upstream is required, and none may be nil, because
// a hop with nothing to dial cannot do its job.
func NewBalancer(policyName string, upstreams []*Upstream, tries int) (*Balancer, error) {
	var p policy
	switch policyName {
	case "", PolicyFirst:
		p = policyFirst
	case PolicyRoundRobin:
		p = policyRoundRobin
	case PolicyLeastConn:
		p = policyLeastConn
	case PolicyRandom:
		p = policyRandom
	case PolicyIPHash:
		p = policyIPHash
	case PolicyWeightedRoundRobin:
		p = policyWeightedRoundRobin
	default:
		return nil, fmt.Errorf("unknown load balancing policy %q (want one of %s)",
			policyName, strings.Join(Policies, ", "))
	}
	if len(upstreams) == 0 {
		return nil, errors.New("load balancing needs at least one upstream")
	}
	for i, u := range upstreams {
		if u == nil {
			return nil, fmt.Errorf("upstream %d is nil", i)
		}
	}
	if tries <= 0 {
		tries = len(upstreams)
	}
	return &Balancer{
		policy: p,
		// A private copy keeps the balancer immutable even if the caller
		// reuses its slice.
		upstreams: append([]*Upstream(nil), upstreams...),
		tries:     tries,
	}, nil
}

// SetUpstreamLimits sets the handler's settings for each upstream, in the
// order of the upstreams given to NewBalancer. Call it before the balancer
// is used.
func (b *Balancer) SetUpstreamLimits(limits []UpstreamLimits) error {
	if len(limits) != len(b.upstreams) {
		return fmt.Errorf("%d upstream limits for %d upstreams", len(limits), len(b.upstreams))
	}
	b.limits = append([]UpstreamLimits(nil), limits...)
	return nil
}

// MaxConnectionsOf returns the handler's limit on u's active connections
// (0: none); it fits Dialer.MaxConnections.
func (b *Balancer) MaxConnectionsOf(u *Upstream) int {
	for i, v := range b.upstreams {
		if v == u {
			return b.maxConns(i)
		}
	}
	return 0
}

// maxConns is the handler's limit on the connections of upstream i.
func (b *Balancer) maxConns(i int) int {
	if b.limits == nil {
		return 0
	}
	return b.limits[i].MaxConnections
}

// weight is upstream i's weight, at least 1.
func (b *Balancer) weight(i int) int {
	if b.limits == nil || b.limits[i].Weight <= 0 {
		return 1
	}
	return b.limits[i].Weight
}

// Tries is the number of dial attempts Order plans for each connection.
func (b *Balancer) Tries() int {
	return b.tries
}

// Order appends to dst, and returns, the upstreams to try for a connection
// from client, Tries entries in all: the policy's pick first, then the
// following upstreams in configured order, wrapping around, so a failure
// fails over to the next one. When Tries exceeds the number of upstreams the
// sequence cycles again. It does not allocate when dst has room, because it
// runs once per accepted connection.
func (b *Balancer) Order(dst []*Upstream, client netip.Addr) []*Upstream {
	return b.OrderAvailable(dst, client, nil)
}

// OrderAvailable is Order where available says which upstreams can take a
// connection now (nil: all): the policy picks among those, and they come
// before the others in the order, so that a dead or full upstream neither
// skews the policy towards its neighbour in the configured order nor costs
// a dial.
func (b *Balancer) OrderAvailable(dst []*Upstream, client netip.Addr, available func(*Upstream) bool) []*Upstream {
	n := len(b.upstreams)
	if n == 0 {
		return dst
	}
	mask := allAvailable(n)
	if available != nil && n <= 64 {
		mask = 0
		for i, u := range b.upstreams {
			if available(u) {
				mask |= 1 << i
			}
		}
		if mask == 0 {
			mask = allAvailable(n) // none now: let the dial report why
		}
	}
	start := b.pick(client, mask)
	end := len(dst) + b.tries
	for len(dst) < end {
		before := len(dst)
		for _, want := range [2]bool{true, false} { // available ones first
			for i := 0; i < n && len(dst) < end; i++ {
				j := (start + i) % n
				if (mask&(1<<j) != 0) == want {
					dst = append(dst, b.upstreams[j])
				}
			}
		}
		if len(dst) == before {
			break
		}
	}
	return dst
}

// allAvailable is the mask of n upstreams (all of them when n > 64).
func allAvailable(n int) uint64 {
	if n >= 64 {
		return ^uint64(0)
	}
	return 1<<n - 1
}

// pick returns the index of the policy's first choice among the upstreams
// in mask.
func (b *Balancer) pick(client netip.Addr, mask uint64) int {
	n := len(b.upstreams)
	in := func(i int) bool { return n > 64 || mask&(1<<i) != 0 }
	count := n
	if n <= 64 {
		count = bits.OnesCount64(mask)
	}
	nth := func(k int) int { // the k-th upstream in mask
		for i := 0; i < n; i++ {
			if in(i) {
				if k == 0 {
					return i
				}
				k--
			}
		}
		return 0
	}
	switch b.policy {
	case policyRoundRobin:
		return nth(int((b.next.Add(1) - 1) % uint64(count)))
	case policyLeastConn:
		best, bestActive := -1, int64(0)
		for i := 0; i < n; i++ {
			if a := b.upstreams[i].Active(); in(i) && (best < 0 || a < bestActive) {
				best, bestActive = i, a
			}
		}
		return max(best, 0)
	case policyRandom:
		return nth(rand.IntN(count))
	case policyIPHash:
		// Hashed over every upstream, so a client keeps its upstream while
		// another one fails; only when its own is unavailable does it move
		// to the next available one.
		h := int(hashAddr(client) % uint64(n))
		for i := 0; i < n; i++ {
			if in((h + i) % n) {
				return (h + i) % n
			}
		}
		return h
	case policyWeightedRoundRobin:
		return b.pickWeighted(in)
	default:
		return nth(0)
	}
}

// pickWeighted is nginx's smooth weighted round robin over the upstreams
// in: every one's current value grows by its weight, the largest is picked
// and lowered by the total, so a 3:1 split picks a a b a rather than a a a
// b.
func (b *Balancer) pickWeighted(in func(int) bool) int {
	b.wrrMu.Lock()
	defer b.wrrMu.Unlock()
	if b.wrrCurrent == nil {
		b.wrrCurrent = make([]int, len(b.upstreams))
	}
	best, total := -1, 0
	for i := range b.upstreams {
		if !in(i) {
			continue
		}
		w := b.weight(i)
		total += w
		b.wrrCurrent[i] += w
		if best < 0 || b.wrrCurrent[i] > b.wrrCurrent[best] {
			best = i
		}
	}
	if best < 0 {
		return 0
	}
	b.wrrCurrent[best] -= total
	return best
}

// hashAddr is FNV-1a over the 16-byte form of the unmapped address, written
// out by hand because hash/fnv would allocate per call. Unmapping first makes
// an IPv4 client hash the same whether it arrived on a v4 or a dual-stack
// socket.
func hashAddr(a netip.Addr) uint64 {
	const (
		offset64 = 14695981039346656037
		prime64  = 1099511628211
	)
	b := a.Unmap().As16()
	h := uint64(offset64)
	for _, c := range b {
		h ^= uint64(c)
		h *= prime64
	}
	return h
}
