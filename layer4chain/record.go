package layer4chain

import (
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Record is one proxied connection as the tracker knows it, from admission to
// removal. The goroutine serving the connection owns it: it creates it with
// Tracker.Admit and its deferred Tracker.Remove ends it, so no path can leave
// a record behind. Other goroutines (admin API, sweep) only read it or ask it
// to close.
type Record struct {
	// The fields a sweep reads come first and together, so a sweep over
	// many records touches one cache line of each.
	state        atomic.Uint32
	shut         atomic.Uint32 // shutClient | shutUpstream
	shutAt       atomic.Int64  // unix nanoseconds when both sockets were closed
	lastActivity atomic.Int64  // unix nanoseconds of the last byte moved
	connectBy    atomic.Int64  // unix nanoseconds; the connect phase's end
	idle         atomic.Int64  // Timeouts.Idle once established
	halfClose    atomic.Int64  // Timeouts.HalfClose once established
	lifetimeEnd  atomic.Int64  // unix nanoseconds; 0 for no max lifetime

	// ID identifies the record within this process.
	ID uint64
	// Server names the listener that accepted the connection.
	Server string
	// Client is the socket peer of the accepted connection.
	Client netip.AddrPort
	// Started is when the connection was admitted.
	Started time.Time

	tracker *Tracker
	scope   *scope
	span    any // Proxy.Tracer's handle; set once, before the record is established

	established atomic.Int64 // unix nanoseconds; 0 until established
	bytesUp     atomic.Int64 // client → upstream
	bytesDown   atomic.Int64 // upstream → client

	mu             sync.Mutex // guards the fields below, set while connecting
	chainID        string
	hop            int
	originalClient netip.AddrPort
	sni            string     // the TLS server name the client asked for, if known
	perClient      netip.Addr // the key counted against max_connections_per_client
	upstream       string
	template       string // the config's name of upstream, when it was a template filled for this connection
	reason         CloseReason
	interrupt      func() // closes the record's sockets; set by the owner
	closeRequested bool
	detail         string             // why, in more words than the reason: an error
	failedDials    []DialAttempt      // every failed dial attempt, in order
	sockets        [2]syscall.RawConn // client, upstream: for the kernel's view
}

// Bits of Record.shut.
const (
	shutClient   = 1 << iota // this hop closed the client socket
	shutUpstream             // this hop closed the upstream socket
)

// markShut records that this hop closed the given sockets, and when both
// were closed: from then on the owner has only to return and remove the
// record, which a sweep checks.
func (r *Record) markShut(bits uint32) {
	if old := r.shut.Or(bits); old|bits == shutClient|shutUpstream && old != shutClient|shutUpstream {
		r.shutAt.Store(time.Now().UnixNano())
	}
}

// setLimits records what the sweep enforces once the connection is
// established, when no deadline did.
func (r *Record) setLimits(t Timeouts) {
	r.idle.Store(int64(t.Idle))
	r.halfClose.Store(int64(t.HalfClose))
	if t.MaxLifetime > 0 {
		r.lifetimeEnd.Store(r.Started.Add(t.MaxLifetime).UnixNano())
	}
}

// State returns the record's current state.
func (r *Record) State() State { return State(r.state.Load()) }

// setState moves the record forward and keeps the tracker's per-state counts
// in step with the records. The counts move under the tracker's lock, so a
// reader holding it (Stats) never sees a record counted twice or not at all.
func (r *Record) setState(s State) {
	t := r.tracker
	t.mu.Lock()
	old := State(r.state.Swap(uint32(s)))
	if old != s {
		t.stateCounts[old].Add(-1)
		t.stateCounts[s].Add(1)
	}
	t.mu.Unlock()
	if o := t.Observer; o != nil && old != s {
		o.StateChanged(r, old, s)
	}
}

// touch records that bytes moved at now.
func (r *Record) touch(now time.Time) { r.lastActivity.Store(now.UnixNano()) }

// LastActivity returns when bytes last moved either way (or the admission
// time if none have).
func (r *Record) LastActivity() time.Time { return time.Unix(0, r.lastActivity.Load()) }

// BytesUp returns the bytes copied from client to upstream.
func (r *Record) BytesUp() int64 { return r.bytesUp.Load() }

// BytesDown returns the bytes copied from upstream to client.
func (r *Record) BytesDown() int64 { return r.bytesDown.Load() }

// ChainID returns the ID that follows this connection across hops.
func (r *Record) ChainID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.chainID
}

// Reason returns why the connection closed, or ReasonNone while it lives.
func (r *Record) Reason() CloseReason {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reason
}

// setReason records why the connection ends; the first reason wins, so a
// consequence (the other socket failing after a reset) never hides the cause.
func (r *Record) setReason(reason CloseReason) {
	r.mu.Lock()
	if r.reason == ReasonNone {
		r.reason = reason
	}
	r.mu.Unlock()
}

// setInterrupt installs how to close the record's sockets from outside. If a
// close was already requested, f runs at once.
func (r *Record) setInterrupt(f func()) {
	r.mu.Lock()
	r.interrupt = f
	requested := r.closeRequested
	r.mu.Unlock()
	if requested && f != nil {
		f()
	}
}

// Close asks the connection to end with the given reason (admin, shutdown, a
// limit enforced by the sweep). It returns at once; the owner notices its
// sockets closing and removes the record.
func (r *Record) Close(reason CloseReason) { r.closeWith(reason, "") }

