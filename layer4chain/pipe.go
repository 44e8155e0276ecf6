package layer4chain

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Timeouts are the limits of an established connection. Zero disables one.
type Timeouts struct {
	// Idle ends a connection that moved no byte either way for this long.
	Idle time.Duration
	// HalfClose ends a half-closed connection whose remaining direction
	// moved no byte for this long. It is an inactivity limit, so a live
	// stream in the remaining direction is never cut.
	HalfClose time.Duration
	// MaxLifetime ends a connection this long after it was admitted.
	MaxLifetime time.Duration
}

// bufSize is the copy chunk. 64 KiB keeps syscalls per byte low on fast
// links; a buffer is held only while bytes are in flight (see direction.read),
// so idle connections cost none.
const bufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

func getBuf() *[]byte  { return bufPool.Get().(*[]byte) }
func putBuf(b *[]byte) { bufPool.Put(b) }

// closeWriter is a connection whose write side can be closed on its own.
type closeWriter interface{ CloseWrite() error }

// pipe copies the two directions of one established connection, either
// with the owner's goroutine waiting for the end (run) or on two goroutines
// of its own (start).
type pipe struct {
	r        *Record
	t        Timeouts
	client   net.Conn
	upstream net.Conn
	// The TCP sockets under client and upstream (the same connections
	// unless TLS wraps them), for linger and the FIN after close_notify;
	// nil where unknown.
	clientTCP, upstreamTCP tcpSocket

	up   direction // client → upstream
	down direction // upstream → client

	finished    atomic.Int32 // directions that ended with EOF
	firstClosed CloseReason  // who ended first, for a graceful close
	closeOnce   sync.Once
	wg          sync.WaitGroup // run: the downstream goroutine

	// start: directions not yet finished, and what the last one calls.
	running   atomic.Int32
	end       func(CloseReason)
	closing   atomic.Bool   // fail has begun closing the sockets
	parkAfter time.Duration // tests shorten defaultParkAfter
}

// direction is one way through the pipe: it reads src and writes dst.
type direction struct {
	p        *pipe
	src, dst net.Conn
	dstTCP   tcpSocket // the socket under dst, nil where unknown
	bytes    *atomic.Int64

	closed   CloseReason // src sent EOF
	srcReset CloseReason // src failed
	dstReset CloseReason // dst failed

	// Readiness-first reads on a raw socket: see read.
	raw    syscall.RawConn
	readFn func(fd uintptr) bool
	buf    *[]byte
	n      int
	err    error

	// Reads of a TLS src: see readTLS. one is where an idle read waits.
	tls *tls.Conn
	one [1]byte

	writeDeadline time.Time   // as last set on dst by this direction
	rearmWrite    atomic.Bool // the other direction set dst's write deadline

	// Parking (detached pipes only; see defaultParkAfter).
	state      atomic.Int32 // running, parked or finished
	registered bool         // the socket is known to the parker's epoll
	parkFD     int32
	wokeAt     time.Time   // when the parker last woke this direction
	timer      *time.Timer // wakes the parked client → upstream direction at its deadline

	// screen, while not nil, holds back src's first bytes until they are
	// known not to be a PROXY header (client → upstream only; see screen).
	screen *screen
	// sniff: src's first chunk is screened if it could start a PROXY
	// header (client → upstream only; see Proxy.sniffsHeader).
	sniff bool
}

// newPipe makes the pipe of an established connection. It does not close
// the sockets on a graceful end; the caller owns them.
//
// sc, when not nil, screens the client's first bytes for a PROXY header.
// The screening is the first phase of the client → upstream direction, so
// the upstream may speak first while it lasts. clientTCP, when not nil, is
// the TCP socket under a wrapped client (TLS terminated before this hop).
func newPipe(r *Record, client net.Conn, clientTCP tcpSocket, upstream net.Conn, t Timeouts, sc *screen) *pipe {
	p := &pipe{r: r, t: t, client: client, upstream: upstream,
		clientTCP: clientTCP, upstreamTCP: tcpOf(upstream, nil)}
	p.up = direction{p: p, src: client, dst: upstream, dstTCP: p.upstreamTCP, bytes: &r.bytesUp,
		closed: ReasonClientClosed, srcReset: ReasonClientReset, dstReset: ReasonUpstreamReset,
		screen: sc}
	p.down = direction{p: p, src: upstream, dst: client, dstTCP: p.clientTCP, bytes: &r.bytesDown,
		closed: ReasonUpstreamClosed, srcReset: ReasonUpstreamReset, dstReset: ReasonClientReset}
	clientRaw, upstreamRaw := r.rawSockets()
	p.up.init(clientRaw)
	p.down.init(upstreamRaw)
	return p
}

