package layer4chain

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"testing"
	"time"
)

// establishedRecord admits a record and puts it in the established state
// with the given timeouts, as the proxy would.
func establishedRecord(t testing.TB, tr *Tracker, timeouts Timeouts) *Record {
	r, err := tr.Admit("s", Limits{}, "", client1)
	if err != nil {
		t.Fatal(err)
	}
	r.setLimits(timeouts)
	r.setState(StateEstablished)
	return r
}

func TestSweepClosesAnIdleConnectionNoDeadlineCaught(t *testing.T) {
	tr := NewTracker()
	idle := establishedRecord(t, tr, Timeouts{Idle: time.Minute})
	busy := establishedRecord(t, tr, Timeouts{Idle: time.Minute})
	closed := make(chan CloseReason, 2)
	idle.setInterrupt(func() { closed <- idle.Reason() })
	busy.setInterrupt(func() { closed <- busy.Reason() })

	res := tr.Sweep(time.Now().Add(2 * time.Minute))
	busy.touch(time.Now().Add(2 * time.Minute))
	if res.Checked != 2 || res.Expired != 2 {
		t.Fatalf("sweep: %+v, want both records checked and expired", res)
	}
	if r := <-closed; r != ReasonIdleTimeout {
		t.Fatalf("reason %s, want idle_timeout", r)
	}
	if tr.Sweeps() != 1 {
		t.Fatalf("sweeps counted: %d", tr.Sweeps())
	}
}

func TestSweepEnforcesHalfCloseLifetimeAndConnectLimits(t *testing.T) {
	tr := NewTracker()
	half := establishedRecord(t, tr, Timeouts{Idle: time.Hour, HalfClose: time.Minute})
	half.setState(StateHalfClosed)
	old := establishedRecord(t, tr, Timeouts{Idle: time.Hour, MaxLifetime: time.Minute})
	connecting, _ := tr.Admit("s", Limits{}, "", client1)
	connecting.connectBy.Store(connecting.Started.Add(time.Second).UnixNano())

	tr.Sweep(time.Now().Add(90 * time.Second))
	for r, want := range map[*Record]CloseReason{half: ReasonHalfCloseTimeout, old: ReasonMaxLifetime, connecting: ReasonConnectTimeout} {
		if got := r.Reason(); got != want {
			t.Errorf("record %d: reason %s, want %s", r.ID, got, want)
		}
	}
}

func TestSweepReapsAZombieOnlyAfterItsOwnerHadTimeToRemoveIt(t *testing.T) {
	tr := NewTracker()
	r := establishedRecord(t, tr, Timeouts{})
	r.markShut(shutClient)
	if res := tr.Sweep(time.Now().Add(time.Hour)); res.Zombies != 0 {
		t.Fatalf("a record with one socket open was reaped: %+v", res)
	}
	r.markShut(shutUpstream)
	if res := tr.Sweep(time.Now()); res.Zombies != 0 || tr.Len() != 1 {
		t.Fatalf("a record that may be closing right now was reaped: %+v", res)
	}
	if res := tr.Sweep(time.Now().Add(ZombieAfter + time.Second)); res.Zombies != 1 || tr.Len() != 0 || tr.ZombiesReaped() != 1 {
		t.Fatalf("sweep after ZombieAfter: %+v, %d records left", res, tr.Len())
	}
}

func TestDrainRefusesNewConnectionsAndClosesTheRestAfterGrace(t *testing.T) {
	tr := NewTracker()
	r := establishedRecord(t, tr, Timeouts{})
	r.setInterrupt(func() { go tr.Remove(r, ReasonNone) })

	start := time.Now()
	done := make(chan int)
	go func() { done <- tr.Drain(200*time.Millisecond, time.Second) }()
	for !tr.Draining() {
		// Drain sets the flag first thing; wait for it without sleeping.
		<-time.After(time.Millisecond)
	}
	if _, err := tr.Admit("s", Limits{}, "", client1); !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("admission while draining: %v, want ErrShuttingDown", err)
	}
	if n := <-done; n != 1 {
		t.Fatalf("drain closed %d connections, want 1", n)
	}
	if elapsed := time.Since(start); elapsed < 200*time.Millisecond {
		t.Fatalf("drain closed connections after %v, before its grace", elapsed)
	}
	if r.Reason() != ReasonShutdown || tr.Len() != 0 {
		t.Fatalf("reason %s, %d records left", r.Reason(), tr.Len())
	}
}

func TestDrainReturnsAsSoonAsConnectionsEnd(t *testing.T) {
	tr := NewTracker()
	r := establishedRecord(t, tr, Timeouts{})
	done := make(chan int)
	go func() { done <- tr.Drain(time.Hour, time.Second) }()
	tr.Remove(r, ReasonClientClosed)
	if n := <-done; n != 0 {
		t.Fatalf("drain closed %d connections, want none", n)
	}
}

func TestStatsListEveryReasonAndState(t *testing.T) {
	tr := NewTracker()
	r := establishedRecord(t, tr, Timeouts{})
	r.bytesUp.Add(10)
	st := tr.Stats()
	if len(st.Closed) != len(CloseReasons) || len(st.Active) != len(States) || len(st.ProxyProtocolRejected) != len(ProxyRejectReasons) {
		t.Fatalf("stats miss keys: %+v", st)
	}
	if st.Active[StateEstablished] != 1 || st.ActiveTotal != 1 || st.BytesUp != 10 {
		t.Fatalf("stats: %+v", st)
	}
	tr.Remove(r, ReasonAdmin)
	if st := tr.Stats(); st.Closed[ReasonAdmin] != 1 || st.BytesUp != 10 || st.ActiveTotal != 0 {
		t.Fatalf("stats after close: %+v", st)
	}
}

// BenchmarkSweep100k times one sweep over 100,000 established records, none
// of them due (the common case: the sweep only looks).
func BenchmarkSweep100k(b *testing.B) {
	tr := NewTracker()
	for i := 0; i < 100_000; i++ {
		ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, byte(i >> 8), byte(i)}), uint16(i))
		r, err := tr.Admit(fmt.Sprint(i%100), Limits{}, "", ap)
		if err != nil {
			b.Fatal(err)
		}
		r.setLimits(Timeouts{Idle: time.Hour, HalfClose: 5 * time.Minute})
		r.setState(StateEstablished)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tr.Sweep(time.Now())
	}
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/sweep")
}

// BenchmarkRecordRemovalLatency measures, per connection, the time from the
// client's close to its record leaving the tracker, and reports the p99.
// Removal is done by the connection's own goroutine, never by a sweep.
func BenchmarkRecordRemovalLatency(b *testing.B) {
	backend := newEchoForBench(b)
	tr := NewTracker()
	h := startHop(b, &Proxy{Tracker: tr, Balancer: balancerFor(b, backend)}, nil)
	lat := make([]time.Duration, 0, b.N)
	one := make([]byte, 1)
	for i := 0; i < b.N; i++ {
		c := dialForBench(b, h.Addr)
		c.Write(one)
		c.Read(one)
		empty := tr.Empty()
		start := time.Now()
		c.Close()
		<-empty
		lat = append(lat, time.Since(start))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
}
