package modules

import (
	"maps"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

// caddy-l4's accept loop (layer4.Server.serve) returns on any accept error
// that is no timeout, EMFILE included, and nothing accepts on that
// listener again until a reload: its queue fills and every new client
// waits, then times out. The connection limit keeps proxied connections
// from exhausting the file limit, but a connect burst that outruns the
// handlers can still hold enough accepted, not yet admitted sockets to
// reach it. So the app watches the layer4 listeners' accept queues, and a
// listener whose queue holds connections at stalledChecks checks in a row,
// never shrinking, is taken for dead: the app accepts on it itself, with
// the backoff net/http uses, through the same routes, until this config
// stops. A live loop that a flood keeps behind for seconds looks the same;
// for it, the second accept loop only helps drain the queue.
const (
	// stalledChecks is how many checks in a row find a listener's queue
	// held before it is rescued.
	stalledChecks = 3
	// watchEvery spaces the checks, whatever the sweep interval: three
	// checks must span seconds, longer than a burst a live accept loop
	// is still working through.
	watchEvery = time.Second
	// rescanEvery spaces the scans of /proc/self/fd (a few system calls
	// per descriptor, so per connection) while no listener is known yet;
	// once found, listeners are scanned for again only when one is gone.
	rescanEvery = 10
	// queueSamples is how many times a check reads a held queue.
	queueSamples = 3
	// prefetchBuffer is the prefetch buffer caddy-l4 gives a connection.
	prefetchBuffer = 2048
)

// listenerWatch is one app's watch over the layer4 listeners of its config.
// Only the sweep goroutine uses it.
type listenerWatch struct {
	app     *App
	sockets []layer4chain.ListeningSocket
	checks  int                       // since the watch began
	stale   bool                      // a known socket is gone: scan again
	last    time.Time                 // of the last check
	held    map[netip.AddrPort]int    // checks in a row that found the queue held
	queued  map[netip.AddrPort]uint32 // the queue at the last check
	rescued map[netip.AddrPort]func() // stops the rescue of that listener
}

// check looks at every layer4 listener's accept queue once, and rescues the
// listeners found dead.
func (w *listenerWatch) check(now time.Time) {
	if w.app.tracker.Draining() {
		return // the drain stopped the listeners on purpose
	}
	if now.Sub(w.last) < watchEvery {
		return
	}
	w.last = now
	l4 := w.app.layer4()
	if l4 == nil {
		return
	}
	if w.held == nil {
		w.held, w.queued, w.rescued = map[netip.AddrPort]int{}, map[netip.AddrPort]uint32{}, map[netip.AddrPort]func(){}
	}
	if w.stale || (len(w.sockets) == 0 && w.checks%rescanEvery == 0) {
		w.stale = false
		addrs, err := listenAddrs(l4)
		if err != nil {
			return
		}
		w.sockets, _ = layer4chain.ListeningSockets(listensOn(addrs))
	}
	w.checks++
	checked := make(map[netip.AddrPort]bool, len(w.sockets))
	for _, s := range w.sockets {
		if _, done := w.rescued[s.Local]; done || checked[s.Local] {
			continue // one socket may have several descriptors
		}
		checked[s.Local] = true
		s, ok := lowestQueue(s)
		if !ok {
			w.stale = true
			continue
		}
		if s.Queued > 0 && s.Queued >= w.queued[s.Local] {
			w.held[s.Local]++
		} else {
			w.held[s.Local] = 0
		}
		w.queued[s.Local] = s.Queued
		if w.held[s.Local] >= stalledChecks {
			w.rescue(l4, s)
		}
	}
}

// lowestQueue reads s's accept queue a few times a millisecond apart and
// keeps the lowest: a live accept loop under load empties its queue often,
// a dead one never.
func lowestQueue(s layer4chain.ListeningSocket) (layer4chain.ListeningSocket, bool) {
	lowest, ok := s.Refresh()
	for i := 1; ok && i < queueSamples && lowest.Queued > 0; i++ {
		time.Sleep(time.Millisecond)
		var again layer4chain.ListeningSocket
		if again, ok = s.Refresh(); ok {
			lowest.Queued = min(lowest.Queued, again.Queued)
		}
	}
	return lowest, ok
}

// rescue accepts on s for the layer4 server that listens there.
func (w *listenerWatch) rescue(l4 *layer4.App, s layer4chain.ListeningSocket) {
	name, srv := serverOf(l4, s.Local)
	if srv == nil {
		return
	}
	logger := w.app.logger
	handler := srv.Routes.Compile(logger, time.Duration(srv.MatchingTimeout),
		layer4.HandlerFunc(func(*layer4.Connection) error { return nil }))
	serve := func(c net.Conn) {
		defer c.Close()
		cx := layer4.WrapConnection(c, make([]byte, 0, prefetchBuffer), logger)
		if err := handler.Handle(cx); err != nil {
			logger.Error("handling connection", zap.String("server", name), zap.String("remote", c.RemoteAddr().String()), zap.Error(err))
		}
	}
	var lastLog time.Time
	stop, err := layer4chain.RescueListener(s.FD, serve, func(err error) {
		if now := time.Now(); now.Sub(lastLog) >= time.Second { // at most a line a second
			lastLog = now
			logger.Error("accepting on a rescued layer4 listener", zap.String("listener", s.Local.String()), zap.Error(err))
		}
	})
	if err != nil {
		logger.Error("could not rescue a layer4 listener that stopped accepting", zap.String("server", name),
			zap.String("listener", s.Local.String()), zap.Error(err))
		return
	}
	w.rescued[s.Local] = stop
	logger.Error("a layer4 listener's accept queue held connections at three checks in a row: "+
		"caddy-l4's accept loop has ended (it ends on an accept error, EMFILE when the process runs out of file descriptors) "+
		"or cannot keep up; layer4chain accepts on it too, until the config is reloaded; "+
		"if the process ran out of descriptors, raise the file limit (ulimit -n, LimitNOFILE)",
		zap.String("server", name), zap.String("listener", s.Local.String()), zap.Uint32("queued", s.Queued))
}

// stop ends every rescue this watch started.
func (w *listenerWatch) stop() {
	for _, local := range slices.SortedFunc(maps.Keys(w.rescued), netip.AddrPort.Compare) {
		w.rescued[local]()
	}
	w.rescued = nil
}

// serverOf returns the layer4 server, and its name, that listens on local.
func serverOf(l4 *layer4.App, local netip.AddrPort) (string, *layer4.Server) {
	for _, name := range slices.Sorted(maps.Keys(l4.Servers)) {
		addrs, err := serverListenAddrs(name, l4.Servers[name])
		if err == nil && listensOn(addrs)(local) {
			return name, l4.Servers[name]
		}
	}
	return "", nil
}
