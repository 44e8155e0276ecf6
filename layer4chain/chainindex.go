package layer4chain

import (
	"cmp"
	"net/netip"
	"slices"
)

// setOrigin records where the connection comes from: its chain ID, its hop
// number and the original client. It is the only writer of those fields,
// and writes them holding both the tracker's and the record's lock, so
// either lock suffices to read them; the chain index moves with them, so a
// lookup by chain ID finds exactly the live records that carry it.
func (t *Tracker) setOrigin(r *Record, chainID string, hop int, client netip.AddrPort) {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, live := t.records[r.ID]
	if live {
		t.unindexChain(r)
	}
	r.mu.Lock()
	r.chainID, r.hop, r.originalClient = chainID, hop, client
	r.mu.Unlock()
	if live && chainID != "" {
		t.byChain[chainID] = append(t.byChain[chainID], r)
	}
}

// unindexChain takes the record out of the chain index. t.mu must be held.
func (t *Tracker) unindexChain(r *Record) {
	if r.chainID == "" {
		return
	}
	list := slices.DeleteFunc(t.byChain[r.chainID], func(o *Record) bool { return o == r })
	if len(list) == 0 {
		delete(t.byChain, r.chainID)
	} else {
		t.byChain[r.chainID] = list
	}
}

// ByChainID returns the live records carrying the chain ID, ordered by ID,
// without looking at any other record. There is usually one per process;
// more when a chain passes through the process twice.
func (t *Tracker) ByChainID(chainID string) []*Record {
	t.mu.Lock()
	out := slices.Clone(t.byChain[chainID])
	t.mu.Unlock()
	slices.SortFunc(out, func(a, b *Record) int { return cmp.Compare(a.ID, b.ID) })
	return out
}
