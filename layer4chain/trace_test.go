package layer4chain

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// recordingTracer is a Tracer that says what it was told: the chain ID and
// parent of each connection, and returns next as the span to send on.
type recordingTracer struct {
	next    TraceParent
	started chan tracedStart
}

type tracedStart struct {
	chainID string
	hop     int
	parent  TraceParent
}

func newRecordingTracer(next TraceParent) *recordingTracer {
	return &recordingTracer{next: next, started: make(chan tracedStart, 1)}
}

func (rt *recordingTracer) StartSpan(r *Record, parent TraceParent) (any, TraceParent) {
	info := r.Info()
	rt.started <- tracedStart{info.ChainID, info.Hop, parent}
	return "span of " + info.ChainID, rt.next
}

func (rt *recordingTracer) start(t *testing.T) tracedStart {
	t.Helper()
	select {
	case s := <-rt.started:
		return s
	case <-time.After(5 * time.Second):
		t.Fatal("no span started")
		return tracedStart{}
	}
}

// spanObserver passes on the span handle of each closed record.
type spanObserver struct {
	closedRecords
	spans chan any
}

func (o spanObserver) Closed(r *Record) { o.spans <- r.Span() }

// Two hops, each with a tracer: the first is a root, the second receives
// the first one's span in TLVTrace, under the same chain ID, and each
// closed record carries its tracer's handle to the Observer.
func TestTraceParentTravelsToTheNextHop(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	first := TraceParent{SpanID: [8]byte{1, 2, 3, 4, 5, 6, 7, 8}, Flags: 1}
	tr1, tr2 := newRecordingTracer(first), newRecordingTracer(TraceParent{SpanID: [8]byte{9}})
	obs2 := spanObserver{spans: make(chan any, 1)}
	t2 := NewTracker()
	t2.Observer = obs2
	hop2 := startHop(t, &Proxy{Tracker: t2, Tracer: tr2, Balancer: balancerFor(t, backend.Addr), Accept: &ProxyAcceptor{Allow: loopbackAllow}}, nil)
	obs1 := spanObserver{spans: make(chan any, 1)}
	t1 := NewTracker()
	t1.Observer = obs1
	hop1 := startHop(t, &Proxy{Tracker: t1, Tracer: tr1, Balancer: balancerFor(t, hop2.Addr), EmitVersion: 2}, nil)

	c := chaintest.Dial(t, hop1.Addr)
	c.Write([]byte("ping"))
	_ = c.CloseWrite()
	if got, _, err := chaintest.ReadUntilClosed(c, 5*time.Second); string(got) != "ping" {
		t.Fatalf("echo read %q (%v)", got, err)
	}
	s1, s2 := tr1.start(t), tr2.start(t)
	if s1.parent.IsValid() || s1.hop != 1 {
		t.Fatalf("first hop: %+v, want hop 1 without a parent", s1)
	}
	if s2.parent != first || s2.hop != 2 || s2.chainID != s1.chainID || len(s1.chainID) != 32 {
		t.Fatalf("second hop %+v after first %+v: want hop 2 of the same chain with parent %+v", s2, s1, first)
	}
	for i, obs := range []spanObserver{obs1, obs2} {
		select {
		case span := <-obs.spans:
			if span != "span of "+s1.chainID {
				t.Fatalf("hop %d closed with span %v", i+1, span)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("hop %d closed no record", i+1)
		}
	}
}

// A hop without a tracer, or whose tracer returns no span to send, sends
// no TLVTrace: the next hop's span is a root.
func TestNoTraceParentWithoutASpanToSend(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tracer Tracer
	}{{"no tracer", nil}, {"no span", newRecordingTracer(TraceParent{})}} {
		t.Run(tc.name, func(t *testing.T) {
			backend := chaintest.NewEchoBackend(t)
			tr2 := newRecordingTracer(TraceParent{})
			hop2 := startHop(t, &Proxy{Tracer: tr2, Balancer: balancerFor(t, backend.Addr), Accept: &ProxyAcceptor{Allow: loopbackAllow}}, nil)
			hop1 := startHop(t, &Proxy{Tracer: tc.tracer, Balancer: balancerFor(t, hop2.Addr), EmitVersion: 2}, nil)
			c := chaintest.Dial(t, hop1.Addr)
			_ = c.CloseWrite()
			_, _, _ = chaintest.ReadUntilClosed(c, 5*time.Second)
			if s := tr2.start(t); s.parent.IsValid() || s.hop != 2 {
				t.Fatalf("second hop %+v, want hop 2 without a parent", s)
			}
		})
	}
}

// A TLVTrace that is not exactly 9 bytes with a non-zero span ID, or that
// comes twice, makes the header malformed; a good one decodes.
func TestTraceParentTLVIsValidatedOnReceive(t *testing.T) {
	addrs := []byte{127, 0, 0, 1, 127, 0, 0, 1, 0, 1, 0, 2}
	tlv := func(value ...byte) []byte {
		return append([]byte{byte(TLVTrace), 0, byte(len(value))}, value...)
	}
	good := tlv(1, 2, 3, 4, 5, 6, 7, 8, 1)
	for _, tc := range []struct {
		name string
		tlvs []byte
		want error
	}{
		{"8 bytes", tlv(1, 2, 3, 4, 5, 6, 7, 8), errBadTraceParent},
		{"10 bytes", tlv(1, 2, 3, 4, 5, 6, 7, 8, 1, 0), errBadTraceParent},
		{"zero span ID", tlv(0, 0, 0, 0, 0, 0, 0, 0, 1), errBadTraceParent},
		{"twice", append(append([]byte(nil), good...), good...), errDuplicateTLV},
		{"good", good, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hdr := v2Raw(v2CmdProxy, 0x11, append(append([]byte(nil), addrs...), tc.tlvs...))
			info, _, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(&memConn{data: hdr}, trustedPeer)
			if tc.want != nil {
				if reasonOf(err) != ProxyRejectMalformed || !errors.Is(err, tc.want) {
					t.Fatalf("err %v, want a malformed rejection for %v", err, tc.want)
				}
				return
			}
			want := TraceParent{SpanID: [8]byte{1, 2, 3, 4, 5, 6, 7, 8}, Flags: 1}
			if err != nil || info.TraceParent != want || len(info.TLVs) != 0 {
				t.Fatalf("info %+v err %v, want trace parent %+v and no other TLV", info, err, want)
			}
		})
	}
}

// The trace parent is sent only in v2 and only when valid, right after the
// hop count.
func TestAppendToSendsTheTraceParent(t *testing.T) {
	src := netip.MustParseAddrPort("192.0.2.1:1000")
	parent := TraceParent{SpanID: [8]byte{0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 0x1, 0x2}, Flags: 1}
	with := mustAppend(t, ProxyHeader{Version: 2, Source: src, Hops: 1, TraceParent: parent})
	without := mustAppend(t, ProxyHeader{Version: 2, Source: src, Hops: 1})
	if len(with) != len(without)+3+traceParentLen {
		t.Fatalf("header with a trace parent is %d bytes, without %d", len(with), len(without))
	}
	if v1 := mustAppend(t, ProxyHeader{Version: 1, Source: src, TraceParent: parent}); string(v1) != string(mustAppend(t, ProxyHeader{Version: 1, Source: src})) {
		t.Fatalf("v1 header changed by a trace parent: %q", v1)
	}
	info, _, err := (&ProxyAcceptor{Allow: loopbackAllow}).Accept(&memConn{data: with}, trustedPeer)
	if err != nil || info.TraceParent != parent {
		t.Fatalf("read back %+v (%v), want %+v", info, err, parent)
	}
}
