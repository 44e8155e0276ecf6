package integration

// The monitoring examples (examples/monitoring/) against the real tools:
// promtool checks the alert rules and runs their unit tests, and a real
// Prometheus, configured by the example scrape config, scrapes a two-hop
// chain until every query of the Grafana dashboard returns data. Debian's
// `prometheus` package provides both programs; where it is missing the
// tests skip, saying so, unless requireInteropEnv is set (CI), under which
// they fail.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// monitoringDir holds the dashboard, the alert rules, their tests and the
// scrape config, relative to this package.
var monitoringDir = filepath.Join("..", "examples", "monitoring")

// monitoringBinary finds promtool or prometheus, or skips (fails in CI)
// the test when Debian's prometheus package is not installed.
func monitoringBinary(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv(requireInteropEnv) != "" {
		t.Fatalf("%s is not installed, and %s is set: CI must run the monitoring tests (.ci/run installs prometheus)", name, requireInteropEnv)
	}
	t.Skipf("%s is not installed; install Debian's prometheus (apt-get install prometheus) to run this test", name)
	return ""
}

// promtool runs promtool with args in examples/monitoring and fails the
// test with its output when it fails.
func promtool(t *testing.T, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = monitoringDir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// alertNames lists the alerts alerts.yml defines, in file order.
func alertNames(t *testing.T) []string {
	t.Helper()
	text, err := os.ReadFile(filepath.Join(monitoringDir, "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range regexp.MustCompile(`(?m)^\s*- alert:\s*(\S+)\s*$`).FindAllStringSubmatch(string(text), -1) {
		names = append(names, m[1])
	}
	if len(names) == 0 {
		t.Fatal("alerts.yml defines no alert")
	}
	return names
}

// TestMonitoringAlertRulesPassPromtool checks alerts.yml and the example
// scrape config with promtool, runs the rules' unit tests, and checks that
// those tests have, for every alert, a case where it fires and one where it
// must not.
func TestMonitoringAlertRulesPassPromtool(t *testing.T) {
	bin := monitoringBinary(t, "promtool")
	names := alertNames(t)
	out := promtool(t, bin, "check", "rules", "alerts.yml")
	if want := fmt.Sprintf("SUCCESS: %d rules found", len(names)); !strings.Contains(out, want) {
		t.Fatalf("promtool check rules says %q, want %q", out, want)
	}
	promtool(t, bin, "check", "config", "prometheus.yml")
	promtool(t, bin, "test", "rules", "alerts_test.yml")

	// Each `alertname: X` in the tests is followed by its exp_alerts: an
	// empty list (must not fire) or entries with exp_labels (fires).
	text, err := os.ReadFile(filepath.Join(monitoringDir, "alerts_test.yml"))
	if err != nil {
		t.Fatal(err)
	}
	fires, silent := map[string]bool{}, map[string]bool{}
	cases := regexp.MustCompile(`(?m)^\s*alertname:\s*(\S+)\s*\n\s*exp_alerts:(.*)\n(.*)`)
	for _, m := range cases.FindAllStringSubmatch(string(text), -1) {
		switch {
		case strings.TrimSpace(m[2]) == "[]":
			silent[m[1]] = true
		case strings.Contains(m[3], "exp_labels:"):
			fires[m[1]] = true
		}
	}
	for _, name := range names {
		if !fires[name] || !silent[name] {
			t.Errorf("alerts_test.yml tests %s firing: %v, not firing: %v; want both", name, fires[name], silent[name])
		}
	}
}

// dashboard is the part of a Grafana dashboard's JSON that holds queries.
type dashboard struct {
	Panels     []dashboardPanel `json:"panels"`
	Templating struct {
		List []struct {
			Name     string          `json:"name"`
			Type     string          `json:"type"`
			Query    json.RawMessage `json:"query"`
			AllValue string          `json:"allValue"`
		} `json:"list"`
	} `json:"templating"`
}

type dashboardPanel struct {
	Title   string           `json:"title"`
	Type    string           `json:"type"`
	Panels  []dashboardPanel `json:"panels"` // a collapsed row's
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

// dashboardQuery is one PromQL query of the dashboard, with Grafana's
// variables substituted, and where it comes from.
type dashboardQuery struct {
	where, expr string
	// labelValues: for a variable's label_values(metric, label), the label
	// whose values the query lists.
	labelValues string
}

// grafanaVariables are Grafana's own variables the dashboard uses, with
// the values Grafana gives them for a Prometheus scraped every 15s over the
// dashboard's default hour (the test's whole run falls within them).
var grafanaVariables = map[string]string{"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

// labelValuesCall is Grafana's variable query label_values(metric, label).
var labelValuesCall = regexp.MustCompile(`^label_values\((.*),\s*(\w+)\)$`)

// dashboardQueries reads grafana-dashboard.json and returns every panel
// query and variable query as PromQL, each variable replaced by its "All"
// value (the dashboard's own allValue) or by grafanaVariables.
func dashboardQueries(t *testing.T) []dashboardQuery {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(monitoringDir, "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	values := map[string]string{}
	for k, v := range grafanaVariables {
		values[k] = v
	}
	type variableQuery struct{ name, query string }
	var varQueries []variableQuery
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		if v.AllValue == "" {
			t.Fatalf("dashboard variable %s has no allValue", v.Name)
		}
		values[v.Name] = v.AllValue
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil || q.Query == "" {
			t.Fatalf("dashboard variable %s: query %s is not {\"query\": ...}", v.Name, v.Query)
		}
		varQueries = append(varQueries, variableQuery{v.Name, q.Query})
	}
	variable := regexp.MustCompile(`\$(\w+)|\$\{(\w+)\}`)
	substitute := func(where, expr string) string {
		out := variable.ReplaceAllStringFunc(expr, func(m string) string {
			sub := variable.FindStringSubmatch(m)
			name := sub[1] + sub[2]
			v, ok := values[name]
			if !ok {
				t.Fatalf("%s uses the variable %s, which the dashboard does not define: %s", where, m, expr)
			}
			return v
		})
		return out
	}

	var queries []dashboardQuery
	for _, v := range varQueries {
		where := "variable " + v.name
		m := labelValuesCall.FindStringSubmatch(v.query)
		if m == nil {
			t.Fatalf("%s: %q is not label_values(metric, label)", where, v.query)
		}
		queries = append(queries, dashboardQuery{where: where, labelValues: m[2],
			expr: fmt.Sprintf("count by (%s) (%s)", m[2], substitute(where, m[1]))})
	}
	var walk func([]dashboardPanel)
	walk = func(panels []dashboardPanel) {
		for _, p := range panels {
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Fatalf("panel %q has no query", p.Title)
			}
			for i, target := range p.Targets {
				where := fmt.Sprintf("panel %q query %d", p.Title, i+1)
				if target.Expr == "" {
					t.Fatalf("%s is empty", where)
				}
				queries = append(queries, dashboardQuery{where: where, expr: substitute(where, target.Expr)})
			}
		}
	}
	walk(d.Panels)
	return queries
}

// promResult is an instant query's answer from Prometheus's HTTP API.
type promResult struct {
	Status    string `json:"status"`
	Error     string `json:"error"`
	ErrorType string `json:"errorType"`
	Data      struct {
		ResultType string `json:"resultType"`
		Result     []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		} `json:"result"`
	} `json:"data"`
}

// promQuery runs an instant query. A query Prometheus refuses (bad
// PromQL, a many-to-many match) fails the test at once.
func promQuery(t *testing.T, base, expr string) promResult {
	t.Helper()
	resp, err := admin.Get(base + "/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		t.Fatalf("query %s: %v", expr, err)
	}
	defer resp.Body.Close()
	var r promResult
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatalf("query %s: %v", expr, err)
	}
	if r.Status != "success" {
		t.Fatalf("Prometheus refused %s: %s: %s", expr, r.ErrorType, r.Error)
	}
	return r
}

// hasData reports whether the result holds a sample that is a number (a
// histogram_quantile over no observations is NaN: no data to draw).
func (r promResult) hasData() bool {
	for _, s := range r.Data.Result {
		text, _ := s.Value[1].(string)
		if v, err := strconv.ParseFloat(text, 64); err == nil && !math.IsNaN(v) {
			return true
		}
	}
	return false
}

// labelValues lists the values of label in the result, sorted.
func (r promResult) labelValues(label string) []string {
	var out []string
	for _, s := range r.Data.Result {
		out = append(out, s.Metric[label])
	}
	slices.Sort(out)
	return out
}

// monitoredChainTraffic sends one round of traffic: connections through
// the chain (the inner hop fails over from its refused upstream, whose
// circuit reopens after each trial) and a forged PROXY header from an
// untrusted address straight to the inner hop.
func monitoredChainTraffic(t *testing.T, outer, inner string) {
	t.Helper()
	for i := 0; i < 4; i++ {
		c, err := net.DialTimeout("tcp", outer, 3*time.Second)
		if err != nil {
			t.Fatalf("dialing the outer hop: %v", err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line := fmt.Sprintf("ping %d\n", i)
		if _, err := io.WriteString(c, line); err != nil {
			t.Fatal(err)
		}
		got, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil || got != line {
			t.Fatalf("through the chain: sent %q, got %q (%v)", line, got, err)
		}
	}
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 3 * time.Second}
	c, err := d.Dial("tcp", inner)
	if err != nil {
		t.Fatalf("dialing the inner hop from 127.0.0.2: %v", err)
	}
	defer c.Close()
	io.WriteString(c, "PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(c); len(got) != 0 || isTimeout(err) {
		t.Fatalf("the inner hop answered a forged PROXY header from 127.0.0.2 with %q (%v), want it closed", got, err)
	}
}

// TestMonitoringDashboardQueriesReturnDataFromARealPrometheus runs a real
// Prometheus with examples/monitoring/prometheus.yml (its targets pointed at
// a two-hop chain's admin endpoints, scraped every second) and alerts.yml,
// sends traffic through the chain, and waits until every query of the
// Grafana dashboard, variables included, returns data. The chain is built
// so that every panel has something to show: the inner hop has a refused
// upstream behind a circuit breaker (dial failures, an open circuit, its
// transitions), and a forged PROXY header reaches it from an untrusted
// address. The alert rules are loaded too: every one evaluates without
// error, and the two the chain provokes become active.
func TestMonitoringDashboardQueriesReturnDataFromARealPrometheus(t *testing.T) {
	bin := monitoringBinary(t, "prometheus")
	queries := dashboardQueries(t)

	backend := chaintest.NewEchoBackend(t)
	refused := chaintest.RefusedAddr(t)
	inner := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "round_robin"}},
		"health_checks": {"passive": {"fail_duration": "1s", "max_fails": 1}},
		"accept_proxy_protocol": {"allow": ["127.0.0.1/32"]}}`, backend.Addr, refused))
	outer := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}], "proxy_protocol": "v2"}`, inner.listen))

	// The example scrape config, its targets moved to this chain's admin
	// endpoints and its intervals shortened.
	dir := t.TempDir()
	cfg, err := os.ReadFile(filepath.Join(monitoringDir, "prometheus.yml"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(cfg)
	for _, r := range [][2]string{
		{`"localhost:2019"`, strconv.Quote(outer.admin)},
		{`"localhost:2020"`, strconv.Quote(inner.admin)},
		{"scrape_interval: 15s", "scrape_interval: 1s"},
		{"evaluation_interval: 15s", "evaluation_interval: 1s"},
	} {
		if strings.Count(text, r[0]) != 1 {
			t.Fatalf("examples/monitoring/prometheus.yml has %d times %s, want once", strings.Count(text, r[0]), r[0])
		}
		text = strings.Replace(text, r[0], r[1], 1)
	}
	rules, err := os.ReadFile(filepath.Join(monitoringDir, "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{"prometheus.yml": text, "alerts.yml": string(rules)} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	promAddr := freeAddr(t)
	startCaddyCommand(t, nil, []string{promAddr}, bin,
		"--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+promAddr)
	base := "http://" + promAddr
	waitPrometheusReady(t, base)

	// Both hops scraped, with the labels of the scrape config, before any
	// traffic: a counter must be seen before it rises for rate() to show it.
	waitQuery(t, base, `up{job="layer4chain", hop="outer", next_hop="inner"} == 1 and on () count(up{job="layer4chain", hop="inner"} == 1) == 1`)

	alerts := []string{
		`ALERTS{alertname="Layer4chainUntrustedProxyHeaders", hop="inner", alertstate="firing"}`,
		`ALERTS{alertname="Layer4chainUpstreamUnhealthy", hop="inner", upstream="` + refused + `"}`,
	}
	pending := map[int]bool{}
	for i := range queries {
		pending[i] = true
	}
	pendingAlerts := slices.Clone(alerts)
	start, deadline := time.Now(), time.Now().Add(60*time.Second)
	rounds := 0
	for ; len(pending) > 0 || len(pendingAlerts) > 0; rounds++ {
		monitoredChainTraffic(t, outer.listen, inner.listen)
		for i := range pending {
			q := queries[i]
			r := promQuery(t, base, q.expr)
			if !r.hasData() {
				continue
			}
			if q.labelValues != "" {
				want := map[string][]string{"job": {"layer4chain"}, "hop": {"inner", "outer"}}[q.labelValues]
				if got := r.labelValues(q.labelValues); !slices.Equal(got, want) {
					t.Fatalf("%s lists %v, want %v", q.where, got, want)
				}
			}
			delete(pending, i)
		}
		pendingAlerts = slices.DeleteFunc(pendingAlerts, func(expr string) bool { return promQuery(t, base, expr).hasData() })
		if time.Now().After(deadline) {
			var missing []string
			for i := range pending {
				missing = append(missing, queries[i].where+": "+queries[i].expr)
			}
			slices.Sort(missing)
			t.Fatalf("after %d rounds of traffic, these queries return no data:\n%s\nand these alerts are not active: %v",
				rounds, strings.Join(missing, "\n"), pendingAlerts)
		}
		<-time.After(250 * time.Millisecond) // paces the traffic rounds; Prometheus scrapes every second
	}

	t.Logf("every dashboard query returned data after %d rounds of traffic, %v", rounds, time.Since(start).Round(time.Millisecond))

	// Every rule of alerts.yml is loaded and evaluates without error
	// against the real series.
	want := alertNames(t)
	for {
		health := ruleHealth(t, base)
		var bad []string
		for _, name := range want {
			if health[name] != "ok" {
				bad = append(bad, fmt.Sprintf("%s: %q", name, health[name]))
			}
		}
		if len(bad) == 0 && len(health) == len(want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus loaded the rules %v; not evaluated cleanly: %v", health, bad)
		}
		<-time.After(250 * time.Millisecond) // rules are evaluated every second
	}
}

// waitQuery waits (30s at most) until the query returns data.
// waitPrometheusReady waits until Prometheus serves queries: while its
// storage starts, the query API answers 503 in plain text.
func waitPrometheusReady(t *testing.T, base string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := admin.Get(base + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus not ready within 30s: %v", err)
		}
		<-time.After(50 * time.Millisecond) // another process's state, polled through its API
	}
}

func waitQuery(t *testing.T, base, expr string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !promQuery(t, base, expr).hasData() {
		if time.Now().After(deadline) {
			t.Fatalf("within 30s, Prometheus returned no data for %s", expr)
		}
		<-time.After(100 * time.Millisecond) // another process's state, polled through its API
	}
}

// ruleHealth returns each alerting rule's name and health ("ok", "err" with
// its error, or "unknown" before its first evaluation) from /api/v1/rules.
func ruleHealth(t *testing.T, base string) map[string]string {
	t.Helper()
	resp, err := admin.Get(base + "/api/v1/rules?type=alert")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /api/v1/rules: %s", resp.Status)
	}
	var r struct {
		Data struct {
			Groups []struct {
				Rules []struct {
					Name      string `json:"name"`
					Health    string `json:"health"`
					LastError string `json:"lastError"`
				} `json:"rules"`
			} `json:"groups"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, g := range r.Data.Groups {
		for _, rule := range g.Rules {
			out[rule.Name] = strings.TrimSpace(rule.Health + " " + rule.LastError)
		}
	}
	return out
}
