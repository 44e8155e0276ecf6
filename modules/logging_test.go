package modules

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zapcore"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// loadLoggingTo loads configLoggingTo(file, servers, app) and, when the test
// ends, a config that logs nowhere (so later tests do not write to file),
// then stops Caddy.
func loadLoggingTo(t *testing.T, file string, servers map[string]any, app map[string]any) {
	t.Helper()
	if err := caddy.Load(configLoggingTo(t, file, servers, app), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := caddy.Load(caddyConfig(map[string]any{}), true); err != nil {
			t.Error(err)
		}
		_ = caddy.Stop()
	})
}

// configLoggingTo is a config whose layer4chain lines, DEBUG ones
// included, go to a log file of their own (and not to the default log), as
// the Caddyfile's `log lc { output file chain.log; include layer4chain;
// level DEBUG }` makes it.
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
				"level":   "DEBUG",
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
	loadLoggingTo(t, first, servers, nil)

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
	loadLoggingTo(t, file, servers, map[string]any{"sweep_interval": "50ms"})
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
				Level      string
				Reason     string `json:"close_reason"`
				Detail     string `json:"close_detail"`
				Suppressed int
			}
			if err := json.Unmarshal([]byte(l), &line); err != nil {
				t.Fatal(err)
			}
			if line.Detail != "" {
				logged++
				checkNames(t, decodeEntry(t, l), "suppressed")
				if line.Level != "warn" || line.Reason != "limit_exceeded" || !strings.Contains(line.Detail, "the handler's max_connections (1) is reached") {
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
	loadLoggingTo(t, file, servers, nil)
	warnsOnce(t, file, addr, nil, "accept_proxy_protocol.allow_certificates trusts nobody here: no tls handler terminated TLS before chain, so no peer has a verified certificate; put caddy-l4's tls handler with client_auth before chain in the route")
}

// warnsOnce serves two connections through the hop at addr, each sending
// first (if any) and then having a line echoed, and checks that file got
// the warning msg exactly once.
func warnsOnce(t *testing.T, file, addr string, first []byte, msg string) {
	t.Helper()
	for i := 0; i < 2; i++ {
		c := chaintest.Dial(t, addr)
		c.Write(first)
		roundTrip(t, c, "served all the same")
		c.Close()
	}
	waitEmpty(t)
	if lines := waitLogLines(t, file, msg, 1); len(lines) != 1 {
		t.Fatalf("%d warnings %q, want exactly 1", len(lines), msg)
	}
}

// logEntry is one JSON log line, decoded.
type logEntry map[string]any

// str returns the line's string field key ("" if absent).
func (e logEntry) str(key string) string { s, _ := e[key].(string); return s }

// num returns the line's number field key (-1 if absent).
func (e logEntry) num(key string) float64 {
	if n, ok := e[key].(float64); ok {
		return n
	}
	return -1
}

func decodeEntry(t *testing.T, line string) logEntry {
	t.Helper()
	var e logEntry
	if err := json.Unmarshal([]byte(line), &e); err != nil {
		t.Fatalf("log line %s: %v", line, err)
	}
	return e
}

// waitEntries waits until file has n lines with msg that match, and
// returns them.
func waitEntries(t *testing.T, file, msg string, n int, match func(logEntry) bool) []logEntry {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		var out []logEntry
		for _, l := range logLines(t, file, msg) {
			if e := decodeEntry(t, l); match(e) {
				out = append(out, e)
			}
		}
		if len(out) >= n {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d matching %q lines in the log, want %d", len(out), msg, n)
		}
		time.Sleep(10 * time.Millisecond) // polling a file: no event to wait on
	}
}

// onServer matches the lines about connections to the listener addr.
func onServer(addr string) func(logEntry) bool {
	return func(e logEntry) bool { return e.str("server") == addr }
}

// jsonNames returns the JSON names of a struct type's fields.
func jsonNames(v any) map[string]bool {
	names := map[string]bool{}
	typ := reflect.TypeOf(v)
	for i := 0; i < typ.NumField(); i++ {
		if name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ","); name != "" && name != "-" {
			names[name] = true
		}
	}
	return names
}

