package integration

// Upstream health (issue 10) across real processes: the circuit breaker and
// its half-open trial, fail-fast when no upstream is available, active
// checks (also through a next hop that requires PROXY headers),
// close_if_unhealthy, health kept across reloads and released with the
// upstream, and a rejected config that changes nothing. Every upstream is a
// loopback listener the test runs, stops or black-holes; the hop's view is
// read from its admin API (/layer4chain/upstreams, /stats, /metrics) and
// its log.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// pollEvery is how often a test polls another process's state through its
// admin API: there is no event to wait on across processes.
const pollEvery = 20 * time.Millisecond

// hopConfig is a one-hop JSON config: the app (with a fast sweep, plus
// appExtra) and one layer4 server on listen whose route runs handler (a
// chain handler's JSON object).
func hopConfig(adminAddr, listen, appExtra, handler string) string {
	return fmt.Sprintf(`{"admin": {"listen": %q},
		"apps": {
			"layer4chain": {"sweep_interval": "100ms" %s},
			"layer4": {"servers": {"hop": {"listen": [%q], "routes": [{"handle": [%s]}]}}}
		}}`, adminAddr, appExtra, listen, handler)
}

// healthHop is one Caddy process with one chain handler.
type healthHop struct {
	listen, admin string
	proc          *process
}

func (h *healthHop) base() string { return "http://" + h.admin }

// startHealthHop starts a hop whose chain handler is handler.
func startHealthHop(t *testing.T, appExtra, handler string) *healthHop {
	t.Helper()
	h := &healthHop{listen: freeAddr(t), admin: freeAddr(t)}
	path := writeConfig(t, hopConfig(h.admin, h.listen, appExtra, handler))
	h.proc = startCaddy(t, []string{h.listen, h.admin}, "--config", path)
	return h
}

// upstreamState is one entry of GET /layer4chain/upstreams.
type upstreamState struct {
	Address             string     `json:"address"`
	Health              string     `json:"health"`
	ConsecutiveFailures int        `json:"consecutive_failures"`
	ActiveConnections   int64      `json:"active_connections"`
	LastError           string     `json:"last_error"`
	LastErrorAt         *time.Time `json:"last_error_at"`
}

// adminGet GETs url from a hop's admin endpoint. Each /load replaces the
// admin server, and the old one closes its listener in the background: a
// request that lands in its queue just then is reset, so one that fails to
// connect or is reset is sent once more.
func adminGet(t *testing.T, url string) *http.Response {
	t.Helper()
	resp, err := admin.Get(url)
	if err != nil {
		resp, err = admin.Get(url)
	}
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp
}

// upstreams returns the hop's /layer4chain/upstreams, decoded and raw.
func upstreams(t *testing.T, adminAddr string) ([]upstreamState, string) {
	t.Helper()
	resp := adminGet(t, "http://"+adminAddr+"/layer4chain/upstreams")
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /layer4chain/upstreams: %d %s", resp.StatusCode, body)
	}
	var list []upstreamState
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatalf("GET /layer4chain/upstreams: %v: %s", err, body)
	}
	return list, string(body)
}

// upstreamOf returns addr's entry in the hop's /layer4chain/upstreams.
func upstreamOf(t *testing.T, adminAddr, addr string) (upstreamState, bool) {
	t.Helper()
	list, _ := upstreams(t, adminAddr)
	for _, u := range list {
		if u.Address == addr {
			return u, true
		}
	}
	return upstreamState{}, false
}

// waitHealth polls the hop's admin API until addr shows health want, and
// returns when it first saw it.
func waitHealth(t *testing.T, adminAddr, addr, want string, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		u, ok := upstreamOf(t, adminAddr, addr)
		if ok && u.Health == want {
			return time.Now()
		}
		if time.Now().After(deadline) {
			_, raw := upstreams(t, adminAddr)
			t.Fatalf("upstream %s not %s within %v: %s", addr, want, within, raw)
		}
		<-time.After(pollEvery)
	}
}

// healthStats is the part of GET /layer4chain/stats these tests read.
type healthStats struct {
	ConnectionsTotal      int64            `json:"connections_total"`
	ActiveTotal           int64            `json:"active_total"`
	Closed                map[string]int64 `json:"closed"`
	DialFailures          map[string]int64 `json:"dial_failures"`
	ProxyProtocolRejected map[string]int64 `json:"proxy_protocol_rejected"`
}

