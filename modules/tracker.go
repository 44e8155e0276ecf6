package modules

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

var (
	trackerOnce sync.Once
	tracker     *layer4chain.Tracker
)

// processTracker returns the tracker shared by every handler of every
// config this process loads, so a reload keeps every live connection's
// record.
func processTracker() *layer4chain.Tracker {
	trackerOnce.Do(func() {
		tracker = layer4chain.NewTracker()
		tracker.Observer = observer{}
	})
	return tracker
}

// observer turns the tracker's events into logs and metrics. It asks for
// Caddy's current logger each time, so lines follow the logging config of
// the latest reload even for a connection an older config accepted.
type observer struct{}

// namedLogger caches caddy.Log().Named("layer4chain"): naming a logger
// allocates, and this runs several times per connection. The cache follows
// caddy.Log(), which a config load replaces.
var namedLogger atomic.Pointer[struct{ base, named *zap.Logger }]

func logger() *zap.Logger {
	base := caddy.Log()
	if c := namedLogger.Load(); c != nil && c.base == base {
		return c.named
	}
	named := base.Named("layer4chain")
	namedLogger.Store(&struct{ base, named *zap.Logger }{base, named})
	return named
}

// StateChanged writes a debug line per state change.
func (observer) StateChanged(r *layer4chain.Record, from, to layer4chain.State) {
	if ce := logger().Check(zap.DebugLevel, "state changed"); ce != nil {
		ce.Write(zap.Uint64("id", r.ID), zap.String("from", from.String()), zap.String("to", to.String()))
	}
}

// Dialed observes the dial duration.
func (observer) Dialed(upstream string, took time.Duration, err error) {
	metrics.dialDuration.Observe(took.Seconds())
}

// Swept observes the sweep duration and reports reaped zombies loudly: a
// zombie is a bug.
func (observer) Swept(res layer4chain.SweepResult) {
	metrics.sweepDuration.Observe(res.Took.Seconds())
	if res.Zombies > 0 {
		logger().Error("sweep reaped zombie records", zap.Int("zombies", res.Zombies))
	}
}

// Closed writes the access-log line of a closed connection and observes its
// duration.
func (observer) Closed(r *layer4chain.Record) {
	metrics.connectionDuration.Observe(time.Since(r.Started).Seconds())
	ce := logger().Check(zap.InfoLevel, "connection closed")
	if ce == nil {
		return
	}
	info := r.Info()
	fields := []zap.Field{
		zap.Uint64("id", info.ID),
		zap.String("chain_id", info.ChainID),
		zap.Int("hop", info.Hop),
		zap.String("server", info.Server),
		zap.String("client", info.Client),
		zap.String("original_client", info.OriginalClient),
		zap.String("upstream", info.Upstream),
		zap.Duration("duration", time.Since(info.Started)),
		zap.Int64("bytes_up", info.BytesUp),
		zap.Int64("bytes_down", info.BytesDown),
		zap.String("reason", string(info.Reason)),
	}
	if info.Detail != "" {
		fields = append(fields, zap.String("detail", info.Detail))
	}
	ce.Write(fields...)
}

// upstreamsByAddr holds one *layer4chain.Upstream per dial address for the whole
// process, so the live-connection counts that least_conn balances on
// include connections of handlers from older configs.
var upstreamsByAddr sync.Map // string → *layer4chain.Upstream

func sharedUpstream(addr string) *layer4chain.Upstream {
	if u, ok := upstreamsByAddr.Load(addr); ok {
		return u.(*layer4chain.Upstream)
	}
	u, _ := upstreamsByAddr.LoadOrStore(addr, layer4chain.NewUpstream(addr))
	return u.(*layer4chain.Upstream)
}
