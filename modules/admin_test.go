package modules

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// adminHTTP keeps no idle connection, so none outlives a test.
var adminHTTP = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}

// adminClient talks to the in-process Caddy's admin endpoint.
type adminClient struct {
	t    *testing.T
	base string
}

// startCaddyWithAdmin is startCaddy with the admin endpoint on.
func startCaddyWithAdmin(t *testing.T, servers map[string]any, app map[string]any) *adminClient {
	t.Helper()
	addr := chaintest.FreeAddr(t)
	if err := caddy.Load(caddyConfigWith(servers, addr, app), true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() {
		// caddy.Stop leaves the admin server up; a config without one
		// takes it down.
		if err := caddy.Load(caddyConfig(map[string]any{}), true); err != nil {
			t.Errorf("unloading: %v", err)
		}
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return &adminClient{t: t, base: "http://" + addr}
}

// do sends a request and returns the status and body.
func (a *adminClient) do(method, path string) (int, []byte) {
	a.t.Helper()
	req, err := http.NewRequest(method, a.base+path, nil)
	if err != nil {
		a.t.Fatal(err)
	}
	resp, err := adminHTTP.Do(req)
	if err != nil && method == http.MethodGet {
		// Each load replaces the admin server, and the old one closes its
		// listener in the background: a request that lands in its queue
		// just then is dropped (see load), so a GET is sent once more.
		resp, err = adminHTTP.Do(req)
	}
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, body
}

// getJSON GETs path, requires 200 and decodes the body into v.
func (a *adminClient) getJSON(path string, v any) {
	a.t.Helper()
	status, body := a.do(http.MethodGet, path)
	if status != http.StatusOK {
		a.t.Fatalf("GET %s: %d %s", path, status, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		a.t.Fatalf("GET %s: decoding %s: %v", path, body, err)
	}
}

// load POSTs a config to /load. Each load replaces the admin server, and
// both listen on the same address for a moment (SO_REUSEPORT): a request
// that lands in the old listener's queue just as it closes sees its
// connection dropped, so a dropped connection is retried once.
func (a *adminClient) load(cfg []byte) {
	a.t.Helper()
	for attempt := 0; ; attempt++ {
		resp, err := adminHTTP.Post(a.base+"/load", "application/json", strings.NewReader(string(cfg)))
		if err != nil {
			if attempt == 0 {
				continue
			}
			a.t.Fatalf("POST /load: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			a.t.Fatalf("POST /load: %d %s", resp.StatusCode, body)
		}
		return
	}
}

func (a *adminClient) connections(query string) []layer4chain.RecordInfo {
	var list []layer4chain.RecordInfo
	a.getJSON("/layer4chain/connections"+query, &list)
	return list
}

// metric returns the value of one series on /metrics, e.g.
// `caddy_layer4chain_connections_closed_total{reason="admin"}`.
func (a *adminClient) metric(series string) float64 {
	a.t.Helper()
	status, body := a.do(http.MethodGet, "/metrics")
	if status != http.StatusOK {
		a.t.Fatalf("GET /metrics: %d", status)
	}
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		if name, value, ok := strings.Cut(sc.Text(), " "); ok && name == series {
			f, err := strconv.ParseFloat(value, 64)
			if err != nil {
				a.t.Fatalf("metric %s: %v", series, err)
			}
			return f
		}
	}
	a.t.Fatalf("metric %s not on /metrics", series)
	return 0
}

func TestReloadUnderLoadKeepsEveryConnection(t *testing.T) {
	checkLeaks(t)
	const n = 50
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	servers := func(idle string) map[string]any {
		return map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr), "idle_timeout": idle})}
	}
	admin := startCaddyWithAdmin(t, servers("1h"), nil)

	conns := make([]*net.TCPConn, n)
	for i := range conns {
		conns[i] = chaintest.Dial(t, addr)
		roundTrip(t, conns[i], "established")
	}
	if got := len(admin.connections("?state=established")); got != n {
		t.Fatalf("listed %d established connections, want %d", got, n)
	}
	ids := map[uint64]bool{}
	for _, info := range admin.connections("") {
		ids[info.ID] = true
	}
	closedBefore := admin.metric(`caddy_layer4chain_connections_total`)

	// Every connection keeps exchanging messages while the config is
	// reloaded twice, through the admin API as an operator would.
	stop := make(chan struct{})
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 16)
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				msg := fmt.Sprintf("c%02d-m%08d", i, k)
				c.SetDeadline(time.Now().Add(3 * time.Second))
				if _, err := io.WriteString(c, msg); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(c, buf[:len(msg)]); err != nil || string(buf[:len(msg)]) != msg {
					errs <- fmt.Errorf("connection %d: %q, %v", i, buf[:len(msg)], err)
					return
				}
			}
		}()
	}
	for _, idle := range []string{"2h", "3h"} {
		admin.load(caddyConfigWith(servers(idle), strings.TrimPrefix(admin.base, "http://"), nil))
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("during reload: %v", err)
	}

	after := admin.connections("?state=established")
	if len(after) != n {
		t.Fatalf("after reload: %d established connections listed, want %d", len(after), n)
	}
	for _, info := range after {
		if !ids[info.ID] {
			t.Fatalf("connection %d after reload was not there before", info.ID)
		}
	}
	// Counters survive reloads: the registry is new, the collectors are not.
	if got := admin.metric(`caddy_layer4chain_connections_total`); got < closedBefore {
		t.Fatalf("connections_total went from %v to %v across a reload", closedBefore, got)
	}
	for _, c := range conns {
		roundTrip(t, c, "after reload")
	}
}