// checkNames fails the test if a field of the connection's log line is
// neither one of the admin API's connection fields, under the same name,
// nor one the log alone has (the logger's own, and logOnly).
func checkNames(t *testing.T, e logEntry, logOnly ...string) {
	t.Helper()
	admin, dial := jsonNames(layer4chain.RecordInfo{}), jsonNames(layer4chain.DialAttempt{})
	allowed := map[string]bool{"level": true, "ts": true, "logger": true, "msg": true}
	for _, n := range logOnly {
		allowed[n] = true
	}
	for key, v := range e {
		if !admin[key] && !allowed[key] {
			t.Errorf("field %q of the %q line is not an admin API name: %v", key, e.str("msg"), e)
		}
		if key == "failed_dials" {
			for _, a := range v.([]any) {
				for k := range a.(map[string]any) {
					if !dial[k] {
						t.Errorf("failed_dials field %q is not the admin API's: %v", k, e)
					}
				}
			}
		}
	}
}

// Every close reason has its level decided, failures at WARN or above and
// ordinary ends at INFO.
func TestEveryCloseReasonHasALevel(t *testing.T) {
	for _, r := range layer4chain.CloseReasons {
		if _, ok := closeLevels[r]; !ok {
			t.Errorf("close reason %s has no log level in closeLevels", r)
		}
	}
	for _, r := range []layer4chain.CloseReason{
		layer4chain.ReasonConnectTimeout, layer4chain.ReasonConnectRefused, layer4chain.ReasonConnectFailed,
		layer4chain.ReasonProxyProtocolRejected, layer4chain.ReasonLoopDetected, layer4chain.ReasonNoHealthyUpstream,
		layer4chain.ReasonLimitExceeded, layer4chain.ReasonUpstreamReset, layer4chain.ReasonUpstreamUnhealthy,
	} {
		if l := closeLevel(r); l < zapcore.WarnLevel {
			t.Errorf("failure %s logged at %v, want WARN or above", r, l)
		}
	}
	for _, r := range []layer4chain.CloseReason{
		layer4chain.ReasonClientClosed, layer4chain.ReasonUpstreamClosed, layer4chain.ReasonClientReset,
		layer4chain.ReasonIdleTimeout, layer4chain.ReasonHalfCloseTimeout, layer4chain.ReasonMaxLifetime,
		layer4chain.ReasonAdmin, layer4chain.ReasonShutdown,
	} {
		if l := closeLevel(r); l != zapcore.InfoLevel {
			t.Errorf("ordinary end %s logged at %v, want INFO", r, l)
		}
	}
	if l := closeLevel("a_reason_from_the_future"); l != zapcore.WarnLevel {
		t.Errorf("an unknown reason logged at %v, want WARN", l)
	}
}