func getHealthStats(t *testing.T, adminAddr string) healthStats {
	t.Helper()
	resp := adminGet(t, "http://"+adminAddr+"/layer4chain/stats")
	defer resp.Body.Close()
	var s healthStats
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

// metricsText returns the hop's /metrics.
func metricsText(t *testing.T, adminAddr string) string {
	t.Helper()
	resp := adminGet(t, "http://"+adminAddr+"/metrics")
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// metricValue finds the sample of name whose labels include every label in
// want (in any order) and returns its value.
func metricValue(text, name string, want map[string]string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		rest, ok := strings.CutPrefix(line, name)
		if !ok || (rest != "" && rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		labels := map[string]string{}
		if strings.HasPrefix(rest, "{") {
			end := strings.Index(rest, "}")
			if end < 0 {
				continue
			}
			for _, pair := range strings.Split(rest[1:end], ",") {
				k, v, ok := strings.Cut(pair, "=")
				if ok {
					labels[k] = strings.Trim(v, `"`)
				}
			}
			rest = rest[end+1:]
		}
		match := true
		for k, v := range want {
			if labels[k] != v {
				match = false
			}
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err == nil {
			return v, true
		}
	}
	return 0, false
}

// logEntry is a line of the hop's JSON log that these tests read.
type logEntry struct {
	Msg         string `json:"msg"`
	Reason      string `json:"close_reason"`
	Detail      string `json:"close_detail"`
	Upstream    string `json:"upstream"`
	From        string `json:"from"`
	To          string `json:"to"`
	Cause       string `json:"cause"`
	FailedDials []struct {
		Upstream string `json:"upstream"`
		Reason   string `json:"reason"`
		Error    string `json:"error"`
	} `json:"failed_dials"`
}

// logEntries returns the process's JSON log lines with message msg.
func logEntries(p *process, msg string) []logEntry {
	var out []logEntry
	for _, line := range strings.Split(p.output.String(), "\n") {
		var e logEntry
		if json.Unmarshal([]byte(line), &e) == nil && e.Msg == msg {
			out = append(out, e)
		}
	}
	return out
}

// closedWith counts the access-log lines with close_reason reason.
func closedWith(p *process, reason string) int {
	n := 0
	for _, e := range logEntries(p, "connection closed") {
		if e.Reason == reason {
			n++
		}
	}
	return n
}

// waitClosedWith waits until the process has logged n closes with reason.
func waitClosedWith(t *testing.T, p *process, reason string, n int, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for {
		_, written := p.output.contains("")
		if closedWith(p, reason) >= n {
			return
		}
		select {
		case <-written:
		case <-deadline:
			t.Fatalf("%d access-log lines with reason %s within %v, want %d:\n%s", closedWith(p, reason), reason, within, n, p.output)
		}
	}
}

// namedBackend is a loopback server that greets each connection with its
// name and a newline, then echoes. It can stop listening while its
// connections go on, and be started again on the same address.
type namedBackend struct {
	name, addr string
	ln         net.Listener
	accepted   atomic.Int64
	mu         sync.Mutex
	conns      map[net.Conn]struct{}
	wg         sync.WaitGroup
}

// startNamedBackend listens on addr ("" for a free port).
func startNamedBackend(t *testing.T, name, addr string) *namedBackend {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("backend %s on %s: %v", name, addr, err)
	}
	b := &namedBackend{name: name, addr: ln.Addr().String(), ln: ln, conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.accepted.Add(1)
			b.mu.Lock()
			b.conns[c] = struct{}{}
			b.mu.Unlock()
			b.wg.Add(1)
			go func() {
				defer b.wg.Done()
				defer func() {
					b.mu.Lock()
					delete(b.conns, c)
					b.mu.Unlock()
					c.Close()
				}()
				if _, err := io.WriteString(c, b.name+"\n"); err != nil {
					return
				}
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(b.close)
	return b
}

// stopListening closes the listener: new connects are refused, the
// connections already accepted go on.
func (b *namedBackend) stopListening() { b.ln.Close() }

// close stops the listener and every connection, and waits for them.
func (b *namedBackend) close() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// reach connects to the hop and reads the greeting of the backend it was
// proxied to. took runs from the connect to the greeting. The connection
// is closed when the test ends. It may run in a goroutine of its own: it
// reports every failure in err.
func reach(t *testing.T, hop string) (c net.Conn, r *bufio.Reader, name string, took time.Duration, err error) {
	t.Helper()
	start := time.Now()
	c, err = net.DialTimeout("tcp", hop, 2*time.Second)
	if err != nil {
		return nil, nil, "", time.Since(start), err
	}
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r = bufio.NewReader(c)
	line, err := r.ReadString('\n')
	took = time.Since(start)
	c.SetReadDeadline(time.Time{})
	return c, r, strings.TrimSuffix(line, "\n"), took, err
}

// mustReach is reach that fails the test when no backend greets.
func mustReach(t *testing.T, hop string) (net.Conn, *bufio.Reader, string, time.Duration) {
	t.Helper()
	c, r, name, took, err := reach(t, hop)
	if err != nil {
		t.Fatalf("no backend greeted through %s after %v: %v", hop, took, err)
	}
	return c, r, name, took
}

// echoVia sends line on c and reads it back through r.
func echoVia(c net.Conn, r *bufio.Reader, line string) error {
	c.SetDeadline(time.Now().Add(3 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return err
	}
	got, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != line+"\n" {
		return fmt.Errorf("echo %q, sent %q", got, line)
	}
	return nil
}

// rawListener is a loopback listener with a backlog of 0, made with raw
// syscalls. accept serves it; hold stops serving and fills its accept
// queue, so that from then on the kernel drops new SYNs: the same port
// turns from a working upstream into a black hole.
type rawListener struct {
	addr     string
	file     *os.File // the listening socket; ln is a duplicate of it
	ln       net.Listener
	accepted atomic.Int64
	fillers  []net.Conn
	wg       sync.WaitGroup
}

// listenRaw binds addr ("127.0.0.1:0" for a free port) with backlog 0.
func listenRaw(t *testing.T, addr string) *rawListener {
	t.Helper()
	tcpAddr, err := net.ResolveTCPAddr("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socket: %v", err)
	}
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1); err != nil {
		syscall.Close(fd)
		t.Fatalf("SO_REUSEADDR: %v", err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: tcpAddr.Port}); err != nil {
		syscall.Close(fd)
		t.Fatalf("bind %s: %v", addr, err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		syscall.Close(fd)
		t.Fatalf("listen: %v", err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		syscall.Close(fd)
		t.Fatalf("getsockname: %v", err)
	}
	l := &rawListener{
		addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port)),
		file: os.NewFile(uintptr(fd), "raw listener"),
	}
	t.Cleanup(l.release)
	return l
}

// accept serves the listener: each connection is read until EOF and closed
// (what a probe needs).
func (l *rawListener) accept(t *testing.T) {
	t.Helper()
	ln, err := net.FileListener(l.file)
	if err != nil {
		t.Fatalf("file listener: %v", err)
	}
	l.ln = ln
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			l.accepted.Add(1)
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, _ = io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
}

// hold stops accepting (the socket keeps listening) and fills the accept
// queue until a connect times out: from then on the port is a black hole.
func (l *rawListener) hold(t *testing.T) {
	t.Helper()
	if l.ln != nil {
		l.ln.Close() // the duplicate: the socket itself keeps listening
		l.wg.Wait()
		l.ln = nil
	}
	for i := 0; ; i++ {
		if i == 16 {
			t.Fatalf("listener %s still takes connections after %d connects", l.addr, i)
		}
		c, err := net.DialTimeout("tcp", l.addr, 200*time.Millisecond)
		if err == nil {
			l.fillers = append(l.fillers, c)
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return
		}
		t.Fatalf("filling the accept queue of %s: %v", l.addr, err)
	}
}

// release closes the socket and the connections that filled it: the port
// then refuses connects until something listens there again.
func (l *rawListener) release() {
	if l.ln != nil {
		l.ln.Close()
		l.wg.Wait()
		l.ln = nil
	}
	if l.file != nil {
		l.file.Close()
		l.file = nil
	}
	for _, c := range l.fillers {
		c.Close()
	}
	l.fillers = nil
}

// TestHealthCircuitOpensAfterMaxFailsAndClientsSkipTheUpstream stops the
// first upstream: the next max_fails clients each pay one refused dial and
// fail over; then the circuit is open and every later client reaches the
// second upstream with no dial to the first and no delay.
func TestHealthCircuitOpensAfterMaxFailsAndClientsSkipTheUpstream(t *testing.T) {
	a, b := startNamedBackend(t, "A", ""), startNamedBackend(t, "B", "")
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "first"}},
		"connect_timeout": "2s",
		"health_checks": {"passive": {"fail_duration": "30s", "max_fails": 3}}}`, a.addr, b.addr))

	if _, _, name, _ := mustReach(t, hop.listen); name != "A" {
		t.Fatalf("with both upstreams up, policy first reached %s", name)
	}
	a.close()

	for i := 1; i <= 3; i++ {
		if _, _, name, _ := mustReach(t, hop.listen); name != "B" {
			t.Fatalf("client %d after A stopped reached %s", i, name)
		}
		u, _ := upstreamOf(t, hop.admin, a.addr)
		want := "healthy"
		if i == 3 {
			want = "open"
		}
		if u.Health != want || u.ConsecutiveFailures != i {
			t.Fatalf("after %d refused dials A is %+v, want %s with %d consecutive failures", i, u, want, i)
		}
	}
	if u, _ := upstreamOf(t, hop.admin, a.addr); u.LastError == "" || u.LastErrorAt == nil {
		t.Errorf("open upstream A has no last error: %+v", u)
	}

	for i := 0; i < 10; i++ {
		c, _, name, took := mustReach(t, hop.listen)
		c.Close()
		if name != "B" || took > 200*time.Millisecond {
			t.Fatalf("client %d with A's circuit open: reached %s after %v, want B well below connect_timeout 2s", i, name, took)
		}
	}
	if n := getHealthStats(t, hop.admin).DialFailures["connect_refused"]; n != 3 {
		t.Errorf("the hop dialed the stopped upstream %d times, want max_fails = 3", n)
	}
	text := metricsText(t, hop.admin)
	if v, _ := metricValue(text, "caddy_layer4chain_dial_failures_total", map[string]string{"reason": "connect_refused", "upstream": a.addr}); v != 3 {
		t.Errorf("dial_failures_total{reason=connect_refused,upstream=A} = %v, want 3:\n%s", v, grepLines(text, "dial_failures_total"))
	}
	if v, ok := metricValue(text, "caddy_layer4chain_upstream_healthy", map[string]string{"upstream": a.addr}); !ok || v != 0 {
		t.Errorf("upstream_healthy{upstream=A} = %v (present %v), want 0", v, ok)
	}
	if v, ok := metricValue(text, "caddy_layer4chain_upstream_healthy", map[string]string{"upstream": b.addr}); !ok || v != 1 {
		t.Errorf("upstream_healthy{upstream=B} = %v (present %v), want 1", v, ok)
	}
	if v, _ := metricValue(text, "caddy_layer4chain_circuit_transitions_total", map[string]string{"upstream": a.addr, "to": "open"}); v != 1 {
		t.Errorf("circuit_transitions_total{to=open,upstream=A} = %v, want 1", v)
	}

	// The ten clients above closed: their access lines show no failed dial.
	// The three that failed over still hold their connections.
	waitClosedWith(t, hop.proc, "client_closed", 10, 5*time.Second)
	for _, e := range logEntries(hop.proc, "connection closed") {
		if len(e.FailedDials) != 0 {
			t.Errorf("a client sent straight to B logged failed dials: %+v", e)
		}
	}
	var warned int
	for _, e := range logEntries(hop.proc, "upstream health changed") {
		if e.Upstream == a.addr && e.From == "healthy" && e.To == "open" && e.Cause != "" {
			warned++
		}
	}
	if warned != 1 {
		t.Errorf("%d WARN lines 'upstream health changed' healthy→open for A, want 1:\n%s", warned, hop.proc.output)
	}
}

// TestHealthFailedOverConnectionLogsItsFailedDials checks that a connection
// that failed over carries every failed attempt in its access-log line.
func TestHealthFailedOverConnectionLogsItsFailedDials(t *testing.T) {
	refused, b := chaintest.RefusedAddr(t), startNamedBackend(t, "B", "")
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "first"}}}`, refused, b.addr))
	c, _, name, _ := mustReach(t, hop.listen)
	if name != "B" {
		t.Fatalf("reached %s", name)
	}
	c.Close()
	hop.proc.waitOutput(t, `"failed_dials"`, 5*time.Second)
	for _, e := range logEntries(hop.proc, "connection closed") {
		if len(e.FailedDials) != 1 || e.FailedDials[0].Upstream != refused || e.FailedDials[0].Reason != "connect_refused" || e.FailedDials[0].Error == "" {
			t.Fatalf("access line of a connection that failed over from %s: %+v", refused, e)
		}
		return
	}
	t.Fatalf("no access line:\n%s", hop.proc.output)
}

