package modules

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// configLoggingTo is a config whose layer4chain lines go to a log file of
// their own (and not to the default log), as the Caddyfile's
// `log lc { output file chain.log; include layer4chain }` makes it.
func configLoggingTo(t *testing.T, file string, servers map[string]any, app map[string]any) []byte {
	t.Helper()
	apps := map[string]any{"layer4": map[string]any{"servers": servers}}
	if app != nil {
		apps["layer4chain"] = app
	}
	b, err := json.Marshal(map[string]any{
		"admin": map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{
			"default": map[string]any{"writer": map[string]any{"output": "discard"}, "exclude": []string{"layer4chain"}},
			"lc": map[string]any{
				"writer":  map[string]any{"output": "file", "filename": file},
				"encoder": map[string]any{"format": "json"},
				"include": []string{"layer4chain"},
			},
		}},
		"apps": apps,
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// logLines returns the lines of file with the given message.
func logLines(t *testing.T, file, msg string) []string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, `"msg":"`+msg+`"`) {
			out = append(out, l)
		}
	}
	return out
}

// waitLogLines waits until file has n lines with msg: a line is written
// just after the record is removed.
func waitLogLines(t *testing.T, file, msg string, n int) []string {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		lines := logLines(t, file, msg)
		if len(lines) >= n || time.Now().After(deadline) {
			return lines
		}
		time.Sleep(10 * time.Millisecond) // polling a file: no event to wait on
	}
}

// TestConnectionLinesGoWhereTheLoggingConfigSendsThem has no goroutine and
// fd check: Caddy's file log writer keeps its file and a goroutine after
// its config is gone. The records are checked by waitEmpty.
func TestConnectionLinesGoWhereTheLoggingConfigSendsThem(t *testing.T) {
	dir := t.TempDir()
	first, second := filepath.Join(dir, "first.log"), filepath.Join(dir, "second.log")
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	servers := map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})}
	if err := caddy.Load(configLoggingTo(t, first, servers, nil), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Load a config that logs nowhere, so the tests after this one
		// do not write to its files.
		if err := caddy.Load(caddyConfig(map[string]any{}), true); err != nil {
			t.Error(err)
		}
		_ = caddy.Stop()
	})

	for _, msg := range []string{"one", "two", "three"} {
		c := chaintest.Dial(t, addr)
		roundTrip(t, c, msg)
		c.Close()
	}
	waitEmpty(t)
	if lines := waitLogLines(t, first, "connection closed", 3); len(lines) != 3 {
		t.Fatalf("%d connection lines in the routed log, want 3:\n%s", len(lines), strings.Join(lines, "\n"))
	}

	// A connection accepted under this config and closed after a reload to
	// a config that logs elsewhere: its line follows the latest config.
	held := chaintest.Dial(t, addr)
	roundTrip(t, held, "across the reload")
	if err := caddy.Load(configLoggingTo(t, second, servers, map[string]any{"sweep_interval": "2s"}), true); err != nil {
		t.Fatal(err)
	}
	held.Close()
	waitEmpty(t)
	if lines := waitLogLines(t, second, "connection closed", 1); len(lines) != 1 {
		t.Fatalf("%d lines in the new config's log for the connection it inherited, want 1", len(lines))
	}
	if lines := logLines(t, first, "connection closed"); len(lines) != 3 {
		t.Fatalf("the old config's log got %d lines, want the 3 from before the reload", len(lines))
	}
}

