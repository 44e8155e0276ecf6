package integration

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkSideBySide measures chain next to caddy-l4's proxy, HAProxy and
// nginx (when installed) and two floors, each proxy pinned alone to one
// CPU with one thread of work, the load generator and backends (this test
// process) on another, over loopback. It prints one table (see the
// README's Benchmarks section) with ratios and the targets of issue 12,
// and reports chain's figures as metrics for benchstat. Run it with
// -benchtime 1x: one call measures everything once, whatever b.N.
//
//	go test -run '^$' -bench SideBySide -benchtime 1x ./integration
func BenchmarkSideBySide(b *testing.B) {
	s := &sideBySide{pin: pinLoadGenerator(b), idleConns: idleConnsFor(b), loadStart: loadAverage()}
	rows := s.contenders(b)
	results := make([]figures, len(rows))
	for i, c := range rows {
		if c.missing == "" {
			results[i] = s.measure(b, c)
		}
	}
	b.StopTimer()
	t := table{s: s, rows: rows, results: results}
	fmt.Print(t.String())
	t.report(b)
}

// idleConnsFor is how many idle connections the memory figures hold:
// idleConnsWanted, or fewer where the open-file limit would not let this
// process (a client and a backend socket per connection) or a proxy (two
// sockets) hold them with room to spare.
func idleConnsFor(b *testing.B) int {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		b.Fatalf("getrlimit: %v", err)
	}
	return int(min(idleConnsWanted, (int64(lim.Max)-1000)/3))
}

// figures are one row's measurements; NaN is "not measured".
type figures struct {
	upGbps, downGbps float64
	cpuPerGiB        float64 // CPU seconds per GiB moved, both directions together
	connsPerSec      float64
	cpuMsPerConn     float64
	busyProxy        float64 // share of a CPU the proxy used during the connection load
	busyLoad         float64 // same for the load generator and backends
	idleProxyCPU     float64 // share of that time the proxies' CPU was idle: what no process used
	idleKiB, fds     []float64
	pingPong         float64
	notes            []string
}

func notMeasured() figures {
	nan := math.NaN()
	return figures{upGbps: nan, downGbps: nan, cpuPerGiB: nan, connsPerSec: nan, cpuMsPerConn: nan,
		busyProxy: nan, busyLoad: nan, idleProxyCPU: nan, pingPong: nan}
}

func (f *figures) note(format string, args ...any) {
	f.notes = append(f.notes, fmt.Sprintf(format, args...))
}

// measure runs the loads on one contender: bulk transfer, connection rate
// and ping-pong on one start of it, idle connections on a fresh one, so
// that the garbage of the other loads does not hide in its memory.
func (s *sideBySide) measure(b *testing.B, c contender) figures {
	f := notMeasured()
	backends := newBenchBackends(b)
	defer backends.close()
	run := c.start(b, backends.upstreams())
	sink, source, echo := run.addrs[0], run.addrs[1], run.addrs[2]

	if !c.echoes && !c.twoHops {
		cpu := cpuTicks(run.pids())
		upBytes, upTime, err := bulk(sink, true)
		if err != nil {
			f.note("upload failed: %v", err)
		}
		downBytes, downTime, err2 := bulk(source, false)
		if err2 != nil {
			f.note("download failed: %v", err2)
		}
		if err == nil && err2 == nil {
			f.upGbps = float64(upBytes) * 8 / 1e9 / upTime.Seconds()
			f.downGbps = float64(downBytes) * 8 / 1e9 / downTime.Seconds()
			if len(run.hops) > 0 {
				f.cpuPerGiB = ticksToSeconds(cpuTicks(run.pids())-cpu) / (float64(upBytes+downBytes) / (1 << 30))
			}
		}
	}

	cpu, self, proxyCPU := cpuTicks(run.pids()), cpuTicks([]int{os.Getpid()}), readCPUTimes(s.pin.proxy)
	done, failed, first, elapsed := connectEcho(echo)
	f.idleProxyCPU = readCPUTimes(s.pin.proxy).idleSince(proxyCPU)
	if failed > 0 {
		f.note("%d of %d connections failed, the first: %v", failed, done+failed, first)
	}
	f.connsPerSec = float64(done) / elapsed.Seconds()
	f.busyLoad = ticksToSeconds(cpuTicks([]int{os.Getpid()})-self) / elapsed.Seconds()
	if len(run.hops) > 0 && done > 0 {
		used := ticksToSeconds(cpuTicks(run.pids()) - cpu)
		f.cpuMsPerConn = used * 1000 / float64(done)
		f.busyProxy = used / elapsed.Seconds()
	}

	if !c.twoHops {
		if rate, err := pingPong(echo); err != nil {
			f.note("ping-pong failed: %v", err)
		} else {
			f.pingPong = rate
		}
	}
	run.stop()

	if len(run.hops) > 0 {
		fresh := c.start(b, []string{backends.echo.Addr})
		f.idleKiB, f.fds = s.idle(b, fresh, &f)
		fresh.stop()
	}
	return f
}