// TestHealthBlackholedUpstreamIsPaidOnce is the user story: a
// black-holed first upstream costs the first client connect_timeout, and
// once its circuit is open no later client waits for it.
func TestHealthBlackholedUpstreamIsPaidOnce(t *testing.T) {
	hole, b := chaintest.BlackholeAddr(t), startNamedBackend(t, "B", "")
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "first"}},
		"connect_timeout": "500ms",
		"health_checks": {"passive": {"fail_duration": "30s", "max_fails": 1}}}`, hole, b.addr))
	_, _, name, took := mustReach(t, hop.listen)
	if name != "B" || took < 450*time.Millisecond {
		t.Fatalf("first client: reached %s after %v, want B after connect_timeout 500ms", name, took)
	}
	waitHealth(t, hop.admin, hole, "open", time.Second)
	for i := 0; i < 10; i++ {
		_, _, name, took := mustReach(t, hop.listen)
		if name != "B" || took > 100*time.Millisecond {
			t.Fatalf("client %d with the black hole's circuit open: reached %s after %v", i, name, took)
		}
	}
}

// TestHealthHalfOpenTrialLetsOneConnectionThroughAndRestores opens A's
// circuit, black-holes A's port for the first half-open trial (exactly one
// of several concurrent clients waits for it; the others go to B at once;
// the trial's failure reopens the circuit), then starts A again on the
// same port: after the next cool-down one client reaches A and A is
// healthy again.
func TestHealthHalfOpenTrialLetsOneConnectionThroughAndRestores(t *testing.T) {
	const coolDown = 400 * time.Millisecond
	a, b := startNamedBackend(t, "A", ""), startNamedBackend(t, "B", "")
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "first"}},
		"connect_timeout": "700ms",
		"health_checks": {"passive": {"fail_duration": %q, "max_fails": 1}}}`, a.addr, b.addr, coolDown.String()))

	a.close()
	if _, _, name, _ := mustReach(t, hop.listen); name != "B" {
		t.Fatalf("client after A stopped reached %s", name)
	}
	opened := time.Now()
	if u, _ := upstreamOf(t, hop.admin, a.addr); u.Health != "open" {
		t.Fatalf("after a refused dial with max_fails 1, A is %+v", u)
	}
	_, raw := upstreams(t, hop.admin)
	t.Logf("GET /layer4chain/upstreams, A's circuit open: %s", raw)

	// A's port turns into a black hole while the circuit is open; a
	// client now still goes straight to B.
	hole := listenRaw(t, a.addr)
	hole.hold(t)
	if time.Since(opened) < coolDown-50*time.Millisecond {
		if _, _, name, took := mustReach(t, hop.listen); name != "B" || took > 100*time.Millisecond {
			t.Fatalf("client during the cool-down: %s after %v", name, took)
		}
	}
	halfOpen := waitHealth(t, hop.admin, a.addr, "half_open", 2*coolDown)
	if early := halfOpen.Sub(opened); early < coolDown-50*time.Millisecond {
		t.Fatalf("half_open %v after the circuit opened, before the %v cool-down", early, coolDown)
	}

	// Five clients at once: exactly one is the trial and waits for the
	// black hole's connect_timeout, the others go to B without waiting.
	const clients = 5
	var wg sync.WaitGroup
	tooks := make([]time.Duration, clients)
	names := make([]string, clients)
	errs := make([]error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, names[i], tooks[i], errs[i] = reach(t, hop.listen)
		}()
	}
	wg.Wait()
	slow := 0
	for i := range clients {
		if errs[i] != nil || names[i] != "B" {
			t.Fatalf("client %d of the half-open round: %q after %v (%v)", i, names[i], tooks[i], errs[i])
		}
		if tooks[i] >= 600*time.Millisecond {
			slow++
		} else if tooks[i] > 200*time.Millisecond {
			t.Errorf("client %d of the half-open round took %v: neither the trial nor a skip", i, tooks[i])
		}
	}
	if slow != 1 {
		t.Fatalf("%d of %d concurrent half-open clients waited for A's connect_timeout, want exactly the one trial; took %v", slow, clients, tooks)
	}
	if u, _ := upstreamOf(t, hop.admin, a.addr); u.Health != "open" || u.ConsecutiveFailures != 2 {
		t.Fatalf("after the failed trial A is %+v, want open with 2 consecutive failures", u)
	}
	_, raw = upstreams(t, hop.admin)
	t.Logf("GET /layer4chain/upstreams, after the failed trial: %s", raw)

	// A comes back on the same port: after the cool-down one client is the
	// trial, reaches A and closes the circuit.
	hole.release()
	a = startNamedBackend(t, "A", a.addr)
	waitHealth(t, hop.admin, a.addr, "half_open", 2*coolDown)
	if _, _, name, _ := mustReach(t, hop.listen); name != "A" {
		t.Fatalf("the trial after A came back reached %s", name)
	}
	u, _ := upstreamOf(t, hop.admin, a.addr)
	if u.Health != "healthy" || u.ConsecutiveFailures != 0 {
		t.Fatalf("after a successful trial A is %+v", u)
	}
	if _, _, name, _ := mustReach(t, hop.listen); name != "A" {
		t.Fatalf("after A was restored, policy first reached %s", name)
	}

	list, raw := upstreams(t, hop.admin)
	text := metricsText(t, hop.admin)
	for to, want := range map[string]float64{"open": 2, "half_open": 2, "healthy": 1} {
		if v, _ := metricValue(text, "caddy_layer4chain_circuit_transitions_total", map[string]string{"upstream": a.addr, "to": to}); v != want {
			t.Errorf("circuit_transitions_total{to=%s,upstream=A} = %v, want %v", to, v, want)
		}
	}
	if v, ok := metricValue(text, "caddy_layer4chain_upstream_healthy", map[string]string{"upstream": a.addr}); !ok || v != 1 {
		t.Errorf("upstream_healthy{upstream=A} = %v (present %v), want 1", v, ok)
	}
	var transitions []string
	for _, e := range logEntries(hop.proc, "upstream health changed") {
		if e.Upstream == a.addr {
			transitions = append(transitions, e.From+"→"+e.To)
		}
	}
	want := "healthy→open open→half_open half_open→open open→half_open half_open→healthy"
	if got := strings.Join(transitions, " "); got != want {
		t.Errorf("WARN transitions of A: %s, want %s", got, want)
	}
	t.Logf("A = %s, B = %s", a.addr, b.addr)
	t.Logf("GET /layer4chain/upstreams: %s (%d upstreams)", raw, len(list))
	t.Logf("/metrics:\n%s\n%s\n%s\n%s",
		grepLines(text, "caddy_layer4chain_circuit_transitions_total{"),
		grepLines(text, "caddy_layer4chain_upstream_healthy{"),
		grepLines(text, "caddy_layer4chain_dial_failures_total{"),
		grepLines(text, "caddy_layer4chain_dial_duration_seconds_count"))
	t.Logf("WARN lines:\n%s", grepLines(hop.proc.output.String(), "upstream health changed"))
}

