package modules

import (
	"cmp"
	"slices"

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

// pooledUpstream is the pool's value. Nothing needs closing when the last
// reference goes: the upstream's connections have their own records.
type pooledUpstream struct{ *layer4chain.Upstream }

// Destruct implements caddy.Destructor.
func (pooledUpstream) Destruct() error { return nil }

// acquireUpstream returns the pool's upstream for addr, creating it on the
// first reference, and counts a reference that releaseUpstream gives back.
func acquireUpstream(addr string) *layer4chain.Upstream {
	v, _, _ := upstreamPool.LoadOrNew(addr, func() (caddy.Destructor, error) {
		u := layer4chain.NewUpstream(addr)
		u.OnTransition = reportTransition
		return pooledUpstream{u}, nil
	})
	return v.(pooledUpstream).Upstream
}

// releaseUpstream gives back one reference taken by acquireUpstream.
func releaseUpstream(addr string) {
	_, _ = upstreamPool.Delete(addr)
}

// pooledUpstreams returns every upstream in the pool, sorted by address.
func pooledUpstreams() []*layer4chain.Upstream {
	var list []*layer4chain.Upstream
	upstreamPool.Range(func(_, v any) bool {
		list = append(list, v.(pooledUpstream).Upstream)
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
