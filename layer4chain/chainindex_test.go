package layer4chain

import (
	"io"
	"net/netip"
	"sync"
	"testing"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// chainIndexLen returns how many chain IDs the index holds.
func (t *Tracker) chainIndexLen() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.byChain)
}

func ids(records []*Record) []uint64 {
	var out []uint64
	for _, r := range records {
		out = append(out, r.ID)
	}
	return out
}

func TestChainIndexFollowsSetOriginAndRemove(t *testing.T) {
	tr := NewTracker()
	a, _ := tr.Admit("s", Limits{}, "", client1)
	b, _ := tr.Admit("s", Limits{}, "", client1)
	tr.setOrigin(b, "x", 1, client1)
	tr.setOrigin(a, "x", 2, client1)
	if got := ids(tr.ByChainID("x")); len(got) != 2 || got[0] != a.ID || got[1] != b.ID {
		t.Fatalf("chain x lists %v, want [%d %d] in ID order", got, a.ID, b.ID)
	}
	tr.setOrigin(a, "y", 2, client1) // a second header moves the record
	if got := ids(tr.ByChainID("x")); len(got) != 1 || got[0] != b.ID {
		t.Fatalf("chain x lists %v after a moved to y, want [%d]", got, b.ID)
	}
	if got := ids(tr.ByChainID("y")); len(got) != 1 || got[0] != a.ID || a.Info().Hop != 2 {
		t.Fatalf("chain y lists %v (hop %d)", got, a.Info().Hop)
	}
	tr.Remove(b, ReasonClientClosed)
	if got := tr.ByChainID("x"); len(got) != 0 {
		t.Fatalf("chain x lists %v after its record was removed", ids(got))
	}
	tr.Remove(a, ReasonClientClosed)
	tr.setOrigin(a, "z", 1, client1) // a late write on a removed record
	if n := tr.chainIndexLen(); n != 0 || len(tr.ByChainID("z")) != 0 {
		t.Fatalf("the index holds %d chain IDs with no live record", n)
	}
	if a.ChainID() != "z" {
		t.Fatalf("the removed record's chain ID is %q, want the one set", a.ChainID())
	}
}

// TestChainIndexNeverOutlivesItsRecord runs clients through two chained
// hops, including a loop the second hop rejects: while a client is open the
// second hop finds its record by the chain ID the first hop made, and once
// every client has gone both trackers and their indexes are empty, with no
// goroutine or descriptor left.
func TestChainIndexNeverOutlivesItsRecord(t *testing.T) {
	checkEngineLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	trust := &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
	inner := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr), Accept: trust, MaxHops: 2}, nil)
	outer := startHop(t, &Proxy{Balancer: balancerFor(t, inner.Addr), EmitVersion: 2}, nil)

	const clients = 40
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := chaintest.Dial(t, outer.Addr)
			defer c.Close()
			c.Write([]byte{byte(i)})
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Errorf("client %d: %v", i, err)
				return
			}
			recs := outer.Tracker.Records()
			var chainID string
			for _, r := range recs {
				if info := r.Info(); info.OriginalClient == c.LocalAddr().String() {
					chainID = info.ChainID
				}
			}
			found := inner.Tracker.ByChainID(chainID)
			if chainID == "" || len(found) != 1 || found[0].Info().Hop != 2 {
				t.Errorf("client %d: chain %q is on %d records of the inner hop", i, chainID, len(found))
			}
		}()
	}
	// A header that has been through too many hops: the record carries the
	// rejected chain ID while it lives, and leaves the index with it.
	loop := chaintest.Dial(t, inner.Addr)
	io.WriteString(loop, loopHeader(t))
	io.ReadAll(loop)
	loop.Close()
	wg.Wait()
	<-inner.Tracker.Empty()
	if n := inner.Tracker.Closed(ReasonLoopDetected); n != 1 {
		t.Errorf("the inner hop closed %d connections as loops, want 1", n)
	}
	for _, h := range []*hop{outer, inner} {
		<-h.Tracker.Empty()
		if n := h.Tracker.chainIndexLen(); n != 0 {
			t.Errorf("hop %s: %d chain IDs indexed with no live record", h.Addr, n)
		}
	}
}
