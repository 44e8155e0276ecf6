package layer4chain

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// ErrLimitExceeded is returned by admission when a connection limit is full.
var ErrLimitExceeded = errors.New("connection limit exceeded")

// ErrShuttingDown is returned by admission once the tracker drains.
var ErrShuttingDown = errors.New("shutting down")

// Observer is told what happens to records. Its methods are called on the
// connection's own goroutine and must not block.
type Observer interface {
	// StateChanged reports a record moving from one state to another.
	StateChanged(r *Record, from, to State)
	// Closed reports a removed record, whose reason is final.
	Closed(r *Record)
	// Refused reports a connection refused at admission, which never had
	// a record: reason is limit_exceeded or shutdown, and detail names the
	// limit that refused it.
	Refused(server string, client netip.AddrPort, reason CloseReason, detail string)
	// Dialed reports one dial attempt and how long it took.
	Dialed(upstream string, took time.Duration, err error)
	// Swept reports a finished sweep.
	Swept(SweepResult)
}

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

	// Observer, if set, is told about state changes, removals, dials and
	// sweeps (logs, histograms). Set it before the first Admit.
	Observer Observer

	nextID atomic.Uint64

	mu      sync.Mutex
	records map[uint64]*Record
	byChain map[string][]*Record // chain ID → its live records; see setOrigin
	scopes  map[string]*scope
	empty   chan struct{} // closed while no record is live or being reported; see Empty
	// reporting counts removed records whose removal the Observer is
	// still being told about: Empty waits for them too.
	reporting int

	draining atomic.Bool

	stateCounts     [len(stateNames)]atomic.Int64
	total           atomic.Int64
	sweeps          atomic.Int64
	lastSweep       atomic.Int64 // unix ns when the last sweep started
	zombies         atomic.Int64
	closedBytesUp   atomic.Int64
	closedBytesDown atomic.Int64
	closedByReason  sync.Map // CloseReason → *atomic.Int64
	dialFailures    sync.Map // DialFailureKey → *atomic.Int64
	proxyRejections sync.Map // ProxyRejectReason → *atomic.Int64
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker {
	empty := make(chan struct{})
	close(empty)
	return &Tracker{
		records: make(map[uint64]*Record),
		byChain: make(map[string][]*Record),
		scopes:  make(map[string]*scope),
		empty:   empty,
	}
}

// Admit creates the record of a new connection in state connecting. When
// the tracker drains it returns an error wrapping ErrShuttingDown, and when
// the tracker's or the scope's connection limit is full one wrapping
// ErrLimitExceeded and naming the limit. A refused connection is counted
// (in Total and by close reason, so that Total always equals the live
// records plus the closed ones) and reported to the Observer. The caller
// must call Remove exactly once for an admitted record, in a defer.
func (t *Tracker) Admit(scopeKey string, limits Limits, server string, client netip.AddrPort) (*Record, error) {
	now := time.Now()
	r := &Record{Server: server, Client: client, Started: now, tracker: t}
	r.lastActivity.Store(now.UnixNano())

	t.mu.Lock()
	if err := t.admissible(scopeKey, limits); err != nil {
		reason := ReasonLimitExceeded
		if errors.Is(err, ErrShuttingDown) {
			reason = ReasonShutdown
		}
		t.total.Add(1)
		counter(&t.closedByReason, reason).Add(1)
		t.mu.Unlock()
		if t.Observer != nil {
			t.Observer.Refused(server, client, reason, err.Error())
		}
		return nil, err
	}
	s := t.scopes[scopeKey]
	if s == nil {
		s = &scope{key: scopeKey}
		t.scopes[scopeKey] = s
	}
	s.total++
	r.ID = t.nextID.Add(1)
	r.scope = s
	if len(t.records) == 0 && t.reporting == 0 {
		t.empty = make(chan struct{})
	}
	t.records[r.ID] = r
	t.stateCounts[StateConnecting].Add(1)
	t.total.Add(1)
	t.mu.Unlock()
	return r, nil
}

