package modules

import (
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
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
	// a limit that no deadline enforced, and reaps zombie records (which
	// must never exist). Default: 1s.
	SweepInterval caddy.Duration `json:"sweep_interval,omitempty"`

	// ShutdownGrace is how long the process waits, when it shuts down
	// (`caddy stop`, SIGTERM), for connections to end by themselves before
	// it closes the rest with reason shutdown. New connections are refused
	// while it waits. A config reload is never a shutdown. Default: 30s.
	ShutdownGrace caddy.Duration `json:"shutdown_grace,omitempty"`

	// MaxConnections caps the connections of all `chain` handlers of the
	// process together; more are closed at once (reason limit_exceeded).
	// Default: 0, no limit.
	MaxConnections int `json:"max_connections,omitempty"`

	tracker *layer4chain.Tracker
	logger  *zap.Logger
	stop    chan struct{}
	stopped chan struct{}
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4chain",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision fills defaults, applies the limits to the tracker and registers
// the metrics in this config's registry.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.SweepInterval < 0 {
		return fmt.Errorf("sweep_interval: must not be negative, got %s", time.Duration(a.SweepInterval))
	}
	if a.ShutdownGrace < 0 {
		return fmt.Errorf("shutdown_grace: must not be negative, got %s", time.Duration(a.ShutdownGrace))
	}
	if a.MaxConnections < 0 {
		return fmt.Errorf("max_connections: must not be negative, got %d", a.MaxConnections)
	}
	if a.SweepInterval == 0 {
		a.SweepInterval = caddy.Duration(defaultSweepInterval)
	}
	if a.ShutdownGrace == 0 {
		a.ShutdownGrace = caddy.Duration(defaultShutdownGrace)
	}
	a.tracker = processTracker()
	a.tracker.MaxConnections.Store(int64(a.MaxConnections))
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	return nil
}

// Start runs the sweeps.
func (a *App) Start() error {
	a.stop, a.stopped = make(chan struct{}), make(chan struct{})
	go a.sweep(time.Duration(a.SweepInterval))
	return nil
}

func (a *App) sweep(interval time.Duration) {
	defer close(a.stopped)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-a.stop:
			return
		case now := <-tick.C:
			a.tracker.Sweep(now)
		}
	}
}

// Stop ends the sweeps. When the process is exiting it also drains: it
// waits up to ShutdownGrace for connections to end, then closes the rest.
// On a reload it returns at once, leaving connections to the handlers that
// accepted them.
func (a *App) Stop() error {
	if a.stop != nil {
		close(a.stop)
		<-a.stopped
		a.stop = nil
	}
	if !caddy.Exiting() {
		return nil
	}
	grace := time.Duration(a.ShutdownGrace)
	a.logger.Info("draining connections", zap.Int("connections", a.tracker.Len()), zap.Duration("grace", grace))
	if closed := a.tracker.Drain(grace, drainWait); closed > 0 {
		a.logger.Warn("closed connections still open after the shutdown grace",
			zap.Int("connections", closed), zap.String("reason", string(layer4chain.ReasonShutdown)))
	}
	return nil
}

// Interface guards
var (
	_ caddy.App         = (*App)(nil)
	_ caddy.Provisioner = (*App)(nil)
)