func ticksToSeconds(ticks int64) float64 { return float64(ticks) / clockTicksPerSecond }

// idle opens s.idleConns connections through a freshly started contender,
// each with one byte echoed, and returns for each hop the growth of its
// resident memory (KiB) and of its open descriptors per connection. Before
// and after, it waits until every hop's memory and descriptors are steady;
// a chain hop must also list every connection as established.
func (s *sideBySide) idle(b *testing.B, run started, f *figures) (kib, fds []float64) {
	addr := run.addrs[0]
	// Warm up: the first connections set up what every later one shares.
	warm, err := holdIdle(addr, 20)
	if err != nil {
		f.note("idle: %v", err)
		return nil, nil
	}
	closeAll(warm)
	for _, h := range run.hops {
		if h.admin != "" {
			awaitChainActive(b, h.admin, 0, f)
		}
	}
	before := make([]steady, len(run.hops))
	for i, h := range run.hops {
		before[i] = settle(h.pids(), f)
	}
	held, err := holdIdle(addr, s.idleConns)
	if err != nil {
		f.note("idle: %v", err)
		return nil, nil
	}
	defer closeAll(held)
	for i, h := range run.hops {
		if h.admin != "" {
			awaitChainActive(b, h.admin, s.idleConns, f)
		}
		after := settle(h.pids(), f)
		n := float64(s.idleConns)
		kib = append(kib, float64(after.rss-before[i].rss)/n)
		fds = append(fds, float64(after.fds-before[i].fds)/n)
	}
	return kib, fds
}

// steady is a process's memory and descriptors once they stopped moving.
type steady struct {
	rss int64
	fds int
}

// settle reads the processes' RSS and open descriptors every 50 ms until
// five reads in a row have the same descriptors and RSS within 64 KiB (a
// sixty-fourth of a KiB per connection at 4000), for at most 5 s. Memory
// has no event to wait on: this is polling by necessity.
func settle(pids []int, f *figures) steady {
	const reads, spread = 5, 64
	var last []steady
	deadline := time.Now().Add(5 * time.Second)
	for {
		last = append(last, steady{rss: rssKiB(pids), fds: fdCount(pids)})
		if len(last) > reads {
			last = last[1:]
		}
		if len(last) == reads {
			lo, hi, same := last[0].rss, last[0].rss, true
			for _, r := range last {
				lo, hi, same = min(lo, r.rss), max(hi, r.rss), same && r.fds == last[0].fds
			}
			if same && hi-lo <= spread {
				return last[reads-1]
			}
		}
		if time.Now().After(deadline) {
			f.note("idle: RSS or descriptors still moving after 5s (%+v); the last read is used", last)
			return last[len(last)-1]
		}
		<-time.After(50 * time.Millisecond)
	}
}

// awaitChainActive waits until the chain hop whose admin endpoint is
// adminAddr counts want active connections, for at most 10 s.
func awaitChainActive(b *testing.B, adminAddr string, want int, f *figures) {
	deadline := time.Now().Add(10 * time.Second)
	var got int64 = -1
	for {
		resp, err := admin.Get("http://" + adminAddr + "/layer4chain/stats")
		if err != nil {
			b.Fatalf("GET /layer4chain/stats: %v", err)
		}
		var stats struct {
			ActiveTotal int64 `json:"active_total"`
		}
		err = json.NewDecoder(resp.Body).Decode(&stats)
		resp.Body.Close()
		if err != nil {
			b.Fatalf("GET /layer4chain/stats: %v", err)
		}
		if got = stats.ActiveTotal; got == int64(want) {
			return
		}
		if time.Now().After(deadline) {
			f.note("idle: chain lists %d active connections, want %d", got, want)
			return
		}
		<-time.After(50 * time.Millisecond) // the records have no event to wait on from outside
	}
}

// machine describes the CPU for the table's heading.
func machine() string {
	info, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(info), "\n") {
		if name, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":"))
		}
	}
	return "unknown CPU"
}