// admissible says why a new connection of the scope cannot be admitted, or
// nil when it can. t.mu must be held.
func (t *Tracker) admissible(scopeKey string, limits Limits) error {
	if t.draining.Load() {
		return ErrShuttingDown
	}
	if max := t.MaxConnections.Load(); max > 0 && int64(len(t.records)) >= max {
		return fmt.Errorf("%w: the process's max_connections (%d) is reached", ErrLimitExceeded, max)
	}
	if s := t.scopes[scopeKey]; limits.MaxConnections > 0 && s != nil && s.total >= limits.MaxConnections {
		return fmt.Errorf("%w: the handler's max_connections (%d) is reached", ErrLimitExceeded, limits.MaxConnections)
	}
	return nil
}

// admitClient counts the record against its scope's per-client limit, keyed
// by the original client's IP (known only after a PROXY header was read).
func (t *Tracker) admitClient(r *Record, limit int, ip netip.Addr) error {
	ip = ip.Unmap()
	t.mu.Lock()
	defer t.mu.Unlock()
	s := r.scope
	if limit > 0 && s.perClient[ip] >= limit {
		return fmt.Errorf("%w: max_connections_per_client (%d) is reached for %s", ErrLimitExceeded, limit, ip)
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
	t.unindexChain(r)
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
	// Counts move with the removal, before anyone waiting on Empty wakes,
	// so that what they read afterwards is final.
	t.stateCounts[StateClosing].Add(-1)
	counter(&t.closedByReason, r.Reason()).Add(1)
	t.closedBytesUp.Add(r.bytesUp.Load())
	t.closedBytesDown.Add(r.bytesDown.Load())
	t.reporting++
	t.mu.Unlock()

	// The Observer is told outside the lock (it logs and ends the span),
	// but before Empty wakes anyone: a drain that waits for the tracker to
	// empty then finds every close line written and every span ended.
	if t.Observer != nil {
		t.Observer.Closed(r)
	}

	t.mu.Lock()
	if t.reporting--; t.reporting == 0 && len(t.records) == 0 {
		close(t.empty)
	}
	t.mu.Unlock()
}

// Empty returns a channel that is closed once no record is live and the
// Observer has been told of every removal. A new connection after that
// needs a new call.
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

// Total returns how many connections arrived, refused ones included.
func (t *Tracker) Total() int64 { return t.total.Load() }

// Closed returns how many connections closed with the given reason.
func (t *Tracker) Closed(reason CloseReason) int64 { return counter(&t.closedByReason, reason).Load() }

// DialFailureKey identifies a count of failed dial attempts.
type DialFailureKey struct {
	// Reason is connect_timeout, connect_refused or connect_failed.
	Reason CloseReason
	// Upstream is the address dialed.
	Upstream string
}

// DialFailures returns how many dial attempts failed with the given reason,
// across upstreams.
func (t *Tracker) DialFailures(reason CloseReason) int64 {
	var n int64
	t.dialFailures.Range(func(k, v any) bool {
		if k.(DialFailureKey).Reason == reason {
			n += v.(*atomic.Int64).Load()
		}
		return true
	})
	return n
}

// DialFailuresByUpstream returns the failed dial attempts by reason and
// upstream.
func (t *Tracker) DialFailuresByUpstream() map[DialFailureKey]int64 {
	out := make(map[DialFailureKey]int64)
	t.dialFailures.Range(func(k, v any) bool {
		out[k.(DialFailureKey)] = v.(*atomic.Int64).Load()
		return true
	})
	return out
}

// CloseUpstream closes the live connections of the scope (one handler's
// configuration) proxied to the upstream addr (as the config names it)
// with the given reason and detail, and returns how many it asked to
// close.
func (t *Tracker) CloseUpstream(addr, scope string, reason CloseReason, detail string) int {
	n := 0
	for _, r := range t.Records() {
		r.mu.Lock()
		match := (r.upstream == addr || r.template == addr) && r.scope.key == scope
		r.mu.Unlock()
		if match {
			r.closeWith(reason, detail)
			n++
		}
	}
	return n
}

// ProxyRejections returns how many PROXY headers were refused for reason.
func (t *Tracker) ProxyRejections(reason ProxyRejectReason) int64 {
	return counter(&t.proxyRejections, reason).Load()
}

// ReportDial counts a failed dial attempt by reason and tells the Observer
// about every attempt; it fits Dialer.OnAttempt.
func (t *Tracker) ReportDial(upstream string, took time.Duration, err error) {
	if err != nil {
		counter(&t.dialFailures, DialFailureKey{ClassifyDialError(err), upstream}).Add(1)
	}
	if t.Observer != nil {
		t.Observer.Dialed(upstream, took, err)
	}
}

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

// SweepResult says what one sweep did.
type SweepResult struct {
	// Checked is how many records the sweep looked at.
	Checked int
	// Expired is how many it closed for a limit no deadline caught.
	Expired int
	// Zombies is how many records it reaped whose sockets were both closed.
	Zombies int
	// Took is how long the sweep ran.
	Took time.Duration
}

// ZombieAfter is how long a record may stay after this hop closed both its
// sockets before a sweep takes it for a zombie. Its owner only has to
// return and remove it, which takes microseconds; the margin keeps a busy
// machine's scheduling delays from looking like a leak.
const ZombieAfter = 10 * time.Second

// Sweep is the safety net run periodically: it closes connections past a
// limit that no deadline enforced (a connect phase that overran, an idle
// or half-closed connection, one past its lifetime) and reaps zombies,
// records whose sockets this hop closed more than ZombieAfter ago but that
// were never removed. Zombies are bugs: ZombiesReaped must stay 0.
func (t *Tracker) Sweep(now time.Time) SweepResult {
	start := time.Now()
	t.lastSweep.Store(start.UnixNano())
	t.mu.Lock()
	records := make([]*Record, 0, len(t.records))
	for _, r := range t.records {
		records = append(records, r)
	}
	t.mu.Unlock()

	res := SweepResult{Checked: len(records)}
	nowNs := now.UnixNano()
	for _, r := range records {
		if at := r.shutAt.Load(); at != 0 {
			if nowNs-at > int64(ZombieAfter) {
				res.Zombies++
				t.zombies.Add(1)
				t.Remove(r, ReasonNone)
			}
			continue
		}
		if reason, expired := r.overdue(nowNs); expired {
			res.Expired++
			r.Close(reason)
		}
	}
	res.Took = time.Since(start)
	t.sweeps.Add(1)
	if t.Observer != nil {
		t.Observer.Swept(res)
	}
	return res
}

// overdue says whether the record is past a limit at now (unix
// nanoseconds). A second of slack leaves the deadlines, which are exact,
// to act first.
func (r *Record) overdue(now int64) (CloseReason, bool) {
	const slack = int64(time.Second)
	switch s := State(r.state.Load()); s {
	case StateConnecting:
		if end := r.lifetimeEnd.Load(); end != 0 && now > end+slack {
			return ReasonMaxLifetime, true
		}
		if by := r.connectBy.Load(); by != 0 && now > by+slack {
			return ReasonConnectTimeout, true
		}
	case StateEstablished, StateHalfClosed:
		if end := r.lifetimeEnd.Load(); end != 0 && now > end+slack {
			return ReasonMaxLifetime, true
		}
		idle, reason := r.idle.Load(), ReasonIdleTimeout
		if s == StateHalfClosed {
			idle, reason = r.halfClose.Load(), ReasonHalfCloseTimeout
		}
		if idle > 0 && now-r.lastActivity.Load() > idle+slack {
			return reason, true
		}
	}
	return ReasonNone, false
}

// Drain stops admitting connections, waits until every live one has ended
// or grace has passed, then closes the rest with reason shutdown and waits
// (at most wait more) for their removal. It returns how many it closed.
func (t *Tracker) Drain(grace, wait time.Duration) int {
	t.StopAdmitting()
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-t.Empty():
		return 0
	case <-timer.C:
	}
	left := t.Records()
	for _, r := range left {
		r.Close(ReasonShutdown)
	}
	timer.Reset(wait)
	select {
	case <-t.Empty():
	case <-timer.C:
	}
	return len(left)
}

