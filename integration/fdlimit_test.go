package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
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

// TestOverloadUnderALowFileLimitIsRefusedAndTheListenerLives runs Caddy
// with 1024 file descriptors (`ulimit -n 1024`, as many systemd units and
// shells have) and holds 1500 clients through one chain listener. Each
// proxied connection takes two descriptors, so without a limit the process
// runs out of them, and caddy-l4's accept loop returns on EMFILE and never
// accepts on that listener again. The chain's default connection limit,
// derived from RLIMIT_NOFILE, must refuse the overload at admission
// instead: every client is either served or closed, each closed one is
// counted as limit_exceeded, and once the load is gone the same listener
// serves new clients.
func TestOverloadUnderALowFileLimitIsRefusedAndTheListenerLives(t *testing.T) {
	const clients, fileLimit = 1500, 1024
	// This process holds the clients and the backend's side of each served
	// one; Go raised its soft limit to the hard one at start.
	var own syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &own); err != nil || own.Cur < 2*clients+200 {
		t.Skipf("the test needs %d files, it may open %d (%v)", 2*clients+200, own.Cur, err)
	}
	p, hop, adminAddr := startHopUnderFileLimit(t, fileLimit)
	if limits, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", p.cmd.Process.Pid)); err != nil ||
		!strings.Contains(grepLines(string(limits), "Max open files"), fmt.Sprintf(" %d ", fileLimit)) {
		t.Fatalf("caddy does not run under %d files (%v):\n%s", fileLimit, err, limits)
	}
	// The admin endpoint listens before the apps start: wait for all of them.
	p.waitOutput(t, "serving initial configuration", 10*time.Second)
	limit, found := connectionLimit(t, adminAddr)
	if !found {
		t.Error("no caddy_layer4chain_connection_limit metric")
		limit = fileLimit / 2
	} else if limit <= 0 || limit >= fileLimit/3 {
		t.Errorf("caddy_layer4chain_connection_limit is %d under %d files; each connection may take three", limit, fileLimit)
	}
	// The operator sees the same limit, and where it comes from, at start.
	var logged struct {
		MaxConnections int64  `json:"max_connections"`
		Source         string `json:"source"`
		RlimitNofile   int64  `json:"rlimit_nofile"`
	}
	if line := logLine(p, "connection limit"); line == "" {
		t.Error("no connection limit line in the log at start")
	} else if err := json.Unmarshal([]byte(line), &logged); err != nil || logged.MaxConnections != limit ||
		logged.Source != "RLIMIT_NOFILE" || logged.RlimitNofile != fileLimit {
		t.Errorf("the log at start says %s (%v), the metric %d", line, err, limit)
	}

	// Hold the clients open, a few dialers at a time. A client is served
	// (its byte comes back), refused (closed by the hop) or unanswered (the
	// listener no longer accepts); the last must never happen, so stop
	// early once it does.
	var (
		mu              sync.Mutex
		held            []net.Conn
		served, refused int
		unanswered      atomic.Int64
		next            atomic.Int64
		wg              sync.WaitGroup
		firstUnanswered error
	)
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= clients && unanswered.Load() < 20 {
				c, err := net.DialTimeout("tcp", hop, 2*time.Second)
				if err == nil {
					c.SetDeadline(time.Now().Add(2 * time.Second))
					if _, err = c.Write([]byte{'x'}); err == nil {
						_, err = io.ReadFull(c, make([]byte, 1))
					}
					c.SetDeadline(time.Time{})
				}
				mu.Lock()
				switch {
				case err == nil:
					served++
					held = append(held, c)
				case isTimeout(err):
					unanswered.Add(1)
					if firstUnanswered == nil {
						firstUnanswered = fmt.Errorf("after %d served and %d refused: %w", served, refused, err)
					}
					if c != nil {
						c.Close()
					}
				default: // closed or reset by the hop
					refused++
					c.Close()
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	t.Logf("limit %d: %d clients served, %d refused, %d unanswered", limit, served, refused, unanswered.Load())
	if n := unanswered.Load(); n > 0 {
		t.Errorf("%d clients got neither their echo nor a close: the listener stopped accepting (first: %v)", n, firstUnanswered)
	} else if served+refused != clients || refused == 0 || int64(served) > limit {
		t.Errorf("%d clients: %d served, %d refused, under a limit of %d", clients, served, refused, limit)
	}
	s := waitStats(t, adminAddr, func(s hopStats) bool { return s.Closed["limit_exceeded"] >= int64(refused) })
	if s.Closed["limit_exceeded"] != int64(refused) || refused == 0 {
		t.Errorf("%d clients were refused, the hop counts %d as limit_exceeded (closed: %v)", refused, s.Closed["limit_exceeded"], s.Closed)
	}

	// The load is gone: the same listener serves new clients.
	for _, c := range held {
		c.Close()
	}
	held = nil
	waitStats(t, adminAddr, func(s hopStats) bool { return s.ActiveTotal == 0 })
	var failed []string
	for i := 0; i < 10; i++ {
		c, err := net.DialTimeout("tcp", hop, 2*time.Second)
		if err == nil {
			err = echoOnce(c, "after the overload\n")
			c.Close()
		}
		if err != nil {
			failed = append(failed, err.Error())
		}
	}
	if len(failed) > 0 {
		t.Errorf("%d of 10 new clients failed after the overload:\n%s", len(failed), strings.Join(failed, "\n"))
	}
}

// startHopUnderFileLimit runs a Caddy with one chain hop to an echo
// backend under `ulimit -n fileLimit`, which in POSIX sh sets the soft and
// the hard limit, so the Go runtime in Caddy cannot raise its soft limit
// back up at start.
func startHopUnderFileLimit(t *testing.T, fileLimit int) (p *process, hop, adminAddr string) {
	t.Helper()
	backend := chaintest.NewEchoBackend(t)
	hop, adminAddr = freeAddr(t), freeAddr(t)
	path := writeConfig(t, fmt.Sprintf(`{"admin": {"listen": %q},
		"apps": {"layer4": {"servers": {"hop": {"listen": [%q],
			"routes": [{"handle": [{"handler": "chain", "upstreams": [{"dial": [%q]}]}]}]}}}}}`,
		adminAddr, hop, backend.Addr))
	p = startCaddyCommand(t, nil, []string{hop, adminAddr}, "sh", "-c", `ulimit -n `+strconv.Itoa(fileLimit)+` && exec "$0" "$@"`,
		caddyBinary(t), "run", "--config", path)
	return p, hop, adminAddr
}

// logLine returns the first JSON log line of the process with message msg.
func logLine(p *process, msg string) string {
	for _, line := range strings.Split(p.output.String(), "\n") {
		var entry struct {
			Msg string `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Msg == msg {
			return line
		}
	}
	return ""
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// waitStats polls the hop's stats until done accepts them (or 10s pass)
// and returns the last.
func waitStats(t *testing.T, adminAddr string, done func(hopStats) bool) hopStats {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := stats(t, adminAddr)
		if done(s) || time.Now().After(deadline) {
			return s
		}
		<-time.After(50 * time.Millisecond) // another process's state: polled through its admin API
	}
}

// connectionLimit reads caddy_layer4chain_connection_limit from the admin
// endpoint's /metrics.
func connectionLimit(t *testing.T, adminAddr string) (limit int64, found bool) {
	t.Helper()
	resp, err := admin.Get("http://" + adminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == "caddy_layer4chain_connection_limit" {
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				t.Fatalf("caddy_layer4chain_connection_limit %q: %v", f[1], err)
			}
			return int64(v), true
		}
	}
	return 0, false
}

// TestAConnectBurstUnderALowFileLimitLeavesTheListenerServing sends a burst
// of connects at once to a Caddy with few file descriptors: Caddy accepts
// them faster than its handlers refuse them, the accepted sockets exhaust
// the file limit, and caddy-l4's accept loop returns on EMFILE for good.
// The app must notice the listener whose queue no longer drains and accept
// on it itself: once the burst is gone, new clients are served.
func TestAConnectBurstUnderALowFileLimitLeavesTheListenerServing(t *testing.T) {
	const fileLimit, dialers, perDialer = 256, 8, 150
	p, hop, adminAddr := startHopUnderFileLimit(t, fileLimit)
	p.waitOutput(t, "serving initial configuration", 10*time.Second)

	// The burst: every dialer connects as fast as it can, sends a byte
	// and keeps the connection, served or not, until all have dialed.
	var (
		mu   sync.Mutex
		held []net.Conn
		wg   sync.WaitGroup
	)
	for range dialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perDialer {
				c, err := net.DialTimeout("tcp", hop, time.Second)
				if err != nil {
					continue // the backlog is full
				}
				c.Write([]byte{'x'})
				mu.Lock()
				held = append(held, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, c := range held {
		c.Close()
	}
	t.Logf("%d of %d connects completed", len(held), dialers*perDialer)

	// Once the burst is gone, new clients are served, by caddy-l4's accept
	// loop or by the rescue of its listener.
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", hop, time.Second)
		if err == nil {
			err = echoOnce(c, "after the burst\n")
			c.Close()
		}
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new client served within 15 s of the burst: %v\n%s", err, grepLines(p.output.String(), "error"))
		}
	}
	if line := logLine(p, "a layer4 listener's accept queue held connections at three checks in a row: caddy-l4's accept loop has ended (it ends on an accept error, EMFILE when the process runs out of file descriptors) or cannot keep up; layer4chain accepts on it too, until the config is reloaded; if the process ran out of descriptors, raise the file limit (ulimit -n, LimitNOFILE)"); line != "" {
		t.Logf("rescued: %s", line)
	}
	waitStats(t, adminAddr, func(s hopStats) bool { return s.ActiveTotal == 0 })
}

// TestABurstCaddyKeepsUpWithRaisesNoRescue: with file descriptors to spare,
// a connect burst fills the accept queue for a moment and caddy-l4's own
// loop works through it; however short the sweep interval, the listener
// watch must not take that listener for dead.
func TestABurstCaddyKeepsUpWithRaisesNoRescue(t *testing.T) {
	const dialers, perDialer = 16, 250
	backend := chaintest.NewEchoBackend(t)
	hop, adminAddr := freeAddr(t), freeAddr(t)
	path := writeConfig(t, fmt.Sprintf(`{"admin": {"listen": %q},
		"apps": {
			"layer4chain": {"sweep_interval": "100ms"},
			"layer4": {"servers": {"hop": {"listen": [%q],
				"routes": [{"handle": [{"handler": "chain", "upstreams": [{"dial": [%q]}]}]}]}}}}}`,
		adminAddr, hop, backend.Addr))
	// One thread of work: Caddy falls behind the burst for a while.
	p := startCaddyEnv(t, []string{"GOMAXPROCS=1"}, []string{hop, adminAddr}, "--config", path)
	var (
		mu   sync.Mutex
		held []net.Conn
		wg   sync.WaitGroup
	)
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range dialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perDialer {
				if c, err := net.DialTimeout("tcp", hop, 2*time.Second); err == nil {
					mu.Lock()
					held = append(held, c)
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	// Every connection reaches the hop, then four seconds of sweeps
	// (forty checks' worth at this interval, four of the watch's) pass.
	waitStats(t, adminAddr, func(s hopStats) bool { return s.ActiveTotal == int64(len(held)) })
	from := stats(t, adminAddr).Sweeps
	waitStats(t, adminAddr, func(s hopStats) bool { return s.Sweeps >= from+40 })
	if line := grepLines(p.output.String(), "a layer4 listener's accept queue held connections"); line != "" {
		t.Errorf("a burst Caddy kept up with was taken for a dead listener:\n%s", line)
	}
}
