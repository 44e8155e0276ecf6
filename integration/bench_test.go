package integration

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// proxyUnderTest is a Caddy process running one layer4 proxy handler on
// one core, in front of a backend run by the benchmark.
type proxyUnderTest struct {
	name string
	addr string
	pid  int
}

// startProxyProcess runs Caddy with GOMAXPROCS=1 and one layer4 server
// whose handler is handlerJSON (with the upstream address filled in).
func startProxyProcess(b *testing.B, name, handlerJSON, upstream string) proxyUnderTest {
	addr, adminAddr := freeAddr(b), freeAddr(b)
	cfg := fmt.Sprintf(`{"admin": {"listen": %q},
		"logging": {"logs": {"default": {"level": "ERROR"}}},
		"apps": {"layer4": {"servers": {"s": {"listen": [%q],
			"routes": [{"handle": [%s]}]}}}}}`, adminAddr, addr, fmt.Sprintf(handlerJSON, upstream))
	path := filepath.Join(b.TempDir(), name+".json")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	p := startCaddyEnv(b, []string{"GOMAXPROCS=1"}, []string{addr}, "--config", path)
	return proxyUnderTest{name: name, addr: addr, pid: p.cmd.Process.Pid}
}

// benchBackend is a discarding (sink) or echoing backend.
func benchBackend(b *testing.B, echo bool) string {
	if echo {
		return chaintest.NewEchoBackend(b).Addr
	}
	return chaintest.NewBackend(b, func(c *net.TCPConn) { io.Copy(io.Discard, struct{ io.Reader }{c}) }).Addr
}

func rssKiB(b testing.TB, pid int) int {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

const (
	l4Proxy = `{"handler": "proxy", "upstreams": [{"dial": [%q]}]}`
	l4Chain = `{"handler": "chain", "upstreams": [{"dial": [%q]}]}`
)

// BenchmarkSideBySide compares caddy-l4's proxy handler and chain, each in
// its own Caddy process limited to one core (GOMAXPROCS=1): upload
// throughput, connections per second, and resident memory per idle proxied
// connection. The ratio metrics are chain over proxy. Run with
// -benchtime 1x; each figure is one measurement of a fixed amount of work.
func BenchmarkSideBySide(b *testing.B) {
	sink, echo := benchBackend(b, false), benchBackend(b, true)
	type figures struct{ gbps, connsPerSec, idleKiB float64 }
	measure := func(handler string) figures {
		up := startProxyProcess(b, "up", handler, sink)
		ec := startProxyProcess(b, "echo", handler, echo)
		var f figures

		const size = 512 << 20
		start := time.Now()
		c, err := net.Dial("tcp", up.addr)
		if err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 256<<10)
		for sent := 0; sent < size; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
		c.Close()
		f.gbps = float64(size) * 8 / time.Since(start).Seconds() / 1e9

		// Connections per second: 16 clients at once, each opening a
		// connection, exchanging one byte and closing, 400 times.
		const clients, perClient = 16, 400
		start = time.Now()
		var wg sync.WaitGroup
		for k := 0; k < clients; k++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := make([]byte, 1)
				for i := 0; i < perClient; i++ {
					c, err := net.Dial("tcp", ec.addr)
					if err != nil {
						continue
					}
					c.Write(b)
					io.ReadFull(c, b)
					c.Close()
				}
			}()
		}
		wg.Wait()
		f.connsPerSec = clients * perClient / time.Since(start).Seconds()

		one := make([]byte, 1)

		const idle = 2000
		before := rssKiB(b, ec.pid)
		held := make([]net.Conn, 0, idle)
		for i := 0; i < idle; i++ {
			c, err := net.Dial("tcp", ec.addr)
			if err != nil {
				b.Fatal(err)
			}
			c.Write(one)
			io.ReadFull(c, one)
			held = append(held, c)
		}
		time.Sleep(time.Second) // let the process settle before reading its RSS
		f.idleKiB = float64(rssKiB(b, ec.pid)-before) / idle
		for _, c := range held {
			c.Close()
		}
		return f
	}
	for i := 0; i < b.N; i++ {
		proxy, chain := measure(l4Proxy), measure(l4Chain)
		b.ReportMetric(proxy.gbps, "proxy-Gbit/s")
		b.ReportMetric(chain.gbps, "chain-Gbit/s")
		b.ReportMetric(chain.gbps/proxy.gbps, "upload-ratio")
		b.ReportMetric(proxy.connsPerSec, "proxy-conns/s")
		b.ReportMetric(chain.connsPerSec, "chain-conns/s")
		b.ReportMetric(chain.connsPerSec/proxy.connsPerSec, "conns-ratio")
		b.ReportMetric(proxy.idleKiB, "proxy-KiB/idle-conn")
		b.ReportMetric(chain.idleKiB, "chain-KiB/idle-conn")
	}
}