// run copies both directions until both have ended or one failed or a
// limit was hit, and returns why the connection ended. The calling
// goroutine copies client → upstream; one more copies the other way.
func (p *pipe) run() CloseReason {
	p.arm()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.down.copy()
	}()
	p.up.copy()
	p.wg.Wait()
	return p.reason()
}

// arm sets the sockets' first deadlines (with the park deadline when the
// pipe is detached). It runs on the caller's goroutine, whose stack is
// already deep: the runtime's timer code would otherwise make each small
// copy goroutine grow (a stack copy) at its first deadline.
func (p *pipe) arm() {
	now := time.Now()
	for _, d := range []*direction{&p.up, &p.down} {
		d.armRead()
		d.armWrite(now)
	}
}

// start copies both directions on two new goroutines and returns at once;
// the one that finishes last calls end with why the connection ended.
func (p *pipe) start(end func(CloseReason)) {
	p.running.Store(2)
	p.end = end
	// Closing from outside must wake parked directions: no socket event
	// comes for a descriptor closed here.
	p.r.setInterrupt(func() {
		p.r.markShut(shutClient | shutUpstream)
		_ = p.client.Close()
		_ = p.upstream.Close()
		p.up.wake()
		p.down.wake()
	})
	p.arm()
	go p.up.copyAndEnd()
	go p.down.copyAndEnd()
}

// reason is why the connection ended, once both directions are done.
func (p *pipe) reason() CloseReason {
	if reason := p.r.Reason(); reason != ReasonNone {
		return reason
	}
	return p.firstClosed
}

// fail ends the whole connection at once: both sockets are closed, which
// wakes the other direction. After a reset the surviving peer gets a reset
// too (SO_LINGER 0), so the failure is passed on rather than disguised as a
// clean end.
func (p *pipe) fail(reason CloseReason, reset bool) {
	p.r.setReason(reason)
	p.closing.Store(true)
	defer p.settleParked()
	p.closeOnce.Do(func() {
		p.r.markShut(shutClient | shutUpstream)
		if reset {
			for _, tc := range []tcpSocket{p.clientTCP, p.upstreamTCP} {
				if tc != nil {
					_ = tc.SetLinger(0)
					// The socket itself first: a TLS wrapper's Close sends
					// close_notify, a clean end, ahead of the reset.
					_ = tc.Close()
				}
			}
		}
		_ = p.client.Close()
		_ = p.upstream.Close()
	})
}

// limit returns the inactivity limit that applies in state s.
func (p *pipe) limit(s State) (time.Duration, CloseReason) {
	if s == StateHalfClosed {
		return p.t.HalfClose, ReasonHalfCloseTimeout
	}
	return p.t.Idle, ReasonIdleTimeout
}

// deadline returns when the connection expires if no byte moves after
// lastActive, in state s; zero means never.
func (p *pipe) deadline(s State, lastActive time.Time) time.Time {
	var dl time.Time
	if lim, _ := p.limit(s); lim > 0 {
		dl = lastActive.Add(lim)
	}
	if p.t.MaxLifetime > 0 {
		if end := p.r.Started.Add(p.t.MaxLifetime); dl.IsZero() || end.Before(dl) {
			dl = end
		}
	}
	return dl
}

// expired says whether a limit is reached at now, and which.
func (p *pipe) expired(now time.Time) (CloseReason, bool) {
	if p.t.MaxLifetime > 0 && !now.Before(p.r.Started.Add(p.t.MaxLifetime)) {
		return ReasonMaxLifetime, true
	}
	lim, reason := p.limit(p.r.State())
	if lim > 0 && now.Sub(p.r.LastActivity()) >= lim {
		return reason, true
	}
	return ReasonNone, false
}

// init sets up readiness-first reads when src is a plain TCP socket (a
// wrapper may buffer bytes that reading its fd would skip), and bufferless
// waits when it is a TLS connection. raw is src's RawConn as the record
// keeps it.
func (d *direction) init(raw syscall.RawConn) {
	switch c := d.src.(type) {
	case tcpSocket:
		if rawReadSupported && raw != nil {
			d.raw = raw
			d.readFn = d.readFd
		}
	case *tls.Conn:
		if tlsReadsBufferless {
			d.tls = c
		}
	}
}

