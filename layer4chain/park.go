package layer4chain

import "time"

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
		if d.timer == nil {
			d.timer = time.AfterFunc(time.Hour, d.wake)
			d.timer.Stop()
		}
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
		return false
	}
	if !due.IsZero() {
		d.timer.Reset(time.Until(due))
	}
	// What allowed parking may have changed meanwhile: the other direction
	// ended (half-close) or the pipe failed. Each of those looks at the
	// park state after changing, so one side or the other sees the change.
	if d.p.closing.Load() || d.p.r.State() != StateEstablished {
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
	if d.timer != nil {
		d.timer.Stop()
	}
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

// settleParked counts a parked direction as finished once the pipe has
// closed its sockets: no wake will come for it.
func (p *pipe) settleParked() {
	for _, d := range []*direction{&p.up, &p.down} {
		if d.state.CompareAndSwap(parked, finished) {
			if pk := getParker(); pk != nil {
				pk.forget(d)
			}
			if p.running.Add(-1) == 0 {
				p.end(p.reason())
			}
		}
	}
}
