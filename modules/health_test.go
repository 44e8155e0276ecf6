package modules

import (
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// upstreams GETs /layer4chain/upstreams.
func (a *adminClient) upstreams() []layer4chain.UpstreamInfo {
	a.t.Helper()
	var list []layer4chain.UpstreamInfo
	a.getJSON("/layer4chain/upstreams", &list)
	return list
}

// upstreamInfo returns the entry of addr in list, failing the test when
// there is none.
func upstreamInfo(t *testing.T, list []layer4chain.UpstreamInfo, addr string) layer4chain.UpstreamInfo {
	t.Helper()
	for _, u := range list {
		if u.Address == addr {
			return u
		}
	}
	t.Fatalf("upstream %s not listed in %+v", addr, list)
	return layer4chain.UpstreamInfo{}
}

// hasSeries says whether /metrics has a series that starts with prefix.
func (a *adminClient) hasSeries(prefix string) bool {
	a.t.Helper()
	status, body := a.do(http.MethodGet, "/metrics")
	if status != http.StatusOK {
		a.t.Fatalf("GET /metrics: %d", status)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, prefix) {
			return true
		}
	}
	return false
}

// breakerServers is a layer4 server on addr whose chain handler has the
// circuit breaker on (one failure opens it for an hour, so it stays open
// for the whole test) and the given upstreams, tried in order.
func breakerServers(addr, idle string, ups ...string) map[string]any {
	return map[string]any{"hop": server(addr, map[string]any{
		"upstreams":     upstreams(ups...),
		"idle_timeout":  idle,
		"health_checks": map[string]any{"passive": map[string]any{"fail_duration": "1h"}},
	})}
}