// TestConnectionLinesUseTheAdminAPINamesAndLevels checks each kind of
// connection line: an ordinary close at INFO, a dial failure at WARN with
// the upstream it tried, a loop at ERROR with the rejected header's chain
// ID and hop, the DEBUG state lines with the chain ID, and the SNI a tls
// matcher found, at both hops of a chain (and in the admin API's records).
func TestConnectionLinesUseTheAdminAPINamesAndLevels(t *testing.T) {
	file := filepath.Join(t.TempDir(), "chain.log")
	backend := chaintest.NewEchoBackend(t)
	plain, failing, loop := chaintest.FreeAddr(t), chaintest.FreeAddr(t), chaintest.FreeAddr(t)
	sniOuter, sniInner, refused := chaintest.FreeAddr(t), chaintest.FreeAddr(t), chaintest.RefusedAddr(t)
	const serverName = "sni.chain.test"
	trustLocal := map[string]any{"allow": []string{"127.0.0.1/32"}}
	outer := server(sniOuter, map[string]any{"upstreams": upstreams(sniInner), "proxy_protocol": "v2"})
	outer["routes"].([]any)[0].(map[string]any)["match"] = []any{map[string]any{"tls": map[string]any{"sni": []string{serverName}}}}
	servers := map[string]any{
		"plain":   server(plain, map[string]any{"upstreams": upstreams(backend.Addr)}),
		"failing": server(failing, map[string]any{"upstreams": upstreams(refused)}),
		"loop": server(loop, map[string]any{"upstreams": upstreams(loop), "proxy_protocol": "v2",
			"accept_proxy_protocol": trustLocal, "max_hops": 4}),
		"sni_outer": outer,
		"sni_inner": server(sniInner, map[string]any{"upstreams": upstreams(backend.Addr), "accept_proxy_protocol": trustLocal}),
	}
	loadLoggingTo(t, file, servers, nil)

	t.Run("ordinary close at INFO, state lines at DEBUG", func(t *testing.T) {
		c := chaintest.Dial(t, plain)
		roundTrip(t, c, "hello")
		client := c.LocalAddr().String()
		c.Close()
		e := waitEntries(t, file, "connection closed", 1, onServer(plain))[0]
		checkNames(t, e, "duration")
		if e.str("level") != "info" || e.str("close_reason") != "client_closed" || e.str("upstream") != backend.Addr ||
			e.str("client") != client || e.str("original_client") != client || len(e.str("chain_id")) != 32 ||
			e.num("hop") != 1 || e.num("bytes_up") != 5 || e.num("bytes_down") != 5 || e.num("duration") < 0 {
			t.Fatalf("close line %v", e)
		}
		for _, absent := range []string{"close_detail", "sni", "failed_dials", "reason", "detail"} {
			if _, ok := e[absent]; ok {
				t.Errorf("close line has %q: %v", absent, e)
			}
		}
		// The state lines are written before the close line.
		states := waitEntries(t, file, "state changed", 1, func(s logEntry) bool { return s["id"] == e["id"] && s.str("server") == plain })
		var established bool
		for _, s := range states {
			checkNames(t, s, "from", "to")
			if s.str("level") != "debug" || s.str("chain_id") != e.str("chain_id") {
				t.Errorf("state line %v, want DEBUG with the chain ID %s", s, e.str("chain_id"))
			}
			established = established || (s.str("from") == "connecting" && s.str("to") == "established")
		}
		if !established {
			t.Errorf("no connecting → established line among %v", states)
		}
	})

	t.Run("dial failure at WARN with the upstream tried", func(t *testing.T) {
		c := chaintest.Dial(t, failing)
		if got, _, _ := chaintest.ReadUntilClosed(c, 3*time.Second); len(got) != 0 {
			t.Fatalf("client got %q", got)
		}
		c.Close()
		e := waitEntries(t, file, "connection closed", 1, onServer(failing))[0]
		checkNames(t, e, "duration")
		dials, _ := e["failed_dials"].([]any)
		if e.str("level") != "warn" || e.str("close_reason") != "connect_refused" || e.str("upstream") != refused ||
			!strings.Contains(e.str("close_detail"), "refused") || len(e.str("chain_id")) != 32 || len(dials) != 1 {
			t.Fatalf("failure line %v", e)
		}
	})

	t.Run("loop at ERROR with the rejected header's chain ID and hop", func(t *testing.T) {
		// From 127.0.0.2, outside the allow list: a direct client. Each
		// pass through the loop adds a hop until max_hops (4) rejects the
		// fifth.
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 2 * time.Second}
		c, err := d.Dial("tcp", loop)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.WriteString(c, "hello"); err != nil {
			t.Fatal(err)
		}
		if got, _, _ := chaintest.ReadUntilClosed(c, 3*time.Second); len(got) != 0 {
			t.Fatalf("looping client got %q", got)
		}
		c.Close()
		lines := waitEntries(t, file, "connection closed", 5, onServer(loop))
		var first, rejected logEntry
		for _, e := range lines {
			switch {
			case e.num("hop") == 1:
				first = e
			case e.str("close_reason") == "loop_detected":
				rejected = e
			}
		}
		if first == nil || rejected == nil {
			t.Fatalf("no first hop's line or no loop_detected line among %v", lines)
		}
		checkNames(t, rejected, "duration")
		if rejected.str("level") != "error" || rejected.num("hop") != 5 || rejected.str("chain_id") != first.str("chain_id") ||
			!strings.Contains(rejected.str("close_detail"), "4 hops before this one") {
			t.Fatalf("loop line %v; the client's hop has chain ID %s", rejected, first.str("chain_id"))
		}
	})

	t.Run("loop without a chain ID still names the hop", func(t *testing.T) {
		// Another proxy's header: a hop count and no unique ID.
		header, err := layer4chain.ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("127.0.0.9:1234"),
			Destination: netip.MustParseAddrPort("127.0.0.1:80"), Hops: 9}.AppendTo(nil)
		if err != nil {
			t.Fatal(err)
		}
		c := chaintest.Dial(t, loop)
		c.Write(header)
		if got, _, _ := chaintest.ReadUntilClosed(c, 3*time.Second); len(got) != 0 {
			t.Fatalf("client got %q", got)
		}
		c.Close()
		e := waitEntries(t, file, "connection closed", 1, func(e logEntry) bool {
			return e.str("server") == loop && e.str("original_client") == "127.0.0.9:1234"
		})[0]
		if e.str("close_reason") != "loop_detected" || e.num("hop") != 10 || e.str("chain_id") != "" {
			t.Fatalf("loop line without a chain ID: %v, want hop 10 and no chain_id", e)
		}
	})

	t.Run("the SNI a tls matcher found, at both hops", func(t *testing.T) {
		raw := chaintest.Dial(t, sniOuter)
		_ = raw.SetDeadline(time.Now().Add(3 * time.Second))
		// The echo backend answers the ClientHello with itself: the
		// handshake fails, and leaves the connection open.
		if err := tls.Client(raw, &tls.Config{ServerName: serverName, InsecureSkipVerify: true}).Handshake(); err == nil {
			t.Fatal("a TLS handshake with an echo backend succeeded")
		}
		for _, addr := range []string{sniOuter, sniInner} {
			var found bool
			for _, r := range processTracker().Records() {
				if r.Server != addr {
					continue
				}
				found = true
				b, err := json.Marshal(r.Info())
				if err != nil {
					t.Fatal(err)
				}
				if !strings.Contains(string(b), `"sni":"`+serverName+`"`) {
					t.Errorf("the admin API's record at %s: %s, want sni %s", addr, b, serverName)
				}
			}
			if !found {
				t.Errorf("no live record at %s", addr)
			}
		}
		raw.Close()
		for _, addr := range []string{sniOuter, sniInner} {
			e := waitEntries(t, file, "connection closed", 1, onServer(addr))[0]
			checkNames(t, e, "duration")
			if e.str("sni") != serverName {
				t.Errorf("close line at %s: %v, want sni %s", addr, e, serverName)
			}
		}
	})
	waitEmpty(t)
}

