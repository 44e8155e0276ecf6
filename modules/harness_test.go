package modules

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/metrics"
	_ "github.com/mholt/caddy-l4"
	"go.uber.org/goleak"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

// TestMain loads and stops one config before the tests, so goroutines that
// Caddy starts once per process exist before any test takes its goroutine
// baseline.
func TestMain(m *testing.M) {
	if err := caddy.Load(caddyConfig(map[string]any{}), true); err != nil {
		panic(err)
	}
	if err := caddy.Stop(); err != nil {
		panic(err)
	}
	os.Exit(m.Run())
}

// caddyConfig wraps layer4 servers in a config with no admin endpoint, no
// persisted config and logs discarded.
func caddyConfig(servers map[string]any) []byte { return caddyConfigWith(servers, "", nil) }

// caddyConfigWith is caddyConfig with an admin endpoint on adminAddr (none
// if empty) and an apps.layer4chain config (none if nil).
func caddyConfigWith(servers map[string]any, adminAddr string, app map[string]any) []byte {
	admin := map[string]any{"disabled": true, "config": map[string]any{"persist": false}}
	if adminAddr != "" {
		admin = map[string]any{"listen": adminAddr, "config": map[string]any{"persist": false}}
	}
	apps := map[string]any{"layer4": map[string]any{"servers": servers}}
	if app != nil {
		apps["layer4chain"] = app
	}
	cfg := map[string]any{
		"admin":   admin,
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"writer": map[string]any{"output": "discard"}}}},
		"apps":    apps,
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		panic(err)
	}
	return b
}

// server is a layer4 server listening on addr whose only route is handler.
func server(addr string, handler map[string]any) map[string]any {
	handler["handler"] = "chain"
	return map[string]any{
		"listen": []string{addr},
		"routes": []any{map[string]any{"handle": []any{handler}}},
	}
}

// upstreams is the JSON form of a list of dial addresses.
func upstreams(addrs ...string) []any {
	out := make([]any, len(addrs))
	for i, a := range addrs {
		out[i] = map[string]any{"dial": []string{a}}
	}
	return out
}

// startCaddy runs Caddy in-process with the given layer4 servers until the
// test ends.
func startCaddy(t *testing.T, servers map[string]any) {
	t.Helper()
	if err := caddy.Load(caddyConfig(servers), true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
}

// checkLeaks takes a baseline now and, when the test ends (after every
// cleanup registered later, so it is called first in a test), asserts that tracked records, goroutines and open file
// descriptors are back to it.
func checkLeaks(t *testing.T) {
	t.Helper()
	goroutines := []goleak.Option{goleak.IgnoreCurrent(),
		goleak.IgnoreAnyFunction("github.com/layer4chain/caddy-layer4chain/layer4chain.(*parker).run")}
	fds := openFDs(t)
	t.Cleanup(func() {
		tr := processTracker()
		select {
		case <-tr.Empty():
		case <-time.After(5 * time.Second):
			t.Errorf("records left after the test: %d", tr.Len())
			for _, r := range tr.Records() {
				t.Errorf("  %+v", r.Info())
			}
		}
		for _, s := range layer4chain.States {
			if n := tr.CountInState(s); n != 0 {
				t.Errorf("state %s counts %d records after the test", s, n)
			}
		}
		goleak.VerifyNone(t, goroutines...)
		if now := openFDs(t); now > fds {
			t.Errorf("open file descriptors: %d after the test, %d before", now, fds)
			entries, _ := os.ReadDir("/proc/self/fd")
			for _, e := range entries {
				l, _ := os.Readlink("/proc/self/fd/" + e.Name())
				t.Logf("fd %s -> %s", e.Name(), l)
			}
		}
	})
}

func openFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("counting file descriptors: %v", err)
	}
	n := 0
	for _, e := range entries {
		// Epoll instances are process-wide and open on first use: the
		// runtime's poller and the engine's parker (a connection quiet for
		// a second parks its upstream direction there).
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l != "anon_inode:[eventpoll]" {
			n++
		}
	}
	return n
}

// assertLoadError loads a config that must fail and checks the error
// mentions want.
func assertLoadError(t *testing.T, handler map[string]any, want string) {
	t.Helper()
	err := caddy.Load(caddyConfig(map[string]any{"s": server("127.0.0.1:0", handler)}), true)
	if err == nil {
		_ = caddy.Stop()
		t.Fatalf("config %v loaded, want an error mentioning %q", handler, want)
	}
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not mention %q", err, want)
	}
}