// TestReloadKeepsAnOpenCircuitAndReleasesARemovedUpstream: the health of
// an upstream belongs to its address across reloads (a new config does not
// dial an upstream the old one found dead), and a config that no longer
// lists an address leaves nothing of it behind: not in the admin API, not
// in the per-upstream gauges.
func TestReloadKeepsAnOpenCircuitAndReleasesARemovedUpstream(t *testing.T) {
	checkLeaks(t)
	live := chaintest.NewEchoBackend(t)
	dead := chaintest.RefusedAddr(t)
	addr := chaintest.FreeAddr(t)
	admin := startCaddyWithAdmin(t, breakerServers(addr, "1h", dead, live.Addr), nil)
	adminAddr := strings.TrimPrefix(admin.base, "http://")
	failedBefore := admin.metric(`caddy_layer4chain_dial_duration_seconds_count{outcome="failed"}`)
	okBefore := admin.metric(`caddy_layer4chain_dial_duration_seconds_count{outcome="ok"}`)
	// Before any connection, each listed upstream's labelled series are
	// there at 0 (admin.metric fails on a missing one): an alert on their
	// rate sees them from the start.
	for _, u := range []string{dead, live.Addr} {
		for _, r := range layer4chain.DialFailureReasons {
			if got := admin.metric(`caddy_layer4chain_dial_failures_total{reason="` + string(r) + `",upstream="` + u + `"}`); got != 0 {
				t.Fatalf("dial_failures_total %s of %s before any dial: %v", r, u, got)
			}
		}
		for _, h := range layer4chain.Healths {
			if got := admin.metric(`caddy_layer4chain_circuit_transitions_total{to="` + string(h) + `",upstream="` + u + `"}`); got != 0 {
				t.Fatalf("circuit_transitions_total to %s of %s before any dial: %v", h, u, got)
			}
		}
	}

	c := chaintest.Dial(t, addr)
	roundTrip(t, c, "failed over to the live upstream")
	c.Close()

	list := admin.upstreams()
	if len(list) != 2 || list[0].Address > list[1].Address {
		t.Fatalf("upstreams %+v: want both, sorted by address", list)
	}
	d := upstreamInfo(t, list, dead)
	if d.Health != layer4chain.HealthOpen || d.ConsecutiveFailures != 1 ||
		!strings.Contains(d.LastError, "refused") || d.LastErrorAt == nil {
		t.Fatalf("dead upstream after one refused dial: %+v; want open, 1 failure, the refusal and its time", d)
	}
	if l := upstreamInfo(t, list, live.Addr); l.Health != layer4chain.HealthHealthy || l.ConsecutiveFailures != 0 {
		t.Fatalf("live upstream: %+v", l)
	}
	for series, want := range map[string]float64{
		`caddy_layer4chain_upstream_healthy{upstream="` + dead + `"}`:                             0,
		`caddy_layer4chain_upstream_healthy{upstream="` + live.Addr + `"}`:                        1,
		`caddy_layer4chain_circuit_transitions_total{to="open",upstream="` + dead + `"}`:          1,
		`caddy_layer4chain_dial_failures_total{reason="connect_refused",upstream="` + dead + `"}`: 1,
		`caddy_layer4chain_dial_duration_seconds_count{outcome="failed"}`:                         failedBefore + 1,
		`caddy_layer4chain_dial_duration_seconds_count{outcome="ok"}`:                             okBefore + 1,
	} {
		if got := admin.metric(series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}

	// A reload that keeps both upstreams keeps the circuit open: the next
	// client goes straight to the live upstream, without a second dial of
	// the dead one.
	admin.load(caddyConfigWith(breakerServers(addr, "2h", dead, live.Addr), adminAddr, nil))
	if h := upstreamInfo(t, admin.upstreams(), dead).Health; h != layer4chain.HealthOpen {
		t.Fatalf("dead upstream after a reload: %s, want open", h)
	}
	c = chaintest.Dial(t, addr)
	roundTrip(t, c, "straight to the live upstream")
	c.Close()
	if got := admin.metric(`caddy_layer4chain_dial_failures_total{reason="connect_refused",upstream="` + dead + `"}`); got != 1 {
		t.Fatalf("the dead upstream was dialed again after the reload: %v refused dials", got)
	}

	// A config without the dead upstream releases it.
	admin.load(caddyConfigWith(breakerServers(addr, "2h", live.Addr), adminAddr, nil))
	list = admin.upstreams()
	if len(list) != 1 || list[0].Address != live.Addr {
		t.Fatalf("upstreams after the dead one left the config: %+v", list)
	}
	if admin.hasSeries(`caddy_layer4chain_upstream_healthy{upstream="` + dead + `"}`) {
		t.Fatalf("upstream_healthy still reports %s after it left the config", dead)
	}
	// The counter keeps its history, as counters do.
	if got := admin.metric(`caddy_layer4chain_circuit_transitions_total{to="open",upstream="` + dead + `"}`); got != 1 {
		t.Fatalf("circuit_transitions_total for %s: %v after it left, want 1", dead, got)
	}
}

// TestUpstreamsListsEachAddressOnceWithItsConnections: two handlers that
// dial the same address share one entry (the health is the address's);
// the fields are the documented ones; other methods are refused.
func TestUpstreamsListsEachAddressOnceWithItsConnections(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	other := chaintest.RefusedAddr(t)
	a1, a2 := chaintest.FreeAddr(t), chaintest.FreeAddr(t)
	admin := startCaddyWithAdmin(t, map[string]any{
		"one": server(a1, map[string]any{"upstreams": upstreams(backend.Addr)}),
		"two": server(a2, map[string]any{"upstreams": upstreams("tcp/"+backend.Addr, other)}),
	}, nil)
	c := chaintest.Dial(t, a1)
	defer c.Close()
	roundTrip(t, c, "held open")

	status, body := admin.do(http.MethodGet, "/layer4chain/upstreams")
	if status != http.StatusOK {
		t.Fatalf("GET /layer4chain/upstreams: %d %s", status, body)
	}
	var raw []map[string]any
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatalf("decoding %s: %v", body, err)
	}
	var addrs []string
	for _, u := range raw {
		addrs = append(addrs, u["address"].(string))
		var keys []string
		for k := range u {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		if want := "active_connections,address,consecutive_failures,health"; strings.Join(keys, ",") != want {
			t.Errorf("upstream %v has fields %v, want %s (no last_error before any error)", u["address"], keys, want)
		}
	}
	if want := []string{backend.Addr, other}; !slices.IsSorted(addrs) || len(addrs) != 2 || !slices.Contains(addrs, want[0]) || !slices.Contains(addrs, want[1]) {
		t.Fatalf("addresses %v, want %v once each, sorted", addrs, want)
	}
	if b := upstreamInfo(t, admin.upstreams(), backend.Addr); b.ActiveConnections != 1 || b.Health != layer4chain.HealthHealthy {
		t.Fatalf("backend with one open connection: %+v", b)
	}
	if got := admin.metric(`caddy_layer4chain_upstream_active_connections{upstream="` + backend.Addr + `"}`); got != 1 {
		t.Fatalf("upstream_active_connections = %v, want 1", got)
	}
	if status, body := admin.do(http.MethodPost, "/layer4chain/upstreams"); status != http.StatusMethodNotAllowed || !strings.Contains(string(body), `"error"`) {
		t.Fatalf("POST /layer4chain/upstreams: %d %s, want 405 with a JSON error", status, body)
	}
}

// TestPassiveCloseIfUnhealthyClosesTheConnectionsOfAnOpenedCircuit: the
// upstream stops accepting while a connection to it is established; the
// next client's refused dial opens the circuit, and the established
// connection is closed with reason upstream_unhealthy.
func TestPassiveCloseIfUnhealthyClosesTheConnectionsOfAnOpenedCircuit(t *testing.T) {
	checkLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	backendAddr := ln.Addr().String()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams": upstreams(backendAddr),
		"health_checks": map[string]any{"passive": map[string]any{
			"fail_duration": "1h", "close_if_unhealthy": true,
		}},
	})})
	before := closedCount(layer4chain.ReasonUpstreamUnhealthy)

	first := chaintest.Dial(t, addr)
	defer first.Close()
	up, ok := <-accepted
	if !ok {
		t.Fatal("the backend accepted nothing")
	}
	defer up.Close()
	if _, err := first.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := up.Read(make([]byte, 1)); err != nil {
		t.Fatalf("the upstream did not get the first client's byte: %v", err)
	}
	ln.Close() // the upstream now refuses

	second := chaintest.Dial(t, addr)
	defer second.Close()
	waitClosedCount(t, layer4chain.ReasonUpstreamUnhealthy, before+1)
	if _, _, err := chaintest.ReadUntilClosed(first, 3*time.Second); err != nil {
		t.Fatalf("first client after its upstream's circuit opened: %v", err)
	}
	if closedCount(layer4chain.ReasonUpstreamUnhealthy) != before+1 {
		t.Fatalf("more than the one established connection closed as upstream_unhealthy")
	}
}

