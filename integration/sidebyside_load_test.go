package integration

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// The load BenchmarkSideBySide puts on each proxy, and the backends behind
// it. Everything here runs in the test process, on the load generator's
// CPU. Each load is bounded in bytes or connections and in time.
const (
	bulkStreams     = 4
	bulkStreamBytes = 256 << 20
	bulkChunk       = 256 << 10
	bulkDuration    = 4 * time.Second // at most, each way: a slow proxy moves fewer bytes
	connWorkers     = 8
	connDuration    = 3 * time.Second
	connMax         = 200_000 // per run, whatever the rate
	pingDuration    = 2 * time.Second
	idleConnsWanted = 4000
	ioTimeout       = 5 * time.Second // one dial
)

// benchBackends are the servers behind a proxy: one that discards what it
// reads (uploads), one that sends bulkStreamBytes and closes (downloads),
// and one that echoes.
type benchBackends struct {
	sink, source, echo *chaintest.Backend
}

func newBenchBackends(b *testing.B) benchBackends {
	return benchBackends{
		sink: chaintest.NewBackend(b, func(c *net.TCPConn) {
			buf := make([]byte, bulkChunk)
			for {
				if _, err := c.Read(buf); err != nil {
					return
				}
			}
		}),
		source: chaintest.NewBackend(b, func(c *net.TCPConn) {
			buf := make([]byte, bulkChunk)
			for sent := 0; sent < bulkStreamBytes; sent += len(buf) {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}),
		echo: chaintest.NewEchoBackend(b),
	}
}

// upstreams lists the backends in the order startFunc routes them.
func (bb benchBackends) upstreams() []string {
	return []string{bb.sink.Addr, bb.source.Addr, bb.echo.Addr}
}

func (bb benchBackends) close() {
	bb.sink.Close()
	bb.source.Close()
	bb.echo.Close()
}

// bulk runs bulkStreams streams at once through addr, each moving
// bulkStreamBytes or what it can within bulkDuration: up writes and then
// waits for the sink's close (which comes after it read everything), down
// reads from the source. It returns the bytes moved and the time from the
// first dial to the end of the last stream.
func bulk(addr string, up bool) (int64, time.Duration, error) {
	start := time.Now()
	stop := start.Add(bulkDuration)
	type result struct {
		n   int64
		err error
	}
	results := make(chan result, bulkStreams)
	for range bulkStreams {
		go func() {
			c, err := net.DialTimeout("tcp", addr, ioTimeout)
			if err != nil {
				results <- result{0, err}
				return
			}
			defer c.Close()
			c.SetDeadline(stop.Add(ioTimeout))
			buf := make([]byte, bulkChunk)
			var n int64
			if up {
				for n < bulkStreamBytes && time.Now().Before(stop) {
					if _, err := c.Write(buf); err != nil {
						results <- result{n, fmt.Errorf("upload after %d bytes: %w", n, err)}
						return
					}
					n += bulkChunk
				}
				c.(*net.TCPConn).CloseWrite()
				if _, err := c.Read(buf); err != io.EOF {
					results <- result{n, fmt.Errorf("upload: the sink's close: %v", err)}
					return
				}
				results <- result{n, nil}
				return
			}
			for n < bulkStreamBytes && time.Now().Before(stop) {
				m, err := c.Read(buf)
				n += int64(m)
				if err != nil {
					results <- result{n, fmt.Errorf("download after %d bytes: %w", n, err)}
					return
				}
			}
			results <- result{n, nil}
		}()
	}
	var total int64
	var first error
	for range bulkStreams {
		r := <-results
		total += r.n
		if r.err != nil && first == nil {
			first = r.err
		}
	}
	return total, time.Since(start), first
}

// connectEcho runs connWorkers workers for connDuration, each in a loop:
// connect to addr, have one byte echoed, close. It returns the completed
// connections, the failed ones and the first failure.
func connectEcho(addr string) (done, failed int, first error, elapsed time.Duration) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	end := start.Add(connDuration)
	for range connWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var ok, bad int
			var firstErr error
			for i := 0; i < connMax/connWorkers && time.Now().Before(end); i++ {
				c, err := net.DialTimeout("tcp", addr, ioTimeout)
				if err == nil {
					err = echoOnce(c, "x")
					c.Close()
				}
				if err != nil {
					bad++
					if firstErr == nil {
						firstErr = err
					}
					continue
				}
				ok++
			}
			mu.Lock()
			done, failed = done+ok, failed+bad
			if first == nil {
				first = firstErr
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	return done, failed, first, time.Since(start)
}

// pingPong exchanges one byte at a time over one connection to addr for
// pingDuration and returns the exchanges per second.
func pingPong(addr string) (float64, error) {
	c, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	start := time.Now()
	n := 0
	for time.Since(start) < pingDuration {
		if err := echoOnce(c, "x"); err != nil {
			return 0, fmt.Errorf("after %d exchanges: %w", n, err)
		}
		n++
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// holdIdle opens n connections to addr, has one byte echoed on each and
// keeps them open; the caller closes them.
func holdIdle(addr string, n int) ([]net.Conn, error) {
	held := make([]net.Conn, 0, n)
	for range n {
		c, err := net.DialTimeout("tcp", addr, ioTimeout)
		if err == nil {
			if err = echoOnce(c, "x"); err != nil {
				c.Close()
			}
		}
		if err != nil {
			closeAll(held)
			return nil, fmt.Errorf("idle connection %d of %d: %w", len(held)+1, n, err)
		}
		c.SetDeadline(time.Time{})
		held = append(held, c)
	}
	return held, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}