// TestHealthAllUpstreamsDownFailsFast black-holes both upstreams: the
// first client pays both connect timeouts and opens both circuits; every
// later client is closed at once with reason no_healthy_upstream.
func TestHealthAllUpstreamsDownFailsFast(t *testing.T) {
	h1, h2 := chaintest.BlackholeAddr(t), chaintest.BlackholeAddr(t)
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}, {"dial": [%q]}],
		"connect_timeout": "300ms",
		"health_checks": {"passive": {"fail_duration": "30s", "max_fails": 1}}}`, h1, h2))

	c := chaintest.Dial(t, hop.listen)
	if _, took, _ := chaintest.ReadUntilClosed(c, 5*time.Second); took < 550*time.Millisecond {
		t.Fatalf("first client closed after %v, before both connect timeouts", took)
	}
	waitHealth(t, hop.admin, h1, "open", time.Second)
	waitHealth(t, hop.admin, h2, "open", time.Second)

	const clients = 5
	for i := 0; i < clients; i++ {
		c := chaintest.Dial(t, hop.listen)
		c.Write([]byte("hello"))
		got, took, _ := chaintest.ReadUntilClosed(c, 3*time.Second)
		if len(got) != 0 || took > 100*time.Millisecond {
			t.Fatalf("client %d with every upstream open: got %q, closed after %v, want closed within 100ms", i, got, took)
		}
	}
	waitClosedWith(t, hop.proc, "no_healthy_upstream", clients, 5*time.Second)
	if n := getHealthStats(t, hop.admin).Closed["no_healthy_upstream"]; n != clients {
		t.Errorf("stats closed.no_healthy_upstream = %d, want %d", n, clients)
	}
	text := metricsText(t, hop.admin)
	if v, _ := metricValue(text, "caddy_layer4chain_connections_closed_total", map[string]string{"reason": "no_healthy_upstream"}); v != clients {
		t.Errorf("connections_closed_total{reason=no_healthy_upstream} = %v, want %d", v, clients)
	}
	if n := getHealthStats(t, hop.admin).DialFailures["connect_timeout"]; n != 2 {
		t.Errorf("dial failures connect_timeout = %d, want 2: the later clients dialed nothing", n)
	}
}

// TestHealthActiveCheckMarksBlackholedUpstreamDownAndBackUp runs active
// checks against an upstream whose port stops accepting and fills up (a
// black hole on the same socket): it is unhealthy within interval +
// timeout, clients skip it without dialing, and once it accepts again it
// is healthy only after rise passed probes.
func TestHealthActiveCheckMarksBlackholedUpstreamDownAndBackUp(t *testing.T) {
	const (
		interval = 200 * time.Millisecond
		timeout  = 300 * time.Millisecond
		rise     = 2
	)
	x, b := listenRaw(t, "127.0.0.1:0"), startNamedBackend(t, "B", "")
	x.accept(t)
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "first"}},
		"connect_timeout": "2s",
		"health_checks": {"active": {"interval": %q, "timeout": %q, "fall": 1, "rise": %d}}}`,
		x.addr, b.addr, interval.String(), timeout.String(), rise))

	// Probes reach X while it accepts.
	for deadline := time.Now().Add(5 * time.Second); x.accepted.Load() < 2; {
		if time.Now().After(deadline) {
			t.Fatalf("X got %d probes in 5s with interval %v", x.accepted.Load(), interval)
		}
		<-time.After(pollEvery)
	}
	if u, _ := upstreamOf(t, hop.admin, x.addr); u.Health != "healthy" {
		t.Fatalf("X accepts probes but is %+v", u)
	}

	held := time.Now()
	x.hold(t)
	down := waitHealth(t, hop.admin, x.addr, "unhealthy", 5*time.Second)
	if took := down.Sub(held); took > interval+timeout+150*time.Millisecond {
		t.Errorf("black-holed X marked unhealthy %v after it stopped accepting, want within interval + timeout = %v", took, interval+timeout)
	} else {
		t.Logf("black-holed X marked unhealthy %v after it stopped accepting (interval + timeout = %v)", took, interval+timeout)
	}
	for i := 0; i < 5; i++ {
		_, _, name, took := mustReach(t, hop.listen)
		if name != "B" || took > 100*time.Millisecond {
			t.Fatalf("client %d with X unhealthy: reached %s after %v", i, name, took)
		}
	}
	if n := getHealthStats(t, hop.admin).DialFailures["connect_timeout"]; n != 0 {
		t.Errorf("clients dialed the unhealthy upstream %d times", n)
	}

	// X's port refuses, then accepts again: healthy after rise probes.
	x.release()
	back := startNamedBackend(t, "X", x.addr)
	backAt := time.Now()
	for deadline := backAt.Add(5 * time.Second); ; {
		u, _ := upstreamOf(t, hop.admin, x.addr)
		probes := back.accepted.Load() // read after the health: at least as many as when it turned
		if u.Health == "healthy" {
			if probes < rise {
				t.Fatalf("X healthy after %d passed probes, want rise = %d", probes, rise)
			}
			if took := time.Since(backAt); took > rise*interval+timeout+150*time.Millisecond {
				t.Errorf("X healthy %v after it accepted again, want within rise × interval + timeout", took)
			}
			break
		}
		if u.Health != "unhealthy" {
			t.Fatalf("X coming back is %+v", u)
		}
		if time.Now().After(deadline) {
			t.Fatalf("X not healthy 5s after it accepted again (%d probes)", probes)
		}
		<-time.After(pollEvery)
	}
	if _, _, name, _ := mustReach(t, hop.listen); name != "X" {
		t.Fatalf("with X healthy again policy first reached %s", name)
	}
	text := metricsText(t, hop.admin)
	for to, want := range map[string]float64{"unhealthy": 1, "healthy": 1} {
		if v, _ := metricValue(text, "caddy_layer4chain_circuit_transitions_total", map[string]string{"upstream": x.addr, "to": to}); v != want {
			t.Errorf("circuit_transitions_total{to=%s,upstream=X} = %v, want %v", to, v, want)
		}
	}
}