// closeWith is Close with a detail, kept only when this close is the one
// that sets the reason.
func (r *Record) closeWith(reason CloseReason, detail string) {
	r.mu.Lock()
	if r.reason == ReasonNone {
		r.reason = reason
		if detail != "" && r.detail == "" {
			r.detail = detail
		}
	}
	r.closeRequested = true
	f := r.interrupt
	r.mu.Unlock()
	if f != nil {
		f()
	}
}

// closedFromOutside says whether Close was called (admin, shutdown, a
// sweep): a read or write failing after it is that close, not the peer's.
func (r *Record) closedFromOutside() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closeRequested
}

// RecordInfo is a snapshot of a Record, safe to keep and encode.
type RecordInfo struct {
	ID             uint64 `json:"id"`
	ChainID        string `json:"chain_id"`
	Hop            int    `json:"hop"`
	State          State  `json:"state"`
	Server         string `json:"server"`
	Client         string `json:"client"`
	OriginalClient string `json:"original_client"`
	Upstream       string `json:"upstream"`
	// UpstreamTemplate is the upstream as the config names it, when that
	// was a template (an address with placeholders) that this connection
	// filled to Upstream; "" otherwise. /layer4chain/upstreams and the
	// metrics know the upstream by this name.
	UpstreamTemplate string      `json:"upstream_template,omitempty"`
	Started          time.Time   `json:"started"`
	Established      *time.Time  `json:"established,omitempty"`
	LastActivity     time.Time   `json:"last_activity"`
	BytesUp          int64       `json:"bytes_up"`
	BytesDown        int64       `json:"bytes_down"`
	Reason           CloseReason `json:"close_reason,omitempty"`
	// Detail says more than the reason where there is more to say: the
	// dial error, or why a PROXY header was rejected.
	Detail string `json:"close_detail,omitempty"`
	// SNI is the TLS server name the client asked for, where it is known:
	// found by a tls matcher at the first hop, and carried to the next
	// hops in the PROXY v2 header's authority.
	SNI string `json:"sni,omitempty"`
	// FailedDials lists the connection's failed dial attempts, in order,
	// including those it failed over from.
	FailedDials []DialAttempt `json:"failed_dials,omitempty"`
	// ClientSocket and UpstreamSocket are the kernel's view of each socket
	// (TCP_INFO), where the platform provides it and the socket is open.
	ClientSocket   *SocketInfo `json:"client_socket,omitempty"`
	UpstreamSocket *SocketInfo `json:"upstream_socket,omitempty"`
}

// Info returns a consistent snapshot of the record, without the sockets'
// kernel view (see InfoWithSockets).
func (r *Record) Info() RecordInfo {
	info := RecordInfo{
		ID:           r.ID,
		State:        r.State(),
		Server:       r.Server,
		Client:       r.Client.String(),
		Started:      r.Started,
		LastActivity: r.LastActivity(),
		BytesUp:      r.bytesUp.Load(),
		BytesDown:    r.bytesDown.Load(),
	}
	if ns := r.established.Load(); ns != 0 {
		t := time.Unix(0, ns)
		info.Established = &t
	}
	r.mu.Lock()
	info.ChainID = r.chainID
	info.Hop = r.hop
	if r.originalClient.IsValid() { // unknown until a PROXY header was read
		info.OriginalClient = r.originalClient.String()
	}
	info.Upstream, info.UpstreamTemplate = r.upstream, r.template
	info.SNI = r.sni
	info.Reason = r.reason
	info.Detail = r.detail
	info.FailedDials = slices.Clone(r.failedDials)
	r.mu.Unlock()
	return info
}

// setSNI records the TLS server name the client asked for ("" for none
// known).
func (r *Record) setSNI(sni string) {
	r.mu.Lock()
	r.sni = sni
	r.mu.Unlock()
}

// addFailedDial records a failed dial attempt of the connection.
func (r *Record) addFailedDial(a DialAttempt) {
	r.mu.Lock()
	r.failedDials = append(r.failedDials, a)
	r.mu.Unlock()
}

// setDetail records the error behind the close reason.
func (r *Record) setDetail(err error) {
	r.mu.Lock()
	if r.detail == "" {
		r.detail = err.Error()
	}
	r.mu.Unlock()
}

// InfoWithSockets is Info plus the kernel's view of each open socket, which
// costs a system call per socket.
func (r *Record) InfoWithSockets() RecordInfo {
	info := r.Info()
	r.mu.Lock()
	client, upstream := r.sockets[0], r.sockets[1]
	r.mu.Unlock()
	info.ClientSocket = socketInfo(client)
	info.UpstreamSocket = socketInfo(upstream)
	return info
}

// rawSockets returns the RawConns kept by setSockets (nil where none).
func (r *Record) rawSockets() (client, upstream syscall.RawConn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sockets[0], r.sockets[1]
}

// setSockets keeps the raw sockets, for the kernel's view in Info and for
// the pipe's reads.
func (r *Record) setSockets(client, upstream net.Conn) {
	raw := func(c net.Conn) syscall.RawConn {
		if sc, ok := c.(syscall.Conn); ok {
			if rc, err := sc.SyscallConn(); err == nil {
				return rc
			}
		}
		return nil
	}
	r.mu.Lock()
	r.sockets = [2]syscall.RawConn{raw(client), raw(upstream)}
	r.mu.Unlock()
}

// Span returns what the Proxy's Tracer returned for the connection, nil
// when no tracer made a span of it (or before it did). The Observer reads
// it, on the connection's goroutine or, for Closed, on the one removing the
// record.
func (r *Record) Span() any { return r.span }