// StopAdmitting refuses every later connection (reason shutdown); Drain
// does it first. Calling it again is harmless.
func (t *Tracker) StopAdmitting() { t.draining.Store(true) }

// Draining reports whether the tracker stopped admitting connections.
func (t *Tracker) Draining() bool { return t.draining.Load() }

// Stats is a snapshot of the tracker's counts, for the admin API.
type Stats struct {
	// Active counts live connections by state.
	Active map[State]int64 `json:"active"`
	// ActiveTotal counts all live connections.
	ActiveTotal int64 `json:"active_total"`
	// ConnectionsTotal counts connections since the process started, those
	// refused at admission included, so that it always equals ActiveTotal
	// plus the sum of Closed.
	ConnectionsTotal int64 `json:"connections_total"`
	// Closed counts closed connections by close reason.
	Closed map[CloseReason]int64 `json:"closed"`
	// DialFailures counts failed dial attempts by reason.
	DialFailures map[CloseReason]int64 `json:"dial_failures"`
	// ProxyProtocolRejected counts refused PROXY headers by reason.
	ProxyProtocolRejected map[ProxyRejectReason]int64 `json:"proxy_protocol_rejected"`
	// BytesUp and BytesDown count bytes moved client → upstream and
	// upstream → client, by closed and live connections.
	BytesUp   int64 `json:"bytes_up"`
	BytesDown int64 `json:"bytes_down"`
	// Sweeps counts sweeps run.
	Sweeps int64 `json:"sweeps"`
	// ZombiesReaped counts records the sweep had to reap; it must stay 0.
	ZombiesReaped int64 `json:"zombies_reaped"`
	// Draining is true once shutdown has started.
	Draining bool `json:"draining"`
}