func TestDeleteClosesOneConnectionWithReasonAdmin(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	admin := startCaddyWithAdmin(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})}, nil)
	before := closedCount(layer4chain.ReasonAdmin)

	victim, bystander := chaintest.Dial(t, addr), chaintest.Dial(t, addr)
	roundTrip(t, victim, "victim")
	roundTrip(t, bystander, "bystander")
	list := admin.connections("?client=" + victim.LocalAddr().String())
	if len(list) != 1 {
		t.Fatalf("filter by client found %d connections, want 1", len(list))
	}
	if status, _ := admin.do(http.MethodDelete, fmt.Sprintf("/layer4chain/connections/%d?force=1", list[0].ID)); status != http.StatusBadRequest {
		t.Fatalf("DELETE with an unknown parameter: %d, want 400 (and nothing closed)", status)
	}
	status, body := admin.do(http.MethodDelete, fmt.Sprintf("/layer4chain/connections/%d", list[0].ID))
	if status != http.StatusOK {
		t.Fatalf("DELETE: %d %s", status, body)
	}
	var deleted layer4chain.RecordInfo
	if err := json.Unmarshal(body, &deleted); err != nil || deleted.State != layer4chain.StateClosing || deleted.Reason != layer4chain.ReasonAdmin {
		t.Fatalf("DELETE answered %s (%v), want the connection, closing, reason admin", body, err)
	}
	if _, elapsed, _ := chaintest.ReadUntilClosed(victim, 3*time.Second); elapsed > time.Second {
		t.Fatalf("deleted connection closed after %v", elapsed)
	}
	waitClosedCount(t, layer4chain.ReasonAdmin, before+1)
	roundTrip(t, bystander, "untouched")

	var stats layer4chain.Stats
	admin.getJSON("/layer4chain/stats", &stats)
	if stats.Closed[layer4chain.ReasonAdmin] != before+1 {
		t.Fatalf("stats count %d admin closes, want %d", stats.Closed[layer4chain.ReasonAdmin], before+1)
	}
	if got := admin.metric(`caddy_layer4chain_connections_closed_total{reason="admin"}`); got != float64(before+1) {
		t.Fatalf("metric counts %v admin closes, want %d", got, before+1)
	}
	status, _ = admin.do(http.MethodDelete, fmt.Sprintf("/layer4chain/connections/%d", list[0].ID))
	if status != http.StatusNotFound {
		t.Fatalf("second DELETE: %d, want 404", status)
	}
}