// TestHealthTransitionsAndFailedDialsAreLogged: an operator can tell from
// the log which upstream failed and when its health changed.
func TestHealthTransitionsAndFailedDialsAreLogged(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "chain.log")
	live := chaintest.NewEchoBackend(t)
	dead := chaintest.RefusedAddr(t)
	addr := chaintest.FreeAddr(t)
	loadLoggingTo(t, file, breakerServers(addr, "1h", dead, live.Addr), nil)
	c := chaintest.Dial(t, addr)
	roundTrip(t, c, "failed over")
	c.Close()
	waitEmpty(t)

	lines := waitLogLines(t, file, "upstream health changed", 1)
	if len(lines) != 1 {
		t.Fatalf("health lines: %q, want one", lines)
	}
	var tr struct{ Level, Upstream, From, To, Cause string }
	if err := json.Unmarshal([]byte(lines[0]), &tr); err != nil {
		t.Fatal(err)
	}
	if tr.Level != "warn" || tr.Upstream != dead || tr.From != "healthy" || tr.To != "open" || !strings.Contains(tr.Cause, "refused") {
		t.Fatalf("health line %s", lines[0])
	}

	lines = waitLogLines(t, file, "connection closed", 1)
	if len(lines) != 1 {
		t.Fatalf("access lines: %q, want one", lines)
	}
	var access struct {
		Upstream    string
		FailedDials []struct {
			Upstream, Reason, Error string
			Duration                int64 `json:"duration_ns"`
		} `json:"failed_dials"`
	}
	if err := json.Unmarshal([]byte(lines[0]), &access); err != nil {
		t.Fatal(err)
	}
	if access.Upstream != live.Addr || len(access.FailedDials) != 1 {
		t.Fatalf("access line %s: want the live upstream and one failed dial", lines[0])
	}
	if f := access.FailedDials[0]; f.Upstream != dead || f.Reason != "connect_refused" || !strings.Contains(f.Error, "refused") || f.Duration <= 0 {
		t.Fatalf("failed dial %+v in %s", f, lines[0])
	}
}

// upstreamCounts counts the live records by upstream.
func upstreamCounts() map[string]int {
	got := map[string]int{}
	for _, r := range processTracker().Records() {
		got[r.Info().Upstream]++
	}
	return got
}

