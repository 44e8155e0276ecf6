package layer4chain

import (
	"errors"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// ErrLimitExceeded is returned by admission when a connection limit is full.
var ErrLimitExceeded = errors.New("connection limit exceeded")

// Limits caps the connections of one scope (one handler's configuration).
// Zero means no limit.
type Limits struct {
	// MaxConnections caps the connections of the scope.
	MaxConnections int
	// MaxConnectionsPerClient caps the connections of one original client IP.
	MaxConnectionsPerClient int
}

// scope counts the connections that one handler configuration admitted, so
// its limits hold across config reloads (the key, not the handler instance,
// identifies it).
type scope struct {
	key       string
	total     int
	perClient map[netip.Addr]int
}

// Tracker holds one Record per proxied connection. It is safe for concurrent
// use. Records are added by Admit and removed by Remove, both called by the
// goroutine that serves the connection.
type Tracker struct {
	// MaxConnections caps all connections of the tracker; 0 means no limit.
	// It may be changed at any time (config reloads do).
	MaxConnections atomic.Int64

	// OnClose, if set, is called once for every removed record, after its
	// reason is final (access logs, metrics). It must not block.
	OnClose func(*Record)

	nextID atomic.Uint64

	mu      sync.Mutex
	records map[uint64]*Record
	scopes  map[string]*scope
	empty   chan struct{} // closed while no record is live; see WaitEmpty

	stateCounts     [len(stateNames)]atomic.Int64
	total           atomic.Int64
	closedByReason  sync.Map // CloseReason → *atomic.Int64
	dialFailures    sync.Map // CloseReason → *atomic.Int64
	proxyRejections sync.Map // ProxyRejectReason → *atomic.Int64
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker {
	empty := make(chan struct{})
	close(empty)
	return &Tracker{
		records: make(map[uint64]*Record),
		scopes:  make(map[string]*scope),
		empty:   empty,
	}
}

// Admit creates the record of a new connection in state connecting, or
// returns ErrLimitExceeded when the tracker's or the scope's connection limit
// is full. The caller must call Remove exactly once for an admitted record,
// in a defer.
func (t *Tracker) Admit(scopeKey string, limits Limits, server string, client netip.AddrPort) (*Record, error) {
	now := time.Now()
	r := &Record{Server: server, Client: client, Started: now, tracker: t}
	r.lastActivity.Store(now.UnixNano())

	t.mu.Lock()
	if max := t.MaxConnections.Load(); max > 0 && int64(len(t.records)) >= max {
		t.mu.Unlock()
		return nil, ErrLimitExceeded
	}
	s := t.scopes[scopeKey]
	if s == nil {
		s = &scope{key: scopeKey}
		t.scopes[scopeKey] = s
	}
	if limits.MaxConnections > 0 && s.total >= limits.MaxConnections {
		t.mu.Unlock()
		return nil, ErrLimitExceeded
	}
	s.total++
	r.ID = t.nextID.Add(1)
	r.scope = s
	if len(t.records) == 0 {
		t.empty = make(chan struct{})
	}
	t.records[r.ID] = r
	t.mu.Unlock()

	t.stateCounts[StateConnecting].Add(1)
	t.total.Add(1)
	return r, nil
}

// admitClient counts the record against its scope's per-client limit, keyed
// by the original client's IP (known only after a PROXY header was read).
func (t *Tracker) admitClient(r *Record, limit int, ip netip.Addr) error {
	ip = ip.Unmap()
	t.mu.Lock()
	defer t.mu.Unlock()
	s := r.scope
	if limit > 0 && s.perClient[ip] >= limit {
		return ErrLimitExceeded
	}
	if s.perClient == nil {
		s.perClient = make(map[netip.Addr]int)
	}
	s.perClient[ip]++
	r.perClient = ip
	return nil
}

// Remove ends the record: it takes the closing state, leaves the tracker and
// is reported to OnClose with its final reason. Calling it twice is harmless.
func (t *Tracker) Remove(r *Record, reason CloseReason) {
	r.setReason(reason)
	r.setState(StateClosing)

	t.mu.Lock()
	if _, ok := t.records[r.ID]; !ok {
		t.mu.Unlock()
		return
	}
	delete(t.records, r.ID)
	s := r.scope
	s.total--
	if r.perClient.IsValid() {
		if s.perClient[r.perClient]--; s.perClient[r.perClient] <= 0 {
			delete(s.perClient, r.perClient)
		}
	}
	if s.total == 0 {
		delete(t.scopes, s.key)
	}
	if len(t.records) == 0 {
		close(t.empty)
	}
	t.mu.Unlock()

	t.stateCounts[StateClosing].Add(-1)
	counter(&t.closedByReason, r.Reason()).Add(1)
	if t.OnClose != nil {
		t.OnClose(r)
	}
}

// Empty returns a channel that is closed once no record is live. A new
// connection after that needs a new call.
func (t *Tracker) Empty() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.empty
}

// Get returns the live record with the given ID.
func (t *Tracker) Get(id uint64) (*Record, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.records[id]
	return r, ok
}

// Len returns the number of live records.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.records)
}

// Records returns the live records, ordered by ID.
func (t *Tracker) Records() []*Record {
	t.mu.Lock()
	out := make([]*Record, 0, len(t.records))
	for _, r := range t.records {
		out = append(out, r)
	}
	t.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// CountInState returns how many live records are in state s.
func (t *Tracker) CountInState(s State) int64 { return t.stateCounts[s].Load() }

// Total returns how many connections were ever admitted.
func (t *Tracker) Total() int64 { return t.total.Load() }

// Closed returns how many connections closed with the given reason.
func (t *Tracker) Closed(reason CloseReason) int64 { return counter(&t.closedByReason, reason).Load() }

// DialFailures returns how many dial attempts failed with the given reason.
func (t *Tracker) DialFailures(reason CloseReason) int64 {
	return counter(&t.dialFailures, reason).Load()
}

// ProxyRejections returns how many PROXY headers were refused for reason.
func (t *Tracker) ProxyRejections(reason ProxyRejectReason) int64 {
	return counter(&t.proxyRejections, reason).Load()
}

// countRefused counts a connection refused at admission (no record exists).
func (t *Tracker) countRefused() { counter(&t.closedByReason, ReasonLimitExceeded).Add(1) }

// CountDialFailure counts one failed dial attempt; it fits Dialer.OnFailure.
func (t *Tracker) CountDialFailure(e *DialError) { counter(&t.dialFailures, e.Reason).Add(1) }

func (t *Tracker) countProxyRejection(reason ProxyRejectReason) {
	counter(&t.proxyRejections, reason).Add(1)
}

func counter[K comparable](m *sync.Map, key K) *atomic.Int64 {
	if c, ok := m.Load(key); ok {
		return c.(*atomic.Int64)
	}
	c, _ := m.LoadOrStore(key, new(atomic.Int64))
	return c.(*atomic.Int64)
}