// TestHealthActiveProbesPassANextHopThatRequiresProxyHeaders runs active
// checks from a hop that sends PROXY v2 to a next hop that trusts it: the
// probes send a LOCAL header, so the next hop rejects none of them.
func TestHealthActiveProbesPassANextHopThatRequiresProxyHeaders(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	inner := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}],
		"accept_proxy_protocol": {"allow": ["127.0.0.1/32"]}}`, backend.Addr))
	outer := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}],
		"proxy_protocol": "v2",
		"health_checks": {"active": {"interval": "200ms", "timeout": "1s"}}}`, inner.listen))

	const probes = 4
	for deadline := time.Now().Add(5 * time.Second); getHealthStats(t, inner.admin).ConnectionsTotal < probes; {
		if time.Now().After(deadline) {
			t.Fatalf("the next hop saw %d connections in 5s, want %d probes", getHealthStats(t, inner.admin).ConnectionsTotal, probes)
		}
		<-time.After(pollEvery)
	}
	st := getHealthStats(t, inner.admin)
	for reason, n := range st.ProxyProtocolRejected {
		if n != 0 {
			t.Errorf("the next hop rejected %d probes' PROXY headers (%s)", n, reason)
		}
	}
	if n := st.Closed["proxy_protocol_rejected"]; n != 0 {
		t.Errorf("the next hop closed %d probes with proxy_protocol_rejected", n)
	}
	if n := closedWith(inner.proc, "proxy_protocol_rejected"); n != 0 {
		t.Errorf("the next hop logged %d PROXY rejections:\n%s", n, inner.proc.output)
	}
	if u, _ := upstreamOf(t, outer.admin, inner.listen); u.Health != "healthy" {
		t.Errorf("the next hop, as the first hop's upstream: %+v", u)
	}
	c := chaintest.Dial(t, outer.listen)
	if err := echoOnce(c, "through both hops\n"); err != nil {
		t.Fatalf("a client through both hops: %v", err)
	}

	// The control: a trusted peer that connects and sends nothing, as a
	// probe without the LOCAL header would, is rejected and counted.
	raw := chaintest.Dial(t, inner.listen)
	raw.Close()
	for deadline := time.Now().Add(5 * time.Second); ; {
		total := int64(0)
		for _, n := range getHealthStats(t, inner.admin).ProxyProtocolRejected {
			total += n
		}
		if total == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a trusted peer without a header: %d PROXY rejections counted, want 1 (the control of this test)", total)
		}
		<-time.After(pollEvery)
	}
}

