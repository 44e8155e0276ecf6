package modules

import (
	"fmt"
	"maps"
	"math"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

func init() {
	caddy.RegisterModule(new(App))
}

// Defaults of the app, documented on the fields they fill.
const (
	defaultSweepInterval = time.Second
	defaultShutdownGrace = 30 * time.Second
	// drainWait bounds how long shutdown waits for the connections it
	// closed to be removed.
	drainWait = 5 * time.Second
)

// App is the layer4chain app: it runs the sweeps over the process's
// connection tracker, exposes its metrics and drains connections when the
// process shuts down. Every `chain` handler loads it, with defaults when
// the config has no `apps.layer4chain`.
//
// The tracker itself belongs to the process, not to a config: a reload
// provisions new handlers and a new app, while connections accepted by the
// old handlers go on undisturbed and stay listed.
type App struct {
	// SweepInterval is how often the sweep runs: it closes connections past
	// a limit that no deadline enforced, reaps zombie records (which must
	// never exist), and reads the layer4 listeners' accept queues to rescue
	// one whose accept loop ended (see rescue.go). Default: 1s. It cannot
	// be off.
	SweepInterval caddy.Duration `json:"sweep_interval,omitempty"`

	// ShutdownGrace is how long the process waits, when it shuts down
	// (`caddy stop`, SIGTERM), for connections to end by themselves before
	// it closes the rest with reason shutdown. The drain first stops the
	// layer4 listeners, so new connections go to a replacement process
	// bound to the same port, or are refused when there is none. A config
	// reload is never a shutdown. Default: 30s. It cannot be off.
	ShutdownGrace caddy.Duration `json:"shutdown_grace,omitempty"`

	// MaxConnections caps the connections of all `chain` handlers of the
	// process together; more are closed at once (reason limit_exceeded).
	// Default (absent or 0): derived from the process's file limit
	// (RLIMIT_NOFILE, `ulimit -n`), so that proxied connections, two file
	// descriptors each, can never exhaust it: caddy-l4 stops accepting on a
	// listener for good when accept(2) fails with EMFILE. -1 switches the
	// limit off.
	MaxConnections int `json:"max_connections,omitempty"`

	// Tracing, if set, makes an OpenTelemetry span of every proxied
	// connection, exported as the OTEL_* environment variables say.
	// Default (absent): off.
	Tracing *Tracing `json:"tracing,omitempty"`

	tracker  *layer4chain.Tracker
	tracer   layer4chain.Tracer // nil unless Tracing is set; see tracing.go
	ctx      caddy.Context
	starters []func() (stop func()) // the handlers' health checks
	stops    []func()
	logger   *zap.Logger
	limit    connectionLimit
	stop     chan struct{}
	stopped  chan struct{}
	watch    listenerWatch // the layer4 listeners; see rescue.go
}

// onStart registers what a handler of this config starts with the config
// (its health checks) and stops with it. nil is ignored.
func (a *App) onStart(start func() (stop func())) {
	if start != nil {
		a.starters = append(a.starters, start)
	}
}

// connectionLimit is the process-wide connection limit a config asks for,
// and where it comes from.
type connectionLimit struct {
	max    int    // 0: no limit
	source string // "max_connections", "RLIMIT_NOFILE", "off" or why there is none
	nofile uint64 // the file limit, 0 when unknown
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4chain",
		New: func() caddy.Module { return new(App) },
	}
}

// UnmarshalJSON decodes the app's config strictly, naming the field of a
// bad value (see strictDecode).
func (a *App) UnmarshalJSON(b []byte) error {
	type plain App // the same fields, without this method
	return strictDecode(b, (*plain)(a))
}

// Provision checks the config, fills defaults, works out the connection
// limit and registers the metrics in this config's registry. It changes
// nothing the running config uses: Start applies the limit.
func (a *App) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	a.logger = ctx.Logger()
	if err := a.check(); err != nil {
		return err
	}
	a.SweepInterval = caddy.Duration(resolveDuration(a.SweepInterval, defaultSweepInterval))
	a.ShutdownGrace = caddy.Duration(resolveDuration(a.ShutdownGrace, defaultShutdownGrace))
	a.limit = a.connectionLimit()
	a.tracker = processTracker()
	if a.Tracing != nil {
		tracer, err := acquireTracer(ctx, a.Tracing.sampleRatio())
		if err != nil {
			return err
		}
		a.tracer = tracer
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	return nil
}

