package layer4chain

import (
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// sinkBackend reads and discards everything, then closes.
func sinkBackend(b *testing.B) *chaintest.Backend {
	return chaintest.NewBackend(b, func(c *net.TCPConn) {
		_, _ = io.Copy(io.Discard, struct{ io.Reader }{c})
	})
}

// ioCopyHop is the baseline: the usual Go proxy, io.Copy both ways between
// *net.TCPConn (splice on Linux).
func ioCopyHop(b *testing.B, upstream string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				up, err := net.Dial("tcp", upstream)
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{})
				go func() { _, _ = io.Copy(c, up); close(done) }()
				_, _ = io.Copy(up, c)
				_ = up.(*net.TCPConn).CloseWrite()
				<-done
			}()
		}
	}()
	b.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// upload sends size bytes through addr and waits for the far end to close.
func upload(b *testing.B, addr string, size int) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	for sent := 0; sent < size; sent += len(buf) {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	_ = c.(*net.TCPConn).CloseWrite()
	_, _ = io.Copy(io.Discard, c)
}

// BenchmarkUploadThroughput moves 64 MiB per iteration from a client to a
// discarding backend: directly, through the io.Copy baseline, and through
// the chain pipe. Compare the MB/s columns; run with -cpu 1 for the
// one-core figures the targets are stated in.
func BenchmarkUploadThroughput(b *testing.B) {
	const size = 64 << 20
	for _, tc := range []struct {
		name string
		hop  func(b *testing.B, upstream string) string
	}{
		{"direct", func(b *testing.B, upstream string) string { return upstream }},
		{"io_copy", ioCopyHop},
		{"chain", func(b *testing.B, upstream string) string {
			return startHop(b, &Proxy{Balancer: balancerFor(b, upstream)}, nil).Addr
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			addr := tc.hop(b, sinkBackend(b).Addr)
			b.SetBytes(size)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				upload(b, addr, size)
			}
			b.ReportMetric(float64(size)*8*float64(b.N)/b.Elapsed().Seconds()/1e9, "Gbit/s")
		})
	}
}

// BenchmarkConnectionsPerSecond opens a connection through the hop, moves
// one small exchange, and closes it: the set-up path (admit, dial, header,
// established, close) with its allocations per connection, the client's
// and the backend's included (compare with io_copy for the floor).
func BenchmarkConnectionsPerSecond(b *testing.B) {
	for _, tc := range []struct {
		name string
		hop  func(b *testing.B, upstream string) string
	}{
		{"io_copy", ioCopyHop},
		{"chain", func(b *testing.B, upstream string) string {
			return startHop(b, &Proxy{Balancer: balancerFor(b, upstream)}, nil).Addr
		}},
		{"chain_detached", func(b *testing.B, upstream string) string {
			return startDetachedHop(b, &Proxy{Balancer: balancerFor(b, upstream)}).Addr
		}},
		// Two hops, the first sending PROXY v2 and the second accepting it
		// from loopback: the whole set-up path, header included.
		{"chain_2hops_proxy_v2", func(b *testing.B, upstream string) string {
			inner := startDetachedHop(b, &Proxy{Balancer: balancerFor(b, upstream),
				Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}})
			return startDetachedHop(b, &Proxy{Balancer: balancerFor(b, inner.Addr), EmitVersion: 2}).Addr
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			addr := tc.hop(b, chaintest.NewEchoBackend(b).Addr)
			msg := []byte("ping")
			got := make([]byte, 4)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				chaintest.EchoRound(b, addr, msg, got)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
		})
	}
}

// BenchmarkIdleConnectionMemory holds 2,000 idle proxied connections and
// reports the Go heap and goroutine stacks they cost per connection on the
// proxy side. Clients and backends run in the same process, so their share
// is measured without the proxy first and subtracted. (Kernel socket
// buffers are not counted: they are not the process's RSS either.)
func BenchmarkIdleConnectionMemory(b *testing.B) {
	const n = 2000
	type cost struct{ heap, stack float64 }
	measure := func(b *testing.B, addr string, backend *chaintest.Backend, settle func(n int)) cost {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		conns := make([]net.Conn, 0, n)
		one := make([]byte, 1)
		for i := 0; i < n; i++ {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := c.Write(one); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, one); err != nil {
				b.Fatal(err)
			}
			conns = append(conns, c)
		}
		settle(n)
		runtime.GC()
		runtime.ReadMemStats(&after)
		for _, c := range conns {
			c.Close()
		}
		backend.WaitIdle()
		return cost{
			heap:  float64(int64(after.HeapInuse)-int64(before.HeapInuse)) / n,
			stack: float64(int64(after.StackInuse)-int64(before.StackInuse)) / n,
		}
	}
	parked := func(n int) {
		// Wait until the quiet connections' upstream directions parked.
		for deadline := time.Now().Add(10 * time.Second); parkedCount() < n && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
	}
	for _, tc := range []struct {
		name   string
		hop    func(b *testing.B, p *Proxy) *hop
		settle func(n int)
	}{
		{"serve", func(b *testing.B, p *Proxy) *hop { return startHop(b, p, nil) }, func(int) {}},
		{"detached", func(b *testing.B, p *Proxy) *hop { return startDetachedHop(b, p) }, parked},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				backend := chaintest.NewEchoBackend(b)
				none := func(int) {}
				measure(b, backend.Addr, backend, none) // warm up pools and the runtime's free lists
				direct := measure(b, backend.Addr, backend, none)
				tr := NewTracker()
				h := tc.hop(b, &Proxy{Tracker: tr, Balancer: balancerFor(b, backend.Addr), parkAfter: 20 * time.Millisecond})
				measure(b, h.Addr, backend, tc.settle) // the proxy's own pools and free lists
				<-tr.Empty()
				proxied := measure(b, h.Addr, backend, tc.settle)
				<-tr.Empty()
				b.ReportMetric(proxied.heap-direct.heap, "heap-B/idle-conn")
				b.ReportMetric(proxied.stack-direct.stack, "stack-B/idle-conn")
			}
		})
	}
}

func newEchoForBench(b *testing.B) string { return chaintest.NewEchoBackend(b).Addr }

func dialForBench(b *testing.B, addr string) net.Conn {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	return c
}