// TestHealthCloseIfUnhealthyClosesOnlyThatUpstreamsConnections holds
// connections to two upstreams and takes one down, by active checks and by
// the circuit breaker: its connections are closed with reason
// upstream_unhealthy, the other's keep echoing.
func TestHealthCloseIfUnhealthyClosesOnlyThatUpstreamsConnections(t *testing.T) {
	for _, tc := range []struct{ name, checks string }{
		{"active", `{"active": {"interval": "200ms", "timeout": "300ms", "close_if_unhealthy": true}}`},
		{"passive", `{"passive": {"fail_duration": "30s", "max_fails": 1, "close_if_unhealthy": true}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := startNamedBackend(t, "A", ""), startNamedBackend(t, "B", "")
			hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
				"upstreams": [{"dial": [%q]}, {"dial": [%q]}],
				"load_balancing": {"selection": {"policy": "round_robin"}},
				"health_checks": %s}`, a.addr, b.addr, tc.checks))
			type client struct {
				c net.Conn
				r *bufio.Reader
			}
			held := map[string][]client{}
			for i := 0; i < 4; i++ {
				c, r, name, _ := mustReach(t, hop.listen)
				held[name] = append(held[name], client{c, r})
			}
			if len(held["A"]) == 0 || len(held["B"]) == 0 {
				t.Fatalf("round_robin spread 4 clients as A %d, B %d", len(held["A"]), len(held["B"]))
			}

			a.stopListening() // A refuses new connects; its live connections go on
			if tc.name == "passive" {
				// New clients until one is sent to A, is refused there and
				// fails over: that failure opens A's circuit.
				for i := 0; i < 2; i++ {
					if _, _, name, _ := mustReach(t, hop.listen); name != "B" {
						t.Fatalf("new client after A stopped listening reached %s", name)
					}
				}
			}
			waitHealth(t, hop.admin, a.addr, map[string]string{"active": "unhealthy", "passive": "open"}[tc.name], 5*time.Second)

			for i, cl := range held["A"] {
				got, took, err := chaintest.ReadUntilClosed(cl.c, 3*time.Second)
				if err != nil || len(got) != 0 {
					t.Errorf("client %d of A: got %q, %v after %v; want closed", i, got, err, took)
				}
			}
			waitClosedWith(t, hop.proc, "upstream_unhealthy", len(held["A"]), 5*time.Second)
			for i, cl := range held["B"] {
				if err := echoVia(cl.c, cl.r, fmt.Sprintf("B client %d still here", i)); err != nil {
					t.Errorf("client %d of B after A went down: %v", i, err)
				}
			}
			if n := getHealthStats(t, hop.admin).Closed["upstream_unhealthy"]; n != int64(len(held["A"])) {
				t.Errorf("stats closed.upstream_unhealthy = %d, want %d (A's connections only)", n, len(held["A"]))
			}
			why := map[string]string{"active": "active checks marked it unhealthy: ", "passive": "its circuit opened: "}[tc.name]
			for _, e := range logEntries(hop.proc, "connection closed") {
				if e.Reason == "upstream_unhealthy" && e.Upstream != a.addr {
					t.Errorf("a connection to %s was closed as upstream_unhealthy", e.Upstream)
				}
				if e.Reason == "upstream_unhealthy" && !strings.HasPrefix(e.Detail, why) {
					t.Errorf("an upstream_unhealthy close says %q, want why (%q...)", e.Detail, why)
				}
			}
		})
	}
}