// armRead sets src's read deadline for the current state. It re-reads the
// state after setting it, so a concurrent half-close (which pokes this
// direction after changing state) can never be overwritten by a deadline
// computed for the old state.
func (d *direction) armRead() {
	for {
		// The other direction's park state too: parking, it nudges this
		// one (see park), and a deadline computed before must not hide it.
		s, ps := d.p.r.State(), d.other().state.Load()
		dl := d.p.deadline(s, d.p.r.LastActivity())
		for _, other := range [2]time.Time{d.screen.deadline(), d.parkDeadline()} {
			if !other.IsZero() && (dl.IsZero() || other.Before(dl)) {
				dl = other
			}
		}
		_ = d.src.SetReadDeadline(dl)
		if d.p.r.State() == s && d.other().state.Load() == ps {
			return
		}
	}
}

// armWrite keeps dst's write deadline at the connection's expiry (a limit
// after its last activity), without a deadline update per chunk: only when
// it has fallen an eighth of the limit behind. On a plain socket it fires
// a quarter of the limit after now at the latest, so that a write blocked
// on a slow reader looks for the reader's progress (see write) in steps
// before the limit is reached; a TLS write cannot be resumed after a
// timeout, so there it fires at the expiry.
func (d *direction) armWrite(now time.Time) {
	s := d.p.r.State()
	dl := d.p.deadline(s, d.p.r.LastActivity())
	lim, _ := d.p.limit(s)
	if _, isTLS := d.dst.(*tls.Conn); lim > 0 && !isTLS {
		if check := now.Add(lim / 4); check.Before(dl) {
			dl = check
		}
	}
	// The deadline set last is kept unless the other direction moved it
	// (it half-closed), or it has passed: dl lies after now (or is zero, no
	// deadline), as the connection has not expired, and a passed deadline
	// would fail every Write at once, without waiting.
	rearm := d.rearmWrite.Load() && d.rearmWrite.CompareAndSwap(true, false)
	if !rearm && (dl.Equal(d.writeDeadline) || (d.writeDeadline.After(now) && !dl.IsZero() && !dl.Before(d.writeDeadline) && dl.Sub(d.writeDeadline) < lim/8)) {
		return // a shorter limit (the half-closed state's) always applies at once
	}
	d.writeDeadline = dl
	_ = d.dst.SetWriteDeadline(dl)
}

// copy moves bytes from src to dst until src ends, a limit is hit or either
// socket fails, or until it parks (it then returns true: see park).
func (d *direction) copy() (parked bool) {
	for {
		buf, n, err := d.read()
		if n > 0 {
			now := time.Now()
			d.p.r.touch(now)
			b := (*buf)[:n]
			if d.sniff {
				d.sniff = false
				if v1, v2, _ := matchSignature(b); v1 || v2 {
					d.screen = headerNotReadScreen()
				}
			}
			if d.screen != nil {
				switch d.screen.next(b, now) {
				case verdictHold:
					b = nil
					d.armRead() // the held prefix has a deadline of its own
				case verdictReject:
					putBuf(buf)
					d.reject(ProxyRejectUntrusted, d.screen.refusal)
					return
				case verdictForward:
					if !d.release() {
						putBuf(buf)
						return
					}
				}
			}
			if len(b) > 0 {
				written, werr := d.write(b, now)
				d.bytes.Add(int64(written))
				if werr != nil {
					putBuf(buf)
					d.writeFailed(werr)
					return
				}
				// A write the peer was slow to take is activity until it
				// ends: under backpressure the read above may be long past.
				d.p.r.touch(time.Now())
			}
		}
		if buf != nil {
			putBuf(buf)
		}
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			now := time.Now()
			if sdl := d.screen.deadline(); !sdl.IsZero() && !now.Before(sdl) {
				if !d.screen.stallForwards {
					d.reject(ProxyRejectTimeout, err)
					return
				}
				// Not a header after all: the client's own bytes.
				if !d.release() {
					return
				}
			}
			if reason, expired := d.p.expired(now); expired {
				d.p.fail(reason, false)
				return
			}
			if pdl := d.parkDeadline(); !pdl.IsZero() && !now.Before(pdl) && d.park() {
				return true
			}
			d.armRead()
		case err == io.EOF:
			// A held prefix cut short by EOF can no longer be a header:
			// it is the client's last word, and reaches the upstream.
			if !d.release() {
				return
			}
			d.finish()
			return
		default:
			d.readFailed(err)
			return
		}
	}
}