func TestStatsAndMetricsAgreeWithTheList(t *testing.T) {
	checkLeaks(t)
	// The backend answers a half-close by staying silent, so those
	// connections stay half-closed while the test looks.
	silent := make(chan struct{})
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				<-silent
				return
			}
			c.Write(buf[:n])
		}
	})
	t.Cleanup(func() { close(silent) })
	addr := chaintest.FreeAddr(t)
	admin := startCaddyWithAdmin(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})},
		map[string]any{"sweep_interval": "50ms"})

	for i := 0; i < 3; i++ {
		roundTrip(t, chaintest.Dial(t, addr), "established")
	}
	for i := 0; i < 2; i++ {
		c := chaintest.Dial(t, addr)
		roundTrip(t, c, "then half-closed")
		c.CloseWrite()
	}
	// Wait for the half-closes to reach the records.
	deadline := time.Now().Add(3 * time.Second)
	for len(admin.connections("?state=half_closed")) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("half-closed connections: %d, want 2", len(admin.connections("?state=half_closed")))
		}
		<-time.After(10 * time.Millisecond) // the admin API has no event to wait on
	}

	var stats layer4chain.Stats
	admin.getJSON("/layer4chain/stats", &stats)
	list := admin.connections("")
	byState := map[layer4chain.State]int64{}
	for _, info := range list {
		byState[info.State]++
	}
	for _, s := range layer4chain.States {
		metric := admin.metric(fmt.Sprintf(`caddy_layer4chain_connections_active{state=%q}`, s))
		if stats.Active[s] != byState[s] || metric != float64(byState[s]) {
			t.Errorf("state %s: list %d, stats %d, metric %v", s, byState[s], stats.Active[s], metric)
		}
	}
	if stats.ActiveTotal != int64(len(list)) || len(list) != 5 {
		t.Errorf("list has %d connections, stats %d, want 5", len(list), stats.ActiveTotal)
	}
	for deadline := time.Now().Add(3 * time.Second); admin.metric("caddy_layer4chain_sweeps_total") < 2; {
		if time.Now().After(deadline) {
			t.Fatal("no sweep ran within 3s at a 50ms interval")
		}
		<-time.After(20 * time.Millisecond) // sweeps have no event to wait on
	}
	admin.getJSON("/layer4chain/stats", &stats)
	if stats.ZombiesReaped != 0 || admin.metric("caddy_layer4chain_zombies_reaped_total") != 0 {
		t.Errorf("zombies %d after %d sweeps, want none", stats.ZombiesReaped, stats.Sweeps)
	}
	if got := admin.metric(`caddy_layer4chain_bytes_total{direction="up"}`); got != float64(stats.BytesUp) || got == 0 {
		t.Errorf("bytes up: metric %v, stats %d", got, stats.BytesUp)
	}
	if one := admin.connections("?chain_id=" + list[0].ChainID); len(one) != 1 || one[0].ID != list[0].ID {
		t.Errorf("filter by chain_id: %+v", one)
	}
	if got := admin.connections("?upstream=" + backend.Addr); len(got) != 5 {
		t.Errorf("filter by upstream: %d, want 5", len(got))
	}
	var one layer4chain.RecordInfo
	admin.getJSON(fmt.Sprintf("/layer4chain/connections/%d", list[0].ID), &one)
	if one.ClientSocket == nil || one.UpstreamSocket == nil {
		t.Errorf("connection %d shows no TCP_INFO: %+v", one.ID, one)
	}
	for _, info := range list {
		if info.ClientSocket == nil || info.UpstreamSocket == nil {
			t.Errorf("listed connection %d shows no TCP_INFO", info.ID)
		}
	}
}