// Stats returns the tracker's counts. Every known reason and state is
// present, with zeros, so a reader never has to guess about a missing key.
func (t *Tracker) Stats() Stats {
	st := Stats{
		Active:                make(map[State]int64, len(States)),
		Closed:                make(map[CloseReason]int64, len(CloseReasons)),
		DialFailures:          make(map[CloseReason]int64, 3),
		ProxyProtocolRejected: make(map[ProxyRejectReason]int64, len(ProxyRejectReasons)),
		Sweeps:                t.sweeps.Load(),
		ZombiesReaped:         t.zombies.Load(),
		Draining:              t.draining.Load(),
	}
	// Admission, state changes and removal move these counts under t.mu,
	// so reading them under it keeps ConnectionsTotal = ActiveTotal + the
	// sum of Closed exact at every read.
	t.mu.Lock()
	st.ConnectionsTotal = t.total.Load()
	for _, s := range States {
		n := t.CountInState(s)
		st.Active[s] = n
		st.ActiveTotal += n
	}
	for _, r := range CloseReasons {
		st.Closed[r] = t.Closed(r)
	}
	t.mu.Unlock()
	for _, r := range []CloseReason{ReasonConnectTimeout, ReasonConnectRefused, ReasonConnectFailed} {
		st.DialFailures[r] = t.DialFailures(r)
	}
	for _, r := range ProxyRejectReasons {
		st.ProxyProtocolRejected[r] = t.ProxyRejections(r)
	}
	st.BytesUp, st.BytesDown = t.Bytes()
	return st
}

// Bytes returns the bytes moved each way by closed and live connections.
func (t *Tracker) Bytes() (up, down int64) {
	up, down = t.closedBytesUp.Load(), t.closedBytesDown.Load()
	t.mu.Lock()
	for _, r := range t.records {
		up += r.bytesUp.Load()
		down += r.bytesDown.Load()
	}
	t.mu.Unlock()
	return up, down
}

// LastSweep returns when the last sweep started (the zero time before the
// first).
func (t *Tracker) LastSweep() time.Time {
	if ns := t.lastSweep.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// Sweeps returns how many sweeps ran.
func (t *Tracker) Sweeps() int64 { return t.sweeps.Load() }

// ZombiesReaped returns how many zombie records sweeps reaped.
func (t *Tracker) ZombiesReaped() int64 { return t.zombies.Load() }

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