// TestWeightsAndPerUpstreamLimitsReachTheBalancer: weighted_round_robin
// splits by the upstreams' weights, a full upstream is skipped, and with
// every upstream full a client is closed at once as no_healthy_upstream.
func TestWeightsAndPerUpstreamLimitsReachTheBalancer(t *testing.T) {
	checkLeaks(t)
	a, b := chaintest.NewEchoBackend(t), chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{
		"upstreams": []any{
			map[string]any{"dial": []string{a.Addr}, "weight": 3, "max_connections": 3},
			map[string]any{"dial": []string{b.Addr}, "max_connections": 1},
		},
		"load_balancing": map[string]any{"selection": map[string]any{"policy": "weighted_round_robin"}},
	})})
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 4 {
		c := chaintest.Dial(t, addr)
		conns = append(conns, c)
		roundTrip(t, c, "weighted")
	}
	if got := upstreamCounts(); got[a.Addr] != 3 || got[b.Addr] != 1 {
		t.Fatalf("connections by upstream %v, want 3 to the weight-3 upstream and 1 to the other", got)
	}

	// Both upstreams are now at their max_connections.
	before := closedCount(layer4chain.ReasonNoHealthyUpstream)
	c := chaintest.Dial(t, addr)
	defer c.Close()
	if _, took, err := chaintest.ReadUntilClosed(c, 3*time.Second); err != nil || took > time.Second {
		t.Fatalf("client with every upstream full: closed after %v (%v), want at once", took, err)
	}
	waitClosedCount(t, layer4chain.ReasonNoHealthyUpstream, before+1)
}

// TestActiveChecksMarkAnUpstreamDownAndEndWithTheirConfig: the first probe
// runs at once and marks a refusing upstream unhealthy; a reload to a
// config without active checks stops them (no goroutine is left) and
// withdraws their verdict, so the upstream is healthy again.
func TestActiveChecksMarkAnUpstreamDownAndEndWithTheirConfig(t *testing.T) {
	checkLeaks(t)
	live := chaintest.NewEchoBackend(t)
	dead := chaintest.RefusedAddr(t)
	addr := chaintest.FreeAddr(t)
	servers := func(active map[string]any) map[string]any {
		h := map[string]any{"upstreams": upstreams(dead, live.Addr)}
		if active != nil {
			h["health_checks"] = map[string]any{"active": active}
		}
		return map[string]any{"hop": server(addr, h)}
	}
	admin := startCaddyWithAdmin(t, servers(map[string]any{"interval": "1h", "timeout": "1s"}), nil)

	// The probe runs in the background and nothing reports its end but
	// the upstream's health, so poll the admin API for it.
	deadline := time.Now().Add(3 * time.Second)
	for upstreamInfo(t, admin.upstreams(), dead).Health != layer4chain.HealthUnhealthy {
		if time.Now().After(deadline) {
			t.Fatalf("refusing upstream not marked unhealthy by the first probe: %+v", admin.upstreams())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if h := upstreamInfo(t, admin.upstreams(), live.Addr).Health; h != layer4chain.HealthHealthy {
		t.Fatalf("live upstream: %s", h)
	}
	// An unhealthy upstream is not dialed: the client reaches the live one
	// without a refused dial.
	failures := processTracker().DialFailures(layer4chain.ReasonConnectRefused)
	c := chaintest.Dial(t, addr)
	roundTrip(t, c, "skips the unhealthy upstream")
	c.Close()
	if got := processTracker().DialFailures(layer4chain.ReasonConnectRefused); got != failures {
		t.Fatalf("the unhealthy upstream was dialed: %d refused dials, %d before", got, failures)
	}

	admin.load(caddyConfigWith(servers(nil), strings.TrimPrefix(admin.base, "http://"), nil))
	if h := upstreamInfo(t, admin.upstreams(), dead).Health; h != layer4chain.HealthHealthy {
		t.Fatalf("after a reload without active checks the upstream is %s; their verdict should end with them", h)
	}
}

// TestARejectedConfigNeitherProbesNorClosesTheRunningConnections loads, over
// a running config, one whose active checks would mark the running
// upstream down at once (their probe port is closed) with
// close_if_unhealthy, and whose start fails (a port is taken). Caddy
// starts apps in map order, so in about half the attempts the layer4chain
// app starts before the failure; the running connection must never be
// closed, and the upstream must stay healthy.
func TestARejectedConfigNeitherProbesNorClosesTheRunningConnections(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0") // no SO_REUSEPORT: Caddy cannot share it
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	_, closedPort, _ := net.SplitHostPort(chaintest.RefusedAddr(t))
	port, _ := strconv.Atoi(closedPort)
	startCaddy(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})})
	held := chaintest.Dial(t, addr)
	roundTrip(t, held, "before")

	checked := map[string]any{"upstreams": upstreams(backend.Addr), "health_checks": map[string]any{
		"active": map[string]any{"port": port, "interval": "1h", "close_if_unhealthy": true}}}
	bad := caddyConfig(map[string]any{
		"hop":   server(addr, checked),
		"taken": server(taken.Addr().String(), map[string]any{"upstreams": upstreams(backend.Addr)}),
	})
	for i := 0; i < 12; i++ {
		if err := caddy.Load(bad, true); err == nil {
			t.Fatal("a config with a taken port loaded")
		}
	}
	roundTrip(t, held, "after twelve rejected configs")
	for _, u := range pooledUpstreams() {
		if u.Addr == backend.Addr && u.Health() != layer4chain.HealthHealthy {
			t.Fatalf("the running upstream is %s after rejected configs", u.Health())
		}
	}
}