// check rejects bad values with an error naming the field. It runs in
// Provision and at the end of the Caddyfile's global option, so that a
// mistake fails `caddy adapt` at the block's line too.
func (a *App) check() error {
	if err := checkDuration("sweep_interval", a.SweepInterval, whySweepIntervalOn); err != nil {
		return err
	}
	if err := checkDuration("shutdown_grace", a.ShutdownGrace, whyShutdownGraceOn); err != nil {
		return err
	}
	if err := checkLimit("max_connections", a.MaxConnections, "", 0); err != nil {
		return err
	}
	if a.Tracing != nil {
		return a.Tracing.check()
	}
	return nil
}

// connectionLimit resolves MaxConnections against the file limit.
func (a *App) connectionLimit() connectionLimit {
	nofile, known := layer4chain.FileLimit()
	derived := 0
	if known {
		derived = layer4chain.ConnectionLimitForFiles(nofile)
	}
	l := connectionLimit{max: resolveLimit(a.MaxConnections, derived), nofile: nofile}
	switch {
	case a.MaxConnections > 0:
		l.source = "max_connections"
	case l.max > 0:
		l.source = "RLIMIT_NOFILE"
	case a.MaxConnections < 0:
		l.source = "off"
	default:
		l.source = "none: the file limit is unknown"
	}
	return l
}

// Start applies the connection limit, makes this config's logger the one
// connection lines go through, and runs the sweeps.
func (a *App) Start() error {
	running.mu.Lock()
	running.apps = append(running.apps, a)
	a.apply()
	running.mu.Unlock()
	shown := a.limit.max
	if shown == 0 {
		shown = -1 // no limit, as the config spells it: 0 there means the default
	}
	fields := []zap.Field{zap.Int("max_connections", shown), zap.String("source", a.limit.source)}
	if a.limit.nofile > 0 {
		fields = append(fields, zap.Uint64("rlimit_nofile", a.limit.nofile))
	}
	a.logger.Info("connection limit", fields...)
	if derived := layer4chain.ConnectionLimitForFiles(a.limit.nofile); a.limit.nofile > 0 && derived > 0 &&
		(a.limit.max == 0 || a.limit.max > derived) {
		a.logger.Warn("the connection limit lets proxied connections exhaust the file limit; "+
			"a listener whose accept fails with EMFILE stops accepting until the app rescues it, seconds later",
			append(fields, zap.Int("safe_max_connections", derived))...)
	}

	for _, start := range a.starters {
		a.stops = append(a.stops, start())
	}
	a.stop, a.stopped = make(chan struct{}), make(chan struct{})
	a.watch = listenerWatch{app: a}
	go a.sweep(time.Duration(a.SweepInterval))
	return nil
}

// running holds the started apps, oldest first. The newest one's settings
// (the connection limit, the logger) are the process's. A reload starts the
// new config's app before it stops the old one; a load that fails stops the
// new app while the old config goes on. So stopping the newest app hands
// the process back to the one started before it, and a rejected config
// leaves nothing of itself behind.
var running struct {
	mu   sync.Mutex
	apps []*App
}

// apply makes this app's settings the process's. running.mu must be held.
func (a *App) apply() {
	a.tracker.MaxConnections.Store(int64(a.limit.max))
	appLogger.Store(a.logger)
}

// retire removes the app from the running ones; if it was the newest, the
// one before it (if any) takes over, else lines go back to Caddy's default
// log rather than to outputs this config is about to close.
func (a *App) retire() {
	running.mu.Lock()
	defer running.mu.Unlock()
	i := slices.Index(running.apps, a)
	if i < 0 {
		return
	}
	running.apps = slices.Delete(running.apps, i, i+1)
	if i < len(running.apps) {
		return // a newer app runs the process
	}
	if n := len(running.apps); n > 0 {
		running.apps[n-1].apply()
		return
	}
	appLogger.CompareAndSwap(a.logger, nil)
}

func (a *App) sweep(interval time.Duration) {
	defer close(a.stopped)
	// A reload starts a new ticker: sweep at once if one is due, so that
	// reloads more frequent than the interval cannot starve the sweep.
	if now := time.Now(); now.Sub(a.tracker.LastSweep()) >= interval {
		a.tracker.Sweep(now)
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-a.stop:
			return
		case now := <-tick.C:
			a.tracker.Sweep(now)
			a.watch.check(now)
		}
	}
}

