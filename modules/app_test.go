package modules

import (
	"net"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// TestRejectedConfigLeavesTheRunningLimitAndLogger loads a config whose
// start fails (its second listener's port is taken) over a running one.
// Caddy starts apps in map order, so in about half the attempts this app's
// Start runs before the failure; either way the running config's limit and
// logger must be the ones in force afterwards.
func TestRejectedConfigLeavesTheRunningLimitAndLogger(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0") // no SO_REUSEPORT: Caddy cannot share it
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	good := caddyConfigWith(map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})},
		"", map[string]any{"max_connections": 80})
	bad := caddyConfigWith(map[string]any{
		"hop":   server(addr, map[string]any{"upstreams": upstreams(backend.Addr)}),
		"taken": server(taken.Addr().String(), map[string]any{"upstreams": upstreams(backend.Addr)}),
	}, "", map[string]any{"max_connections": 3})
	if err := caddy.Load(good, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	logger := appLogger.Load()
	for i := 0; i < 12; i++ {
		if err := caddy.Load(bad, true); err == nil {
			t.Fatal("a config with a taken port loaded")
		}
		if got := processTracker().MaxConnections.Load(); got != 80 {
			t.Fatalf("attempt %d: the rejected config left the process limit at %d, want the running 80", i, got)
		}
		if appLogger.Load() != logger {
			t.Fatalf("attempt %d: the rejected config changed the logger connection lines go through", i)
		}
	}
	roundTrip(t, chaintest.Dial(t, addr), "still serving")
}

// A bad value in the app's config is named by its path, also when it fails
// in its own decoder (a duration) rather than in the app's checks.
func TestBadAppConfigFailsNamingTheField(t *testing.T) {
	for _, tc := range []struct {
		app  map[string]any
		want string
	}{
		{map[string]any{"sweep_interval": "1 s"}, `sweep_interval: time: unknown unit " s" in duration "1 s"`},
		{map[string]any{"shutdown_grace": "soon"}, `shutdown_grace: time: invalid duration "soon"`},
		{map[string]any{"max_connections": "100"}, "max_connections: want a whole number, got a JSON string"},
		{map[string]any{"tracing": map[string]any{"sample_ratio": "all"}}, "tracing.sample_ratio: want a number, got a JSON string"},
		{map[string]any{"sweep_intervall": "1s"}, `unknown field "sweep_intervall"`},
		{map[string]any{"tracing": map[string]any{"sampler": "always"}}, `tracing: json: unknown field "sampler"`},
	} {
		err := caddy.Load(caddyConfigWith(map[string]any{}, "", tc.app), true)
		if err == nil {
			_ = caddy.Stop()
			t.Fatalf("app %v loaded", tc.app)
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("app %v: %v, want it to say %q", tc.app, err, tc.want)
		}
	}
}