// TestStartupLineSpellsTheLimitAsTheConfigDoes: the `connection limit`
// line at start says -1 for no limit, as the config spells it (0 there
// means the default), and the number for a set limit.
func TestStartupLineSpellsTheLimitAsTheConfigDoes(t *testing.T) {
	for _, tc := range []struct {
		set    int
		source string
	}{{-1, "off"}, {123, "max_connections"}} {
		file := filepath.Join(t.TempDir(), "chain.log")
		backend := chaintest.NewEchoBackend(t)
		servers := map[string]any{"hop": server(chaintest.FreeAddr(t), map[string]any{"upstreams": upstreams(backend.Addr)})}
		if err := caddy.Load(configLoggingTo(t, file, servers, map[string]any{"max_connections": tc.set}), true); err != nil {
			t.Fatal(err)
		}
		lines := waitLogLines(t, file, "connection limit", 1)
		if err := caddy.Load(caddyConfig(map[string]any{}), true); err != nil {
			t.Fatal(err)
		}
		var logged struct {
			MaxConnections *int   `json:"max_connections"`
			Source         string `json:"source"`
		}
		if len(lines) != 1 || json.Unmarshal([]byte(lines[0]), &logged) != nil || logged.MaxConnections == nil ||
			*logged.MaxConnections != tc.set || logged.Source != tc.source {
			t.Fatalf("max_connections %d: the line at start is %q; want max_connections %d, source %s", tc.set, lines, tc.set, tc.source)
		}
	}
	_ = caddy.Stop()
}

// TestCaddyL4ProxyProtocolHandlerBeforeChainWarnsOnce: caddy-l4's own
// proxy_protocol handler, put before chain out of habit, reads the header
// chain would have read (its chain ID and hop count are lost): the hop
// says so, once, and still serves.
func TestCaddyL4ProxyProtocolHandlerBeforeChainWarnsOnce(t *testing.T) {
	file := filepath.Join(t.TempDir(), "chain.log")
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	hop := server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})
	route := hop["routes"].([]any)[0].(map[string]any)
	route["handle"] = append([]any{map[string]any{"handler": "proxy_protocol", "allow": []string{"127.0.0.1/32"}}}, route["handle"].([]any)...)
	loadLoggingTo(t, file, map[string]any{"hop": hop}, nil)
	header, err := layer4chain.ProxyHeader{Version: 2, Source: netip.MustParseAddrPort("198.51.100.7:4000"),
		Destination: netip.MustParseAddrPort("127.0.0.1:25"), ChainID: "feedfacefeedfacefeedfacefeedface", Hops: 1}.AppendTo(nil)
	if err != nil {
		t.Fatal(err)
	}
	warnsOnce(t, file, addr, header, "caddy-l4's proxy_protocol handler read the PROXY header before chain: the chain ID and hop count it carried are lost (trace cannot join this hop to the previous one, loops go uncounted), and with go-proxyproto v0.15 that handler does not enforce its allow list; remove it from the route and set chain's accept_proxy_protocol instead")
}