// read returns the next chunk of src. On a raw socket it waits for
// readability first and takes a buffer from the pool only when bytes are
// there, so an idle connection holds no buffer.
func (d *direction) read() (*[]byte, int, error) {
	if d.tls != nil {
		return d.readTLS()
	}
	if d.raw == nil {
		b := getBuf()
		n, err := d.src.Read(*b)
		return b, n, err
	}
	d.buf, d.n, d.err = nil, 0, nil
	if err := d.raw.Read(d.readFn); err != nil {
		return nil, 0, err
	}
	return d.buf, d.n, d.err
}

// write writes all of b to dst and returns how much of it dst took. A
// write that times out is retried while the connection as a whole is not
// expired (the other direction may be busy). A reader that acknowledged
// bytes between two timeouts of this write is active however slowly it
// reads: a sender blocked on a full socket buffer is woken only once a
// third of it has drained, which may take longer than a limit. (What the
// blocked write itself got into the buffer says nothing of the reader.)
func (d *direction) write(b []byte, now time.Time) (int, error) {
	written := 0
	var acked uint64
	ackedKnown := false // the reader's progress is measured within this write
	for {
		d.armWrite(now)
		n, err := d.dst.Write(b)
		written += n
		if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			return written, err
		}
		if _, ok := d.dst.(*tls.Conn); ok {
			// A TLS connection whose write timed out is broken for good:
			// the peer took no byte for a whole limit.
			lim, reason := d.p.limit(d.p.r.State())
			if lim <= 0 {
				reason = ReasonMaxLifetime
			}
			return written, &limitError{reason}
		}
		b = b[n:]
		now = time.Now()
		nowAcked, known := bytesAcked(d.dstTCP)
		if known && ackedKnown && nowAcked != acked {
			d.p.r.touch(now)
		}
		acked, ackedKnown = nowAcked, known
		if reason, expired := d.p.expired(now); expired {
			return written, &limitError{reason}
		}
	}
}

// release ends screening: the held bytes, if any, are the client's and go
// to dst before anything read after them. It returns false if the
// connection ended because the write failed.
func (d *direction) release() bool {
	sc := d.screen
	if sc == nil {
		return true
	}
	d.screen = nil
	held := sc.heldBytes()
	if len(held) == 0 {
		return true
	}
	written, err := d.write(held, time.Now())
	d.bytes.Add(int64(written))
	if err != nil {
		d.writeFailed(err)
		return false
	}
	return true
}

// reject refuses the PROXY header found while screening. Nothing of it
// was forwarded; both sockets are closed.
func (d *direction) reject(reason ProxyRejectReason, cause error) {
	rejectHeader(d.p.r, &ProxyRejectError{Reason: reason, Err: cause})
	d.p.fail(ReasonProxyProtocolRejected, false)
}

// limitError is a write abandoned because a limit expired.
type limitError struct{ reason CloseReason }

func (e *limitError) Error() string { return string(e.reason) }

// finish passes src's EOF on to dst. The first direction to finish makes the
// connection half-closed and wakes the other so it re-arms with the
// half-close limit.
func (d *direction) finish() {
	if !canCloseWrite(d.dst) {
		// Without a way to send EOF alone, the peer would wait forever for
		// the end of a response: end the whole connection instead.
		d.p.fail(d.closed, false)
		return
	}
	// Count before passing the EOF on: once the peer sees it, it may end
	// the other direction at once, and that one must not count as first.
	if d.p.finished.Add(1) == 2 {
		// Both directions are done and the owner closes both sockets next,
		// which sends this FIN anyway (dst's input was read to EOF, so the
		// close is clean): save the shutdown(2).
		return
	}
	d.p.firstClosed = d.closed
	// The half-close is an event of the connection: the half-close limit
	// counts from it, not from a byte that may have moved long before.
	d.p.r.touch(time.Now())
	d.p.r.setState(StateHalfClosed)
	if err := closeWrite(d.dst, d.dstTCP); err != nil && !errors.Is(err, net.ErrClosed) {
		d.p.fail(d.dstReset, true)
		return
	}
	now := time.Now()
	_ = d.dst.SetReadDeadline(now)
	// A write of the other direction blocked under the established limit
	// re-arms with the half-close limit too (a TLS write would not survive
	// the wake: it keeps its deadline, and the sweep enforces the rest).
	if _, isTLS := d.src.(*tls.Conn); !isTLS {
		_ = d.src.SetWriteDeadline(now)
		d.other().rearmWrite.Store(true) // after: its next arm must set a deadline again
	}
}

