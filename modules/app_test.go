package modules

import (
	"net"
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
