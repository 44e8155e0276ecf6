package layer4chain

import (
	"errors"
	"net/netip"
	"runtime"
	"sync"
	"testing"
)

var client1 = netip.MustParseAddrPort("127.0.0.1:40000")

func TestTrackerAdmitsUntilScopeLimitThenRefuses(t *testing.T) {
	tr := NewTracker()
	limits := Limits{MaxConnections: 2}
	a, err := tr.Admit("s", limits, "srv", client1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := tr.Admit("s", limits, "srv", client1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Admit("s", limits, "srv", client1); !errors.Is(err, ErrLimitExceeded) {
		t.Fatalf("third admission: %v, want ErrLimitExceeded", err)
	}
	if _, err := tr.Admit("other", limits, "srv", client1); err != nil {
		t.Fatalf("another scope is limited separately: %v", err)
	}
	tr.Remove(a, ReasonClientClosed)
	if _, err := tr.Admit("s", limits, "srv", client1); err != nil {
		t.Fatalf("admission after a removal: %v", err)
	}
	_ = b
}

func TestTrackerGlobalLimit(t *testing.T) {
	tr := NewTracker()
	tr.MaxConnections.Store(1)
	if _, err := tr.Admit("a", Limits{}, "", client1); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Admit("b", Limits{}, "", client1); !errors.Is(err, ErrLimitExceeded) {
		t.Fatalf("second admission: %v, want ErrLimitExceeded", err)
	}
}

func TestTrackerPerClientLimitCountsOriginalClients(t *testing.T) {
	tr := NewTracker()
	ip := netip.MustParseAddr("127.0.0.7")
	a, _ := tr.Admit("s", Limits{}, "", client1)
	b, _ := tr.Admit("s", Limits{}, "", client1)
	if err := tr.admitClient(a, 1, ip); err != nil {
		t.Fatal(err)
	}
	if err := tr.admitClient(b, 1, ip); !errors.Is(err, ErrLimitExceeded) {
		t.Fatalf("second connection of one client: %v, want ErrLimitExceeded", err)
	}
	if err := tr.admitClient(b, 1, netip.MustParseAddr("::ffff:127.0.0.8")); err != nil {
		t.Fatalf("another client: %v", err)
	}
	tr.Remove(a, ReasonClientClosed)
	c, _ := tr.Admit("s", Limits{}, "", client1)
	if err := tr.admitClient(c, 1, ip); err != nil {
		t.Fatalf("after the first closed: %v", err)
	}
}

func TestTrackerCountsStatesAndSignalsEmpty(t *testing.T) {
	tr := NewTracker()
	select {
	case <-tr.Empty():
	default:
		t.Fatal("a new tracker is not empty")
	}
	r, _ := tr.Admit("s", Limits{}, "", client1)
	empty := tr.Empty()
	select {
	case <-empty:
		t.Fatal("tracker with a record reports empty")
	default:
	}
	if tr.CountInState(StateConnecting) != 1 {
		t.Fatal("connecting count")
	}
	r.setState(StateEstablished)
	r.setState(StateHalfClosed)
	if tr.CountInState(StateConnecting) != 0 || tr.CountInState(StateHalfClosed) != 1 {
		t.Fatal("state counts do not follow the record")
	}
	tr.Remove(r, ReasonUpstreamClosed)
	tr.Remove(r, ReasonAdmin) // a second removal changes nothing
	<-empty
	for _, s := range States {
		if n := tr.CountInState(s); n != 0 {
			t.Fatalf("state %s counts %d after removal", s, n)
		}
	}
	if tr.Closed(ReasonUpstreamClosed) != 1 || tr.Closed(ReasonAdmin) != 0 || r.Reason() != ReasonUpstreamClosed {
		t.Fatalf("close reasons: %s", r.Reason())
	}
}

func TestRecordCloseInterruptsOnceInstalledAndKeepsFirstReason(t *testing.T) {
	tr := NewTracker()
	r, _ := tr.Admit("s", Limits{}, "", client1)
	r.Close(ReasonAdmin) // before the owner installed its interrupt
	called := 0
	r.setInterrupt(func() { called++ })
	if called != 1 {
		t.Fatalf("interrupt ran %d times, want once at installation", called)
	}
	r.Close(ReasonShutdown)
	tr.Remove(r, ReasonClientReset)
	if r.Reason() != ReasonAdmin {
		t.Fatalf("reason %s, want the first one, admin", r.Reason())
	}
}

func TestParseStateRoundTrips(t *testing.T) {
	for _, s := range States {
		got, err := ParseState(s.String())
		if err != nil || got != s {
			t.Fatalf("ParseState(%q) = %v, %v", s, got, err)
		}
	}
	if _, err := ParseState("open"); err == nil {
		t.Fatal("ParseState accepted an unknown state")
	}
}

// Empty waits until the Observer has been told of the last removal: a
// drain that waits for it must find every close line written and every
// span ended (with a flush right after, the last span was once lost).
func TestTrackerIsEmptyOnlyAfterTheLastRemovalIsReported(t *testing.T) {
	tr := NewTracker()
	reported := closedRecords{infos: make(chan RecordInfo)} // unbuffered: Closed blocks until read
	tr.Observer = reported
	r, _ := tr.Admit("s", Limits{}, "", client1)
	removed := make(chan struct{})
	go func() {
		tr.Remove(r, ReasonClientClosed)
		close(removed)
	}()
	// The record has left the tracker, its report is not yet taken.
	for tr.Len() != 0 {
		runtime.Gosched()
	}
	select {
	case <-tr.Empty():
		t.Fatal("Empty before the Observer was told of the removal")
	default:
	}
	// A connection admitted meanwhile keeps it non-empty after the report.
	r2, _ := tr.Admit("s", Limits{}, "", client1)
	if info := <-reported.infos; info.Reason != ReasonClientClosed {
		t.Fatalf("reported %+v", info)
	}
	<-removed
	select {
	case <-tr.Empty():
		t.Fatal("Empty with a live record")
	default:
	}
	go tr.Remove(r2, ReasonAdmin)
	<-reported.infos
	<-tr.Empty()
}

// refusals is an Observer that keeps what Refused reports.
type refusals struct {
	closedRecords // its Closed is shadowed below: only refusals are kept
	ch            chan string
}

func (refusals) Closed(*Record) {}

func (r refusals) Refused(server string, _ netip.AddrPort, reason CloseReason, detail string) {
	r.ch <- string(reason) + ": " + detail
}

func TestRefusedConnectionsAreReportedAndCountedAsArrivals(t *testing.T) {
	tr := NewTracker()
	obs := refusals{ch: make(chan string, 3)}
	tr.Observer = obs
	tr.MaxConnections.Store(1)
	a, err := tr.Admit("s", Limits{MaxConnections: 5}, "srv", client1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Admit("s", Limits{}, "srv", client1); !errors.Is(err, ErrLimitExceeded) {
		t.Fatalf("admission past the process limit: %v", err)
	}
	if got := <-obs.ch; got != "limit_exceeded: connection limit exceeded: the process's max_connections (1) is reached" {
		t.Fatalf("refusal reported as %q", got)
	}
	tr.MaxConnections.Store(0)
	if _, err := tr.Admit("t", Limits{MaxConnections: 1}, "srv", client1); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Admit("t", Limits{MaxConnections: 1}, "srv", client1); err == nil {
		t.Fatal("admission past the handler limit succeeded")
	}
	if got := <-obs.ch; got != "limit_exceeded: connection limit exceeded: the handler's max_connections (1) is reached" {
		t.Fatalf("refusal reported as %q", got)
	}
	tr.draining.Store(true)
	if _, err := tr.Admit("s", Limits{}, "srv", client1); !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("admission while draining: %v", err)
	}
	if got := <-obs.ch; got != "shutdown: shutting down" {
		t.Fatalf("refusal reported as %q", got)
	}
	tr.Remove(a, ReasonClientClosed)
	st := tr.Stats()
	if st.ConnectionsTotal != 5 || st.ActiveTotal != 1 || st.Closed[ReasonLimitExceeded] != 2 ||
		st.Closed[ReasonShutdown] != 1 || st.Closed[ReasonClientClosed] != 1 {
		t.Fatalf("stats after 2 admitted (1 closed) and 3 refused: %+v", st)
	}
}

// TestArrivalsEqualLiveAndClosedAtEveryRead reads the stats while
// connections are admitted, refused, moved through their states and removed
// at once: connections_total = active + closed must hold at every read.
func TestArrivalsEqualLiveAndClosedAtEveryRead(t *testing.T) {
	tr := NewTracker()
	// Scope "full" holds its only place for the whole test, so every
	// admission to it is refused; scope "free" admits all.
	full := Limits{MaxConnections: 1}
	held, err := tr.Admit("full", full, "", client1)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				if w%2 == 0 {
					if _, err := tr.Admit("full", full, "", client1); err == nil {
						t.Error("admitted past a full scope")
					}
					continue
				}
				r, err := tr.Admit("free", Limits{}, "", client1)
				if err != nil {
					t.Error(err)
					return
				}
				r.setState(StateEstablished)
				r.setState(StateHalfClosed)
				tr.Remove(r, ReasonClientClosed)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for reads := 0; ; reads++ {
		st := tr.Stats()
		var closed int64
		for _, n := range st.Closed {
			closed += n
		}
		if st.ConnectionsTotal != st.ActiveTotal+closed {
			t.Fatalf("read %d: connections_total %d != active %d + closed %d", reads, st.ConnectionsTotal, st.ActiveTotal, closed)
		}
		select {
		case <-done:
			st := tr.Stats()
			if st.ConnectionsTotal != 4001 || st.Closed[ReasonLimitExceeded] != 2000 || st.ActiveTotal != 1 {
				t.Fatalf("after the burst: %+v; want 4001 arrivals, 2000 refused, 1 live", st)
			}
			tr.Remove(held, ReasonClientClosed)
			return
		default:
		}
	}
}