// loadStatus POSTs cfg to the admin endpoint's /load and returns the
// status and body.
func loadStatus(t *testing.T, base, cfg string) (int, string) {
	t.Helper()
	var resp *http.Response
	var err error
	for attempt := 0; ; attempt++ {
		req, _ := http.NewRequest(http.MethodPost, base+"/load", strings.NewReader(cfg))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Cache-Control", "must-revalidate")
		if resp, err = admin.Do(req); err == nil {
			break
		}
		// Each load replaces the admin server; a request that lands in
		// the old listener's queue as it closes is dropped: retry once.
		if attempt > 0 {
			t.Fatal(err)
		}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// mustLoad is loadStatus that fails the test unless the load succeeds.
func mustLoad(t *testing.T, base, cfg string) {
	t.Helper()
	if status, body := loadStatus(t, base, cfg); status != http.StatusOK {
		t.Fatalf("POST /load: %d %s", status, body)
	}
}

// TestHealthStateSurvivesAReloadAndLeavesWithTheUpstream opens a circuit,
// reloads a changed config that still lists the upstream (it stays open,
// clients still skip it) and then one without it (it is no longer listed);
// listed again, it starts healthy.
func TestHealthStateSurvivesAReloadAndLeavesWithTheUpstream(t *testing.T) {
	refused, b := chaintest.RefusedAddr(t), startNamedBackend(t, "B", "")
	handler := func(connectTimeout string, upstreams ...string) string {
		var list []string
		for _, u := range upstreams {
			list = append(list, fmt.Sprintf(`{"dial": [%q]}`, u))
		}
		return fmt.Sprintf(`{"handler": "chain",
			"upstreams": [%s],
			"load_balancing": {"selection": {"policy": "first"}},
			"connect_timeout": %q,
			"health_checks": {"passive": {"fail_duration": "30s", "max_fails": 1}}}`, strings.Join(list, ", "), connectTimeout)
	}
	hop := startHealthHop(t, "", handler("2s", refused, b.addr))
	config := func(h string) string { return hopConfig(hop.admin, hop.listen, "", h) }

	if _, _, name, _ := mustReach(t, hop.listen); name != "B" {
		t.Fatalf("reached %s", name)
	}
	if u, _ := upstreamOf(t, hop.admin, refused); u.Health != "open" {
		t.Fatalf("after its refused dial the upstream is %+v", u)
	}

	mustLoad(t, hop.base(), config(handler("3s", refused, b.addr)))
	u, ok := upstreamOf(t, hop.admin, refused)
	if !ok || u.Health != "open" || u.ConsecutiveFailures != 1 {
		_, raw := upstreams(t, hop.admin)
		t.Fatalf("after a reload that keeps the upstream: %s, want it open with 1 failure", raw)
	}
	if _, _, name, took := mustReach(t, hop.listen); name != "B" || took > 100*time.Millisecond {
		t.Fatalf("after the reload a client reached %s after %v", name, took)
	}
	if n := getHealthStats(t, hop.admin).DialFailures["connect_refused"]; n != 1 {
		t.Errorf("after the reload the open upstream was dialed again: %d refused dials, want 1", n)
	}

	// A config that fails to load, with a new upstream, changes nothing:
	// the circuit stays open and the new upstream is not kept.
	other := chaintest.RefusedAddr(t)
	status, body := loadStatus(t, hop.base(), config(fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}, {"dial": [%q]}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "no_such_policy"}}}`, other, refused, b.addr)))
	if status < 400 || status > 499 {
		t.Fatalf("a config with an unknown policy loaded: %d %s", status, body)
	}
	if list, raw := upstreams(t, hop.admin); len(list) != 2 || list[0].Health == "healthy" && list[1].Health == "healthy" {
		t.Fatalf("after a rejected config: %s, want only the running config's two upstreams, one open", raw)
	}
	if u, _ := upstreamOf(t, hop.admin, refused); u.Health != "open" {
		t.Fatalf("after a rejected config the open upstream is %+v", u)
	}

	mustLoad(t, hop.base(), config(handler("3s", b.addr)))
	if _, ok := upstreamOf(t, hop.admin, refused); ok {
		_, raw := upstreams(t, hop.admin)
		t.Fatalf("after a reload without the upstream it is still listed: %s", raw)
	}
	if _, ok := upstreamOf(t, hop.admin, b.addr); !ok {
		t.Fatal("the upstream still configured is not listed")
	}
	text := metricsText(t, hop.admin)
	if _, ok := metricValue(text, "caddy_layer4chain_upstream_healthy", map[string]string{"upstream": refused}); ok {
		t.Errorf("upstream_healthy still has the removed upstream:\n%s", grepLines(text, "upstream_healthy{"))
	}

	mustLoad(t, hop.base(), config(handler("3s", refused, b.addr)))
	if u, ok := upstreamOf(t, hop.admin, refused); !ok || u.Health != "healthy" || u.ConsecutiveFailures != 0 {
		t.Fatalf("listed again, the released upstream is %+v (listed %v), want a fresh healthy state", u, ok)
	}
}

// TestHealthRejectedConfigLeavesTheRunningLimitsUnchanged runs with the
// app's max_connections 3 and three connections held, then POSTs configs
// that raise the limit to 5 but fail to load: each is refused with a 4xx and
// a fourth connection is still refused. A valid config with 5 then lets it
// in, which shows the check can tell.
func TestHealthRejectedConfigLeavesTheRunningLimitsUnchanged(t *testing.T) {
	backend := startNamedBackend(t, "E", "")
	handler := fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}]}`, backend.addr)
	hop := startHealthHop(t, `, "max_connections": 3`, handler)

	for i := 0; i < 3; i++ {
		c, r, _, _ := mustReach(t, hop.listen)
		if err := echoVia(c, r, "held"); err != nil {
			t.Fatal(err)
		}
	}
	refusedNow := func(when string) {
		t.Helper()
		before := getHealthStats(t, hop.admin).Closed["limit_exceeded"]
		c := chaintest.Dial(t, hop.listen)
		got, took, _ := chaintest.ReadUntilClosed(c, 3*time.Second)
		if len(got) != 0 {
			t.Fatalf("%s: a 4th connection with max_connections 3 got %q", when, got)
		}
		for deadline := time.Now().Add(2 * time.Second); getHealthStats(t, hop.admin).Closed["limit_exceeded"] != before+1; {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the 4th connection closed after %v but was not counted as limit_exceeded", when, took)
			}
			<-time.After(pollEvery)
		}
	}
	refusedNow("before any reload")

	bad := []struct{ name, handler string }{
		{"unknown policy", fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}], "load_balancing": {"selection": {"policy": "no_such_policy"}}}`, backend.addr)},
		{"unknown field", fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}], "no_such_field": 1}`, backend.addr)},
		{"bad health value", fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}], "health_checks": {"active": {"fall": -2}}}`, backend.addr)},
	}
	for round := 0; round < 2; round++ { // Caddy provisions its apps in map order: try each more than once
		for _, cfg := range bad {
			status, body := loadStatus(t, hop.base(), hopConfig(hop.admin, hop.listen, `, "max_connections": 5`, cfg.handler))
			if status < 400 || status > 499 {
				t.Fatalf("a config with %s loaded: %d %s", cfg.name, status, body)
			}
			refusedNow("after a rejected config with " + cfg.name)
		}
	}

	mustLoad(t, hop.base(), hopConfig(hop.admin, hop.listen, `, "max_connections": 5`, handler))
	c, r, _, _ := mustReach(t, hop.listen)
	if err := echoVia(c, r, "fourth"); err != nil {
		t.Fatalf("a 4th connection after a valid config with max_connections 5: %v", err)
	}
}

// TestHealthRejectedConfigKeepsTheMetrics POSTs a config that fails to
// load: the running config goes on, and so must its series on /metrics
// (the connection limit, the upstreams' health). Caddy replaces the admin
// server, and with it the registry /metrics serves, before it provisions
// the new config's apps, and keeps that server when they fail.
func TestHealthRejectedConfigKeepsTheMetrics(t *testing.T) {
	refused, b := chaintest.RefusedAddr(t), startNamedBackend(t, "B", "")
	handler := fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}, {"dial": [%q]}],
		"health_checks": {"passive": {"fail_duration": "30s"}}}`, refused, b.addr)
	hop := startHealthHop(t, `, "max_connections": 3`, handler)
	if _, _, name, _ := mustReach(t, hop.listen); name != "B" {
		t.Fatalf("reached %s", name)
	}
	want := []string{
		"caddy_layer4chain_connection_limit 3",
		fmt.Sprintf(`caddy_layer4chain_upstream_healthy{upstream=%q} 0`, refused),
		fmt.Sprintf(`caddy_layer4chain_circuit_transitions_total{to="open",upstream=%q} 1`, refused),
	}
	check := func(when string) {
		t.Helper()
		text := metricsText(t, hop.admin)
		for _, w := range want {
			if !strings.Contains(text, w) {
				t.Errorf("%s: /metrics has no %s; its caddy_layer4chain_ series:\n%s\n(and %s)", when, w,
					grepLines(text, "caddy_layer4chain_"), grepLines(text, "caddy_config_last_reload_successful "))
				return
			}
		}
	}
	check("before any reload")
	// A config without the app: the handler fails before it would load
	// it, so the new registry never gets the app's collectors (with the
	// app in the config, whether they are there depends on the order
	// Caddy provisions its apps in).
	status, body := loadStatus(t, hop.base(), fmt.Sprintf(`{"admin": {"listen": %q},
		"apps": {"layer4": {"servers": {"hop": {"listen": [%q], "routes": [{"handle": [
			{"handler": "chain", "upstreams": [{"dial": [%q]}], "no_such_field": 1}]}]}}}}}`, hop.admin, hop.listen, b.addr))
	if status < 400 || status > 499 {
		t.Fatalf("a config with an unknown handler field loaded: %d %s", status, body)
	}
	check("after a rejected config")
}

