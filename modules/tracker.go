package modules

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/time/rate"

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

// observer turns the tracker's events into logs and metrics.
type observer struct{}

// appLogger is the logger Caddy handed the layer4chain app of the config
// that started last, so that lines follow the logging config of the latest
// reload (its outputs, include and exclude), even for a connection an older
// config accepted. Caddy routes a module's lines to custom logs only
// through the logger it hands that module; caddy.Log() is the default log
// alone.
var appLogger atomic.Pointer[zap.Logger]

// fallbackLogger caches caddy.Log().Named("layer4chain") for the moments no
// app runs (tests of the handler alone): naming a logger allocates. The
// cache follows caddy.Log(), which a config load replaces.
var fallbackLogger atomic.Pointer[struct{ base, named *zap.Logger }]

func logger() *zap.Logger {
	if l := appLogger.Load(); l != nil {
		return l
	}
	base := caddy.Log()
	if c := fallbackLogger.Load(); c != nil && c.base == base {
		return c.named
	}
	named := base.Named("layer4chain")
	fallbackLogger.Store(&struct{ base, named *zap.Logger }{base, named})
	return named
}

// Refusals at admission are logged at most refusalLogRate lines a second
// (with bursts of refusalLogBurst), so a flood cannot turn into a flood of
// log lines; the lines left out are counted and reported in the next line
// that is written, or by the next sweep.
const (
	refusalLogRate  = 10
	refusalLogBurst = 20
)

var refusalLog = struct {
	limiter    *rate.Limiter
	suppressed atomic.Int64
}{limiter: rate.NewLimiter(refusalLogRate, refusalLogBurst)}

// Refused writes a line for a connection refused at admission, naming the
// limit that refused it, at its reason's level (closeLevel). Its fields
// have the names of the admin API's.
func (observer) Refused(server string, client netip.AddrPort, reason layer4chain.CloseReason, detail string) {
	ce := logger().Check(closeLevel(reason), "connection refused")
	if ce == nil {
		return
	}
	if !refusalLog.limiter.Allow() {
		refusalLog.suppressed.Add(1)
		return
	}
	fields := []zap.Field{
		zap.String("server", server),
		zap.String("client", client.String()),
		zap.String("close_reason", string(reason)),
		zap.String("close_detail", detail),
	}
	if n := refusalLog.suppressed.Swap(0); n > 0 {
		fields = append(fields, zap.Int64("suppressed", n))
	}
	ce.Write(fields...)
}

// reportSuppressedRefusals writes how many refusal lines the rate limit
// left out since the last line, if any.
func reportSuppressedRefusals() {
	if n := refusalLog.suppressed.Swap(0); n > 0 {
		logger().Warn("refused connections not logged one by one", zap.Int64("suppressed", n))
	}
}

// StateChanged writes a debug line per state change, with the chain ID
// that follows the connection across hops, and adds the change to the
// connection's span, if traced.
func (observer) StateChanged(r *layer4chain.Record, from, to layer4chain.State) {
	spanStateChanged(r, to)
	if ce := logger().Check(zap.DebugLevel, "state changed"); ce != nil {
		ce.Write(zap.Uint64("id", r.ID), zap.String("chain_id", r.ChainID()), zap.String("server", r.Server),
			zap.String("from", from.String()), zap.String("to", to.String()))
	}
}

// Dial outcomes, as the dial_duration_seconds label has them.
var (
	dialOK     = metrics.dialDuration.WithLabelValues("ok")
	dialFailed = metrics.dialDuration.WithLabelValues("failed")
)

// Dialed observes the dial duration, apart for failed attempts: a timed-out
// attempt lasts connect_timeout and would hide the real connect latency.
func (observer) Dialed(upstream string, took time.Duration, err error) {
	if err != nil {
		dialFailed.Observe(took.Seconds())
		return
	}
	dialOK.Observe(took.Seconds())
}

// Swept observes the sweep duration and reports reaped zombies loudly: a
// zombie is a bug.
func (observer) Swept(res layer4chain.SweepResult) {
	metrics.sweepDuration.Observe(res.Took.Seconds())
	reportSuppressedRefusals()
	if res.Zombies > 0 {
		logger().Error("sweep reaped zombie records", zap.Int("zombies", res.Zombies))
	}
}

// Closed ends the connection's span, if traced, writes the access-log line
// of a closed connection, at its close reason's level (closeLevel), and
// observes its duration. The fields it shares with the admin API's
// connections have the admin API's names.
func (observer) Closed(r *layer4chain.Record) {
	endSpan(r)
	metrics.connectionDuration.Observe(time.Since(r.Started).Seconds())
	ce := logger().Check(closeLevel(r.Reason()), "connection closed")
	if ce == nil {
		return
	}
	info := r.Info()
	// What a connection ended before knowing (its chain, its original
	// client, an upstream) is left out rather than written empty.
	fields := make([]zap.Field, 0, 16)
	fields = append(fields, zap.Uint64("id", info.ID))
	if info.ChainID != "" {
		fields = append(fields, zap.String("chain_id", info.ChainID))
	}
	if info.Hop > 0 {
		// Without a chain ID too: a loop another proxy's header reported.
		fields = append(fields, zap.Int("hop", info.Hop))
	}
	fields = append(fields, zap.String("server", info.Server), zap.String("client", info.Client))
	if info.OriginalClient != "" {
		fields = append(fields, zap.String("original_client", info.OriginalClient))
	}
	if info.Upstream != "" {
		fields = append(fields, zap.String("upstream", info.Upstream))
	}
	if info.UpstreamTemplate != "" {
		fields = append(fields, zap.String("upstream_template", info.UpstreamTemplate))
	}
	fields = append(fields,
		zap.Duration("duration", time.Since(info.Started)),
		zap.Int64("bytes_up", info.BytesUp),
		zap.Int64("bytes_down", info.BytesDown),
		zap.String("close_reason", string(info.Reason)),
	)
	if info.Detail != "" {
		fields = append(fields, zap.String("close_detail", info.Detail))
	}
	if info.SNI != "" {
		fields = append(fields, zap.String("sni", info.SNI))
	}
	if len(info.FailedDials) > 0 {
		fields = append(fields, zap.Array("failed_dials", failedDials(info.FailedDials)))
	}
	ce.Write(fields...)
}

// failedDials writes a connection's failed dial attempts as a JSON list
// of objects in its access-log line.
type failedDials []layer4chain.DialAttempt

// MarshalLogArray implements zapcore.ArrayMarshaler.
func (list failedDials) MarshalLogArray(enc zapcore.ArrayEncoder) error {
	for _, a := range list {
		if err := enc.AppendObject(zapcore.ObjectMarshalerFunc(func(enc zapcore.ObjectEncoder) error {
			enc.AddString("upstream", a.Upstream)
			enc.AddString("reason", string(a.Reason))
			enc.AddString("error", a.Error)
			enc.AddInt64("duration_ns", int64(a.Duration)) // as the admin API has it
			return nil
		})); err != nil {
			return err
		}
	}
	return nil
}