// TestRefusalsAreLoggedAndKeepTheCountsBalanced floods a handler whose
// max_connections is full: every refusal is logged with the limit that
// refused it, or counted in a `suppressed` field of a later line, and
// connections_total = active + closed holds at every scrape of /metrics
// during the flood.
func TestRefusalsAreLoggedAndKeepTheCountsBalanced(t *testing.T) {
	file := filepath.Join(t.TempDir(), "chain.log")
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	servers := map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr), "max_connections": 1})}
	reportSuppressedRefusals() // what earlier tests left out is not ours to count
	if err := caddy.Load(configLoggingTo(t, file, servers, map[string]any{"sweep_interval": "50ms"}), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := caddy.Load(caddyConfig(map[string]any{}), true); err != nil {
			t.Error(err)
		}
		_ = caddy.Stop()
	})
	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg); err != nil {
		t.Fatal(err)
	}

	held := chaintest.Dial(t, addr)
	roundTrip(t, held, "holding the only place")
	before := closedCount(layer4chain.ReasonLimitExceeded)
	const flood = 200
	scrapes := make(chan error, 1)
	stop := make(chan struct{})
	go func() {
		for n := 0; ; n++ {
			select {
			case <-stop:
				scrapes <- nil
				return
			default:
			}
			if err := checkArrivalsBalance(reg); err != nil {
				scrapes <- fmt.Errorf("scrape %d: %w", n, err)
				return
			}
		}
	}()
	for i := 0; i < flood; i++ {
		c := chaintest.Dial(t, addr)
		if got, _, _ := chaintest.ReadUntilClosed(c, 3*time.Second); len(got) != 0 {
			t.Fatalf("refused connection got %q", got)
		}
		c.Close()
	}
	waitClosedCount(t, layer4chain.ReasonLimitExceeded, before+flood)
	close(stop)
	if err := <-scrapes; err != nil {
		t.Fatal(err)
	}

	// Every refusal is a line of its own or counted in a later one.
	deadline := time.Now().Add(3 * time.Second)
	for {
		logged, suppressed := 0, 0
		for _, l := range append(logLines(t, file, "connection refused"), logLines(t, file, "refused connections not logged one by one")...) {
			var line struct {
				Reason, Detail string
				Suppressed     int
			}
			if err := json.Unmarshal([]byte(l), &line); err != nil {
				t.Fatal(err)
			}
			if line.Detail != "" {
				logged++
				if line.Reason != "limit_exceeded" || !strings.Contains(line.Detail, "the handler's max_connections (1) is reached") {
					t.Fatalf("refusal line without its limit: %s", l)
				}
			}
			suppressed += line.Suppressed
		}
		if logged+suppressed == flood && logged < flood {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d refusals logged and %d counted as left out, want %d together (and some left out)", logged, suppressed, flood)
		}
		time.Sleep(20 * time.Millisecond) // polling a file for the next sweep's line
	}
	held.Close()
	waitEmpty(t)
}

// checkArrivalsBalance gathers the tracker's metrics and checks
// connections_total = sum(connections_active) + sum(connections_closed_total).
func checkArrivalsBalance(reg *prometheus.Registry) error {
	families, err := reg.Gather()
	if err != nil {
		return err
	}
	sums := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			if c := m.GetCounter(); c != nil {
				sums[f.GetName()] += c.GetValue()
			} else if g := m.GetGauge(); g != nil {
				sums[f.GetName()] += g.GetValue()
			}
		}
	}
	total := sums[namespace+"_connections_total"]
	active, closed := sums[namespace+"_connections_active"], sums[namespace+"_connections_closed_total"]
	if total != active+closed {
		return fmt.Errorf("connections_total %v != active %v + closed %v", total, active, closed)
	}
	return nil
}

// TestAllowCertificatesWithoutTLSWarnsOnce: a handler that can only trust
// by certificate, with no tls handler before it, says so (once) instead of
// silently trusting nobody.
func TestAllowCertificatesWithoutTLSWarnsOnce(t *testing.T) {
	file := filepath.Join(t.TempDir(), "chain.log")
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	servers := map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr),
		"accept_proxy_protocol": map[string]any{"allow_certificates": []string{"outer.chain.test"}}})}
	if err := caddy.Load(configLoggingTo(t, file, servers, nil), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := caddy.Load(caddyConfig(map[string]any{}), true); err != nil {
			t.Error(err)
		}
		_ = caddy.Stop()
	})
	for i := 0; i < 2; i++ {
		c := chaintest.Dial(t, addr)
		roundTrip(t, c, "direct client")
		c.Close()
	}
	waitEmpty(t)
	const msg = "accept_proxy_protocol.allow_certificates trusts nobody here: no tls handler terminated TLS before chain, so no peer has a verified certificate; put caddy-l4's tls handler with client_auth before chain in the route"
	if lines := waitLogLines(t, file, msg, 1); len(lines) != 1 {
		t.Fatalf("%d warnings about allow_certificates without TLS, want exactly 1", len(lines))
	}
}