// TestHealthTryDurationWaitsForAnUpstreamToComeBack has every upstream's
// circuit open and try_duration set: a client is held while nothing can be
// dialed, gets through once an upstream is available again within the
// bound, and is closed with no_healthy_upstream when the bound passes.
func TestHealthTryDurationWaitsForAnUpstreamToComeBack(t *testing.T) {
	const coolDown, tryDuration = 300 * time.Millisecond, 1500 * time.Millisecond
	a := startNamedBackend(t, "A", "")
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}],
		"load_balancing": {"try_duration": %q, "try_interval": "50ms"},
		"health_checks": {"passive": {"fail_duration": %q, "max_fails": 1}}}`, a.addr, tryDuration.String(), coolDown.String()))
	a.close()
	c := chaintest.Dial(t, hop.listen)
	start := time.Now()
	waitHealth(t, hop.admin, a.addr, "open", time.Second)

	// The client is still held: A comes back, its cool-down ends, the
	// client's next round dials it as the trial.
	a = startNamedBackend(t, "A", a.addr)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if took := time.Since(start); err != nil || line != "A\n" || took > tryDuration {
		t.Fatalf("held client: %q (%v) after %v, want A's greeting within try_duration %v", line, err, took, tryDuration)
	}
	c.Close()

	// A stops again: the next client opens the circuit and is held for
	// try_duration before it is closed (the cool-down's trial is refused
	// too, and reopens it).
	a.close()
	c = chaintest.Dial(t, hop.listen)
	got, took, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
	if len(got) != 0 || took < tryDuration-100*time.Millisecond || took > tryDuration+500*time.Millisecond {
		t.Fatalf("client with no upstream to come back: %q, closed after %v, want after try_duration %v", got, took, tryDuration)
	}
	waitClosedWith(t, hop.proc, "no_healthy_upstream", 1, 5*time.Second)
}

// TestHealthTriesBeyondTheUpstreamsAreSpacedByTryInterval has one refused
// upstream and tries 4: the same upstream is dialed 4 times, try_interval
// apart, not in a tight loop.
func TestHealthTriesBeyondTheUpstreamsAreSpacedByTryInterval(t *testing.T) {
	refused := chaintest.RefusedAddr(t)
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q]}],
		"load_balancing": {"tries": 4, "try_interval": "100ms"}}`, refused))
	c := chaintest.Dial(t, hop.listen)
	_, took, _ := chaintest.ReadUntilClosed(c, 5*time.Second)
	if took < 280*time.Millisecond || took > time.Second {
		t.Errorf("4 tries on one refused upstream, 100ms apart, took %v; want about 300ms", took)
	}
	waitClosedWith(t, hop.proc, "connect_refused", 1, 5*time.Second)
	if n := getHealthStats(t, hop.admin).DialFailures["connect_refused"]; n != 4 {
		t.Errorf("%d refused dials, want 4 tries", n)
	}
}

// TestHealthFullUpstreamIsSkipped gives the first upstream max_connections
// 1: while it holds a connection the next client goes to the second, and
// once that connection ends the first takes clients again.
func TestHealthFullUpstreamIsSkipped(t *testing.T) {
	a, b := startNamedBackend(t, "A", ""), startNamedBackend(t, "B", "")
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q], "max_connections": 1}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "first"}}}`, a.addr, b.addr))
	first, _, name, _ := mustReach(t, hop.listen)
	if name != "A" {
		t.Fatalf("first client reached %s", name)
	}
	if _, _, name, took := mustReach(t, hop.listen); name != "B" || took > 100*time.Millisecond {
		t.Fatalf("with A full, a client reached %s after %v", name, took)
	}
	if u, _ := upstreamOf(t, hop.admin, a.addr); u.ActiveConnections != 1 || u.Health != "healthy" {
		t.Errorf("full upstream A: %+v, want healthy with 1 active connection", u)
	}
	if v, _ := metricValue(metricsText(t, hop.admin), "caddy_layer4chain_upstream_active_connections", map[string]string{"upstream": a.addr}); v != 1 {
		t.Errorf("upstream_active_connections{upstream=A} = %v, want 1", v)
	}
	first.Close()
	for deadline := time.Now().Add(3 * time.Second); ; {
		if u, _ := upstreamOf(t, hop.admin, a.addr); u.ActiveConnections == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("A's connection did not end after its client closed")
		}
		<-time.After(pollEvery)
	}
	if _, _, name, _ := mustReach(t, hop.listen); name != "A" {
		t.Fatalf("with A free again, a client reached %s", name)
	}
}

// TestHealthWeightedRoundRobinFollowsTheWeights sends 8 clients over
// upstreams of weight 3 and 1: 6 and 2.
func TestHealthWeightedRoundRobinFollowsTheWeights(t *testing.T) {
	a, b := startNamedBackend(t, "A", ""), startNamedBackend(t, "B", "")
	hop := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain",
		"upstreams": [{"dial": [%q], "weight": 3}, {"dial": [%q]}],
		"load_balancing": {"selection": {"policy": "weighted_round_robin"}}}`, a.addr, b.addr))
	count := map[string]int{}
	for i := 0; i < 8; i++ {
		c, _, name, _ := mustReach(t, hop.listen)
		c.Close()
		count[name]++
	}
	if count["A"] != 6 || count["B"] != 2 {
		t.Fatalf("weights 3 and 1 over 8 clients: %v", count)
	}
}