func (d *direction) readFailed(err error) {
	if errors.Is(err, net.ErrClosed) {
		// Closed by fail or by Record.Close, which recorded the reason.
		d.p.fail(ReasonNone, false)
		return
	}
	// The error says what the reason cannot: a reset, or a TLS alert such
	// as a next hop refusing this hop's client certificate.
	d.p.r.setDetail(socketError(err))
	d.p.fail(d.srcReset, true)
}

// socketError is the system's error under err when there is one ("connection
// reset by peer"), so a reset reads the same whether it came through a raw
// read or a TLS session's; err itself otherwise (a TLS alert).
func socketError(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return err
}

func (d *direction) writeFailed(err error) {
	var le *limitError
	switch {
	case errors.As(err, &le):
		d.p.fail(le.reason, false)
	case errors.Is(err, net.ErrClosed):
		d.p.fail(ReasonNone, false)
	default:
		d.p.r.setDetail(socketError(err))
		d.p.fail(d.dstReset, true)
	}
}

// defaultParkAfter is how long a detached connection stays quiet before
// its directions park. The upstream → client direction parks first: its
// goroutine ends, and the parker starts a new one when the upstream next
// sends (or closes). The client → upstream direction follows, and a timer
// stands in for its read deadline (the idle, half-close and lifetime
// limits). An idle connection then holds no goroutine at all.
const defaultParkAfter = time.Second

// Park states of a direction.
const (
	running  int32 = iota // a goroutine carries the direction
	parked                // no goroutine: the parker or the other direction resumes it
	finished              // done, and counted as done in pipe.running
)

// parkable says whether d may park now: a direction of a detached pipe
// reading a raw socket, while the connection is established; the
// upstream → client direction first, then the other, unless it is still
// screening for a PROXY header.
func (d *direction) parkable() bool {
	p := d.p
	if p.end == nil || d.raw == nil || p.r.State() != StateEstablished {
		return false
	}
	return d == &p.down || (d.screen == nil && p.down.state.Load() == parked)
}

// parkDeadline is when d parks if nothing moves; zero if it cannot.
func (d *direction) parkDeadline() time.Time {
	if !d.parkable() {
		return time.Time{}
	}
	last := d.p.r.LastActivity()
	if d.wokeAt.After(last) {
		last = d.wokeAt
	}
	if d.p.parkAfter > 0 {
		return last.Add(d.p.parkAfter)
	}
	return last.Add(defaultParkAfter)
}

// park hands d to the parker. It returns false if d must go on running on
// this goroutine; true if this goroutine must leave d alone (parked, or
// already taken over by another).
func (d *direction) park() bool {
	pk := getParker()
	if pk == nil {
		return false
	}
	// The client → upstream direction enforces the connection's limits:
	// parked, a timer wakes it when the next one is due.
	var due time.Time
	if d == &d.p.up {
		if due = d.p.deadline(d.p.r.State(), d.p.r.LastActivity()); !due.IsZero() && !time.Now().Before(due) {
			return false
		}
	}
	if !due.IsZero() {
		if d.timer == nil {
			d.timer = time.AfterFunc(time.Hour, d.wake)
			d.timer.Stop()
		}
		// Set before parking, so that whoever finishes d while parked
		// (settleParked, done) stops it after this, never before.
		d.timer.Reset(time.Until(due))
	}
	var armed, taken bool
	err := d.raw.Control(func(fd uintptr) {
		d.state.Store(parked)
		if armed = pk.arm(int(fd), d); !armed {
			// A failing pipe may have settled d as finished meanwhile.
			taken = !d.state.CompareAndSwap(parked, running)
		}
	})
	if taken {
		return true
	}
	if err != nil || !armed {
		d.stopTimer()
		return false
	}
	// What allowed parking may have changed meanwhile: the other direction
	// ended (half-close) or the pipe failed. Each of those looks at the
	// park state after changing, so one side or the other sees the change.
	// And a timer that fired before d was parked woke nothing: then the
	// limit is due, and d goes on running to enforce it.
	if d.p.closing.Load() || d.p.r.State() != StateEstablished || (!due.IsZero() && !time.Now().Before(due)) {
		if d.unpark() {
			pk.forget(d)
			return false
		}
	}
	if d == &d.p.down {
		// Let the client → upstream direction see that it may park too.
		_ = d.p.client.SetReadDeadline(time.Now())
	}
	return true
}