func TestAdminAPIAnswersBadRequestsWithJSONErrors(t *testing.T) {
	checkLeaks(t)
	admin := startCaddyWithAdmin(t, map[string]any{"hop": server(chaintest.FreeAddr(t), map[string]any{"upstreams": upstreams(chaintest.RefusedAddr(t))})}, nil)
	for _, tc := range []struct {
		method, path string
		status       int
		mention      string
	}{
		{http.MethodGet, "/layer4chain/connections/abc", http.StatusBadRequest, "abc"},
		{http.MethodGet, "/layer4chain/connections/-1", http.StatusBadRequest, "-1"},
		{http.MethodDelete, "/layer4chain/connections/0", http.StatusBadRequest, "0"},
		{http.MethodGet, "/layer4chain/connections/01", http.StatusBadRequest, "01"},
		{http.MethodGet, "/layer4chain/connections?client=10.9.9.9;", http.StatusBadRequest, "10.9.9.9;"},
		{http.MethodGet, "/layer4chain/connections?chain_id=nosuch%zz", http.StatusBadRequest, "nosuch%zz"},
		{http.MethodGet, "/layer4chain/stats?%zz=1", http.StatusBadRequest, "%zz"},
		{http.MethodGet, "/layer4chain/connections/424242", http.StatusNotFound, "424242"},
		{http.MethodDelete, "/layer4chain/connections/424242", http.StatusNotFound, "424242"},
		{http.MethodGet, "/layer4chain/connections?state=open", http.StatusBadRequest, "open"},
		{http.MethodGet, "/layer4chain/connections?client=not-an-ip", http.StatusBadRequest, "not-an-ip"},
		{http.MethodGet, "/layer4chain/connections?colour=red", http.StatusBadRequest, "colour"},
		{http.MethodPost, "/layer4chain/connections", http.StatusMethodNotAllowed, "POST"},
		{http.MethodDelete, "/layer4chain/stats", http.StatusMethodNotAllowed, "DELETE"},
		// A path under /layer4chain/ that names no endpoint is a 404 that
		// lists them; a query on stats or upstreams, which take none, a 400.
		{http.MethodGet, "/layer4chain/connection", http.StatusNotFound, "/layer4chain/connection"},
		{http.MethodGet, "/layer4chain/", http.StatusNotFound, "/layer4chain/stats"},
		{http.MethodGet, "/layer4chain", http.StatusNotFound, "/layer4chain/connections"},
		{http.MethodDelete, "/layer4chain/connections/1/x", http.StatusNotFound, "/layer4chain/connections/1/x"},
		{http.MethodGet, "/layer4chain/stats?verbose=1", http.StatusBadRequest, `"verbose"`},
		{http.MethodGet, "/layer4chain/upstreams?state=open&address=x", http.StatusBadRequest, `"address"`},
	} {
		status, body := admin.do(tc.method, tc.path)
		var e struct{ Error string }
		if err := json.Unmarshal(body, &e); err != nil || status != tc.status || !strings.Contains(e.Error, tc.mention) {
			t.Errorf("%s %s: %d %s, want %d and a JSON error mentioning %q", tc.method, tc.path, status, body, tc.status, tc.mention)
		}
	}
	if list := admin.connections(""); list == nil || len(list) != 0 {
		t.Errorf("empty list encodes as %v, want []", list)
	}
	for _, path := range []string{"/layer4chain/stats", "/layer4chain/upstreams"} {
		if status, body := admin.do(http.MethodGet, path); status != http.StatusOK {
			t.Errorf("GET %s: %d %s", path, status, body)
		}
	}
}

func TestRapidConnectDisconnectLeavesNoRecordOrZombie(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	startCaddyWithAdmin(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})},
		map[string]any{"sweep_interval": "20ms"})
	tr := processTracker()
	zombies := tr.ZombiesReaped()

	for i := 0; i < 1000; i++ {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		switch i % 3 {
		case 0: // reset at once
			c.(*net.TCPConn).SetLinger(0)
		case 1: // one byte, then a clean close
			c.Write([]byte{1})
		}
		c.Close()
	}
	waitEmpty(t)
	if z := tr.ZombiesReaped() - zombies; z != 0 {
		t.Fatalf("%d zombie records reaped", z)
	}
}