// TestCloseIfUnhealthyClosesItsOwnHandlersConnectionsOnly: two handlers
// dial one upstream; only the one with close_if_unhealthy loses its
// connection when the upstream turns unhealthy.
func TestCloseIfUnhealthyClosesItsOwnHandlersConnectionsOnly(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	_, closedPort, _ := net.SplitHostPort(chaintest.RefusedAddr(t))
	port, _ := strconv.Atoi(closedPort)
	watched, plain := chaintest.FreeAddr(t), chaintest.FreeAddr(t)
	// The checks start with the config; the first probe (on a closed port)
	// marks the upstream down, so connections are made before the load.
	startCaddy(t, map[string]any{
		"plain": server(plain, map[string]any{"upstreams": upstreams(backend.Addr)}),
	})
	keep := chaintest.Dial(t, plain)
	roundTrip(t, keep, "plain")
	before := closedCount(layer4chain.ReasonUpstreamUnhealthy)
	if err := caddy.Load(caddyConfig(map[string]any{
		"plain": server(plain, map[string]any{"upstreams": upstreams(backend.Addr)}),
		"watched": server(watched, map[string]any{"upstreams": upstreams(backend.Addr), "health_checks": map[string]any{
			"active": map[string]any{"port": port, "interval": "1h", "close_if_unhealthy": true}}}),
	}), true); err != nil {
		t.Fatal(err)
	}
	waitUpstreamHealth(t, backend.Addr, layer4chain.HealthUnhealthy)
	roundTrip(t, keep, "another handler's connection stays")
	if n := closedCount(layer4chain.ReasonUpstreamUnhealthy); n != before {
		t.Fatalf("%d connections of a handler without close_if_unhealthy were closed", n-before)
	}
	keep.Close()
}

// waitUpstreamHealth polls the pool until addr has health h: a probe's end
// raises no event.
func waitUpstreamHealth(t *testing.T, addr string, h layer4chain.Health) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		for _, u := range pooledUpstreams() {
			if u.Addr == addr && u.Health() == h {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("upstream %s never became %s", addr, h)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReloadWithoutTheBreakerClosesItsCircuit: a reload to a config that
// no longer has fail_duration leaves no handler to run the open circuit's
// trial; without a connection it would stay open (upstream_healthy 0,
// alerts firing) for an upstream nothing holds back. It closes with the
// old config.
func TestReloadWithoutTheBreakerClosesItsCircuit(t *testing.T) {
	checkLeaks(t)
	live, dead, addr := chaintest.NewEchoBackend(t), chaintest.RefusedAddr(t), chaintest.FreeAddr(t)
	admin := startCaddyWithAdmin(t, breakerServers(addr, "1h", dead, live.Addr), nil)
	c := chaintest.Dial(t, addr)
	roundTrip(t, c, "failed over to the live upstream")
	c.Close()
	if h := upstreamInfo(t, admin.upstreams(), dead).Health; h != layer4chain.HealthOpen {
		t.Fatalf("dead upstream after a refused dial: %s, want open", h)
	}

	noBreaker := map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(dead, live.Addr), "idle_timeout": "1h"})}
	admin.load(caddyConfigWith(noBreaker, strings.TrimPrefix(admin.base, "http://"), nil))
	if h := upstreamInfo(t, admin.upstreams(), dead).Health; h != layer4chain.HealthHealthy {
		t.Fatalf("upstream after a reload that dropped fail_duration: %s, want healthy", h)
	}
	if got := admin.metric(`caddy_layer4chain_upstream_healthy{upstream="` + dead + `"}`); got != 1 {
		t.Fatalf("upstream_healthy %v after the breaker left, want 1", got)
	}
}
