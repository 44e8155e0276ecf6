package layer4chain

import (
	"errors"
	"net/netip"
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