// Stop ends the sweeps. When the process is exiting it also drains: it
// stops the layer4 listeners at once, waits up to ShutdownGrace for
// connections to end, then closes the rest. On a reload it returns at once,
// leaving connections to the handlers that accepted them.
func (a *App) Stop() error {
	for _, stop := range a.stops {
		stop()
	}
	a.stops = nil
	if a.stop != nil {
		close(a.stop)
		<-a.stopped
		a.stop = nil
	}
	a.watch.stop()
	// On exit the drain's lines still go through this app's logger, so it
	// retires last.
	defer a.retire()
	if !caddy.Exiting() {
		return nil
	}
	a.tracker.StopAdmitting()
	grace := time.Duration(a.ShutdownGrace)
	unbound, err := a.unbind()
	if err != nil {
		a.logger.Warn("could not stop the layer4 listeners; they stay open until the layer4 app stops", zap.Error(err))
	}
	// Caddy may have stopped the layer4 app (closing its listeners) before
	// this one: then there is nothing left to stop.
	a.logger.Info("draining connections", zap.Int("connections", a.tracker.Len()),
		zap.Duration("grace", grace), zap.Int("listeners_stopped_by_drain", unbound))
	if closed := a.tracker.Drain(grace, drainWait); closed > 0 {
		a.logger.Warn("closed connections still open after the shutdown grace",
			zap.Int("connections", closed), zap.String("close_reason", string(layer4chain.ReasonShutdown)))
	}
	return nil
}

// Cleanup gives back the app's reference to the tracer provider: the last
// app with tracing to be unloaded flushes and shuts it down. Caddy calls it
// after Stop, and when Provision failed.
func (a *App) Cleanup() error {
	if a.tracer == nil {
		return nil
	}
	a.tracer = nil
	return releaseTracer()
}

// unbind stops the listening sockets of the layer4 app, so that, whatever
// order Caddy stops its apps in, a drain never accepts a connection only to
// refuse it: with SO_REUSEPORT a replacement process on the same port gets
// every new connection, and without one new connections are refused.
func (a *App) unbind() (int, error) {
	l4 := a.layer4()
	if l4 == nil {
		return 0, nil // no layer4 app, no listeners
	}
	addrs, err := listenAddrs(l4)
	if err != nil {
		return 0, err
	}
	return layer4chain.ShutdownListeners(listensOn(addrs))
}

// listensOn says whether a socket bound to local serves one of addrs.
func listensOn(addrs []caddy.NetworkAddress) func(local netip.AddrPort) bool {
	return func(local netip.AddrPort) bool {
		return slices.ContainsFunc(addrs, func(na caddy.NetworkAddress) bool { return matchesListenAddr(na, local) })
	}
}

// layer4 returns this config's layer4 app, nil if it has none.
func (a *App) layer4() *layer4.App {
	app, err := a.ctx.AppIfConfigured("layer4")
	if err != nil {
		return nil
	}
	l4, _ := app.(*layer4.App)
	return l4
}

// listenAddrs returns the stream listen addresses of every layer4 server,
// placeholders replaced as caddy-l4 replaces them.
func listenAddrs(l4 *layer4.App) ([]caddy.NetworkAddress, error) {
	var out []caddy.NetworkAddress
	for _, name := range slices.Sorted(maps.Keys(l4.Servers)) {
		addrs, err := serverListenAddrs(name, l4.Servers[name])
		if err != nil {
			return nil, err
		}
		out = append(out, addrs...)
	}
	return out, nil
}

// serverListenAddrs returns the stream listen addresses of one layer4
// server.
func serverListenAddrs(name string, srv *layer4.Server) ([]caddy.NetworkAddress, error) {
	repl := caddy.NewReplacer()
	var out []caddy.NetworkAddress
	for _, s := range srv.Listen {
		na, err := caddy.ParseNetworkAddress(repl.ReplaceAll(s, ""))
		if err != nil {
			return nil, fmt.Errorf("layer4 server %s: %w", name, err)
		}
		if n := na.Network; n != "" && !strings.HasPrefix(n, "tcp") {
			continue // datagram, unix and fd listeners
		}
		out = append(out, na)
	}
	return out, nil
}

// matchesListenAddr says whether a socket bound to local serves the listen
// address na: same port range, and the same IP unless na's host is empty
// (all addresses) or a name.
func matchesListenAddr(na caddy.NetworkAddress, local netip.AddrPort) bool {
	if p := uint(local.Port()); p < na.StartPort || p > max(na.EndPort, na.StartPort) {
		return false
	}
	ip, err := netip.ParseAddr(na.Host)
	if err != nil || ip.IsUnspecified() {
		return true
	}
	return ip.Unmap() == local.Addr().Unmap()
}

// connectionLimitMetric is the process's connection limit as the metric
// reports it: +Inf when there is none.
func connectionLimitMetric(max int64) float64 {
	if max <= 0 {
		return math.Inf(1)
	}
	return float64(max)
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
