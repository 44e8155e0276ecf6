package integration

// The field reports in ../shared/seeds/ replayed across a two-hop chain of
// real Caddy processes: connections piling up on one hop when clients leave
// during backend setup, a refused backend crashing the proxy, and
// half-open, long-lived streams cut too early.

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// chain is an outer and an inner Caddy process, each with its admin API.
type chain struct {
	outer, outerAdmin, innerAdmin string
	procs                         []*process
}

// startChain runs client → outer → inner → backend as two processes. The
// inner hop's chain handler gets extra JSON fields (timeouts).
func startChain(t *testing.T, backend string, innerExtra string) *chain {
	c := &chain{outer: freeAddr(t), outerAdmin: freeAddr(t), innerAdmin: freeAddr(t)}
	inner := freeAddr(t)
	write := func(name, cfg string) string {
		path := filepath.Join(t.TempDir(), name+".json")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	innerCfg := write("inner", fmt.Sprintf(`{"admin": {"listen": %q},
		"apps": {"layer4chain": {"sweep_interval": "100ms"},
		"layer4": {"servers": {"inner": {"listen": [%q], "routes": [{"handle": [{"handler": "chain",
			"upstreams": [{"dial": [%q]}], "accept_proxy_protocol": {"allow": ["127.0.0.1/32"]} %s}]}]}}}}}`,
		c.innerAdmin, inner, backend, innerExtra))
	outerCfg := write("outer", fmt.Sprintf(`{"admin": {"listen": %q},
		"apps": {"layer4chain": {"sweep_interval": "100ms"},
		"layer4": {"servers": {"outer": {"listen": [%q], "routes": [{"handle": [{"handler": "chain",
			"upstreams": [{"dial": [%q]}], "proxy_protocol": "v2" %s}]}]}}}}}`,
		c.outerAdmin, c.outer, inner, innerExtra))
	c.procs = append(c.procs, startCaddy(t, []string{inner, c.innerAdmin}, "--config", innerCfg))
	c.procs = append(c.procs, startCaddy(t, []string{c.outer, c.outerAdmin}, "--config", outerCfg))
	return c
}

type hopStats struct {
	ActiveTotal      int64            `json:"active_total"`
	ConnectionsTotal int64            `json:"connections_total"`
	Closed           map[string]int64 `json:"closed"`
	DialFailures     map[string]int64 `json:"dial_failures"`
	ZombiesReaped    int64            `json:"zombies_reaped"`
	Sweeps           int64            `json:"sweeps"`
}

func stats(t *testing.T, adminAddr string) hopStats {
	t.Helper()
	resp, err := admin.Get("http://" + adminAddr + "/layer4chain/stats")
	if err != nil {
		t.Fatalf("stats of %s: %v", adminAddr, err)
	}
	defer resp.Body.Close()
	var s hopStats
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

// waitDrained waits until neither hop holds a connection, and checks that
// neither reaped a zombie nor exited.
func (c *chain) waitDrained(t *testing.T, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		o, i := stats(t, c.outerAdmin), stats(t, c.innerAdmin)
		if o.ActiveTotal == 0 && i.ActiveTotal == 0 {
			if o.ZombiesReaped+i.ZombiesReaped != 0 {
				t.Fatalf("zombies reaped: outer %d, inner %d", o.ZombiesReaped, i.ZombiesReaped)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v the outer hop still holds %d connections and the inner %d", within, o.ActiveTotal, i.ActiveTotal)
		}
		<-time.After(50 * time.Millisecond) // another process's state: polled through its admin API
	}
	for _, p := range c.procs {
		select {
		case <-p.exited:
			t.Fatalf("a hop exited:\n%s", p.output)
		default:
		}
	}
}

// Seed 000: clients that leave while the backend connection is being set
// up must not leave records behind on any hop.
func TestSeedClientsLeavingDuringBackendSetupLeaveNothingOnEitherHop(t *testing.T) {
	c := startChain(t, chaintest.BlackholeAddr(t), `, "connect_timeout": "500ms"`)
	for i := 0; i < 150; i++ {
		conn, err := net.Dial("tcp", c.outer)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte("hello"))
		if i%3 == 0 {
			conn.(*net.TCPConn).SetLinger(0)
		}
		conn.Close()
	}
	c.waitDrained(t, 5*time.Second)
	if n := stats(t, c.innerAdmin).DialFailures["connect_timeout"]; n == 0 {
		t.Fatal("the inner hop counted no connect_timeout dial failure")
	}
}

// Seed 000, the busy case: many short connections through a working chain.
func TestSeedRapidConnectionsThroughTheChainLeaveNothing(t *testing.T) {
	c := startChain(t, chaintest.NewEchoBackend(t).Addr, "")
	one := make([]byte, 1)
	for i := 0; i < 500; i++ {
		conn, err := net.Dial("tcp", c.outer)
		if err != nil {
			t.Fatal(err)
		}
		switch i % 3 {
		case 0:
			conn.(*net.TCPConn).SetLinger(0)
		case 1:
			conn.Write(one)
			conn.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, err := io.ReadFull(conn, one); err != nil {
				t.Fatalf("echo through the chain: %v", err)
			}
		}
		conn.Close()
	}
	c.waitDrained(t, 5*time.Second)
}

// Seed 002: a refused backend closes each client promptly and never takes
// a hop down.
func TestSeedRefusedBackendNeverCrashesTheChain(t *testing.T) {
	c := startChain(t, chaintest.RefusedAddr(t), "")
	for i := 0; i < 100; i++ {
		conn, err := net.Dial("tcp", c.outer)
		if err != nil {
			t.Fatalf("connection %d: the outer hop stopped accepting: %v", i, err)
		}
		conn.Write([]byte("x"))
		got, elapsed, _ := chaintest.ReadUntilClosed(conn, 3*time.Second)
		conn.Close()
		if len(got) != 0 || elapsed > time.Second {
			t.Fatalf("connection %d: got %q, closed after %v", i, got, elapsed)
		}
	}
	c.waitDrained(t, 5*time.Second)
	if n := stats(t, c.innerAdmin).DialFailures["connect_refused"]; n != 100 {
		t.Fatalf("the inner hop counted %d refused dials, want 100", n)
	}
}

// Seed 001: a half-open connection whose remaining direction streams for
// longer than half_close_timeout is not cut, on either hop.
func TestSeedHalfOpenLongLivedStreamSurvivesBothHops(t *testing.T) {
	const chunks = 20
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		if _, err := io.ReadAll(c); err != nil {
			return
		}
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < chunks; i++ {
			<-tick.C
			if _, err := c.Write([]byte{'s'}); err != nil {
				return
			}
		}
	})
	c := startChain(t, backend.Addr, `, "half_close_timeout": "300ms"`)
	conn, err := net.Dial("tcp", c.outer)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "request")
	conn.(*net.TCPConn).CloseWrite()
	got, elapsed, err := chaintest.ReadUntilClosed(conn, 10*time.Second)
	if err != nil || len(got) != chunks || elapsed < 900*time.Millisecond {
		t.Fatalf("stream: %d of %d chunks in %v (%v)", len(got), chunks, elapsed, err)
	}
	c.waitDrained(t, 5*time.Second)
	for _, a := range []string{c.outerAdmin, c.innerAdmin} {
		if n := stats(t, a).Closed["half_close_timeout"]; n != 0 {
			t.Fatalf("hop %s cut %d live half-open streams", a, n)
		}
	}
}
