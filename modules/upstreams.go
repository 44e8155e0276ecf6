package modules

import (
	"cmp"
	"slices"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

// upstreamPool holds one *layer4chain.Upstream per dial address, shared by
// every handler that dials it, of every loaded config: the live-connection
// count that least_conn and max_connections read, and the health (the
// circuit, the active checks' verdict). A handler takes a reference in
// Provision and gives it back in Cleanup. A reload provisions the new
// config before it cleans up the old one, so an upstream that both list
// keeps its state across the reload, while one that only the old config
// listed leaves the pool with it.
var upstreamPool = caddy.NewUsagePool()

// pooledUpstream is the pool's value.
type pooledUpstream struct{ *layer4chain.Upstream }

// lingering holds upstreams that left every config while connections to
// them were still open (address → *layer4chain.Upstream): those still count
// against the upstream's limits, so a config that lists it again takes it
// back with its count instead of starting from zero.
var lingering sync.Map

// Destruct implements caddy.Destructor: an upstream whose connections are
// all gone is forgotten; one with connections left lingers.
func (p pooledUpstream) Destruct() error {
	if p.Active() > 0 {
		lingering.Store(p.Addr, p.Upstream)
	}
	return nil
}

// acquireUpstream returns the pool's upstream for addr, creating it on the
// first reference (or taking back a lingering one that still has
// connections), and counts a reference that releaseUpstream gives back.
func acquireUpstream(addr string) *layer4chain.Upstream {
	v, _, _ := upstreamPool.LoadOrNew(addr, func() (caddy.Destructor, error) {
		if v, ok := lingering.LoadAndDelete(addr); ok && v.(*layer4chain.Upstream).Active() > 0 {
			return pooledUpstream{v.(*layer4chain.Upstream)}, nil
		}
		u := layer4chain.NewUpstream(addr)
		u.OnTransition = reportTransition
		for _, h := range layer4chain.Healths {
			metrics.circuitTransitions.With(prometheus.Labels{"upstream": addr, "to": string(h)}) // a zero until the first
		}
		return pooledUpstream{u}, nil
	})
	return v.(pooledUpstream).Upstream
}

// releaseUpstream gives back one reference taken by acquireUpstream.
func releaseUpstream(addr string) {
	_, _ = upstreamPool.Delete(addr)
}

// pooledUpstreams returns every upstream in the pool, and those that left
// it with connections still open, sorted by address.
func pooledUpstreams() []*layer4chain.Upstream {
	var list []*layer4chain.Upstream
	upstreamPool.Range(func(_, v any) bool {
		list = append(list, v.(pooledUpstream).Upstream)
		return true
	})
	lingering.Range(func(addr, v any) bool {
		if u := v.(*layer4chain.Upstream); u.Active() > 0 {
			list = append(list, u)
		} else {
			lingering.CompareAndDelete(addr, v)
		}
		return true
	})
	slices.SortFunc(list, func(a, b *layer4chain.Upstream) int { return cmp.Compare(a.Addr, b.Addr) })
	return list
}

// reportTransition writes one WARN line per change of an upstream's health
// and counts it, so an operator sees which upstream failed, when, and why.
func reportTransition(tr layer4chain.UpstreamTransition) {
	metrics.circuitTransitions.With(prometheus.Labels{"upstream": tr.Upstream, "to": string(tr.To)}).Inc()
	logger().Warn("upstream health changed",
		zap.String("upstream", tr.Upstream),
		zap.String("from", string(tr.From)),
		zap.String("to", string(tr.To)),
		zap.String("cause", tr.Cause))
}