// wake carries a parked direction on, on a new goroutine: its socket
// became readable, its timer fired, or its connection is being closed.
func (d *direction) wake() {
	if d.unpark() {
		if pk := getParker(); pk != nil {
			pk.forget(d)
		}
		go d.resume()
	}
}

// unpark takes a parked direction back; only one caller wins.
func (d *direction) unpark() bool { return d.state.CompareAndSwap(parked, running) }

// resume carries on a direction the parker woke.
func (d *direction) resume() {
	d.wokeAt = time.Now()
	d.armRead()
	d.copyAndEnd()
}

// copyAndEnd is a detached direction's goroutine: kept to the copy loop, so
// its stack stays the smallest the runtime gives while it waits.
func (d *direction) copyAndEnd() {
	for d != nil {
		if d.copy() {
			return // parked, or taken over by another goroutine
		}
		d = d.done()
	}
}

// done counts d as finished; the last direction to finish ends the
// connection. If the other direction waits parked, it is returned: this
// goroutine carries it on, under the limits of the new state.
func (d *direction) done() *direction {
	d.state.Store(finished)
	d.stopTimer()
	if d.p.running.Add(-1) == 0 {
		d.p.end(d.p.reason())
		return nil
	}
	o := d.other()
	if o.unpark() {
		if pk := getParker(); pk != nil {
			pk.forget(o)
		}
		o.armRead()
		return o
	}
	return nil
}

// other is the pipe's other direction.
func (d *direction) other() *direction {
	if d == &d.p.up {
		return &d.p.down
	}
	return &d.p.up
}

// stopTimer ends a finished direction's limit timer, if it parked: a
// pending timer would keep the pipe and its record reachable until the
// limit, long after the connection ended.
func (d *direction) stopTimer() {
	if d.timer != nil {
		d.timer.Stop()
	}
}

// settleParked counts a parked direction as finished once the pipe has
// closed its sockets: no wake will come for it.
func (p *pipe) settleParked() {
	for _, d := range []*direction{&p.up, &p.down} {
		if d.state.CompareAndSwap(parked, finished) {
			d.stopTimer()
			if pk := getParker(); pk != nil {
				pk.forget(d)
			}
			if p.running.Add(-1) == 0 {
				p.end(p.reason())
			}
		}
	}
}

// readTLS returns the next chunk of a TLS src without holding a copy buffer
// while waiting: it waits in a one-byte read (tls.Conn decrypts a whole
// record into its own buffer and gives out one byte), then takes a buffer
// and reads the rest of that record, which is already decrypted, so the
// second read never waits. Records that carry no application data (TLS 1.3
// session tickets, key updates) are handled inside the first read.
func (d *direction) readTLS() (*[]byte, int, error) {
	c := d.tls
	if tlsBuffered(c) > 0 {
		b := getBuf()
		n, err := c.Read(*b)
		return b, n, err
	}
	n, err := c.Read(d.one[:])
	if n == 0 {
		return nil, 0, err
	}
	b := getBuf()
	(*b)[0] = d.one[0]
	if err != nil || tlsBuffered(c) == 0 {
		return b, 1, err
	}
	m, err := c.Read((*b)[1:])
	return b, 1 + m, err
}

// tcpSocket is what the pipe needs of a TCP socket: a *net.TCPConn, or a
// socket taken over from its server (TakeOver).
type tcpSocket interface {
	net.Conn
	syscall.Conn
	CloseWrite() error
	SetLinger(sec int) error
}

// tcpOf returns the TCP socket under c: c itself, or the socket under a
// TLS connection; hint, when not nil, is the caller's knowledge of it (a
// wrapper this package cannot see through).
func tcpOf(c net.Conn, hint *net.TCPConn) tcpSocket {
	if hint != nil {
		return hint
	}
	for range 8 {
		switch x := c.(type) {
		case tcpSocket:
			return x
		case interface{ NetConn() net.Conn }:
			c = x.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// closeWrite ends c's write side. Over TLS that is a close_notify alert
// (the peer reads EOF) followed by the TCP socket's FIN, so a peer that
// watches the socket sees the half-close too.
func closeWrite(c net.Conn, sock tcpSocket) error {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return c.(closeWriter).CloseWrite()
	}
	if err := tc.CloseWrite(); err != nil {
		return err
	}
	if sock != nil {
		return sock.CloseWrite()
	}
	return nil
}

// canCloseWrite says whether closeWrite can end c's write side alone.
func canCloseWrite(c net.Conn) bool {
	_, ok := c.(closeWriter)
	return ok
}
