package layer4chain

import (
	"context"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// peerWatch watches a socket, while a dial runs, for its peer leaving:
// it reset the connection, or, when silent says it has sent nothing so far,
// closed it with nothing unread. It reads nothing: the peer's bytes stay
// for whoever reads next, and a peer that sent bytes and then half-closed
// stays (it may be waiting for an answer).
type peerWatch struct {
	sock    tcpSocket
	silent  bool
	gone    context.CancelFunc // called, from the watch's goroutine, when the peer left
	left    atomic.Bool
	timer   *time.Timer
	running sync.WaitGroup
}

// watchPeer starts watching sock after the given delay and calls gone if
// its peer leaves before stop. A watch stopped before it started costs a
// timer and nothing else, so a fast dial pays no system call.
//
// While it watches it holds sock's read side: nothing else may read sock
// until stop returns.
func watchPeer(sock tcpSocket, after time.Duration, silent bool, gone context.CancelFunc) *peerWatch {
	w := &peerWatch{sock: sock, silent: silent, gone: gone}
	if sock != nil {
		w.running.Add(1)
		w.timer = time.AfterFunc(after, w.run)
	}
	return w
}

func (w *peerWatch) run() {
	defer w.running.Done()
	rc, err := w.sock.SyscallConn()
	if err != nil {
		return
	}
	// An error (the deadline stop sets, a close) ends the watch: only the
	// callback's verdict counts.
	_ = rc.Read(func(fd uintptr) bool {
		if peerLeft(int(fd), w.silent) {
			w.left.Store(true)
			return true
		}
		return false // wait for the next readable event
	})
	if w.left.Load() {
		w.gone()
	}
}

// stop ends the watch and returns once it has, with sock's read deadline
// cleared. It reports whether the peer had left.
func (w *peerWatch) stop() (left bool) {
	if w.timer == nil {
		return false
	}
	if w.timer.Stop() {
		w.running.Done() // never started
		return false
	}
	_ = w.sock.SetReadDeadline(time.Unix(1, 0)) // wakes the watch, or keeps it from waiting
	w.running.Wait()
	_ = w.sock.SetReadDeadline(time.Time{})
	return w.left.Load()
}

// peerLeft says whether the peer of the socket fd has gone, without
// consuming a byte: a one-byte MSG_PEEK that does not wait fails after a
// reset, and reads 0 at EOF with nothing unread, which is leaving for a
// silent peer (one that sent nothing) and a half-close for another. With
// bytes unread it looks at the TCP state, since a reset after them is
// seen only there.
func peerLeft(fd int, silent bool) bool {
	var b [1]byte
	n, _, err := syscall.Recvfrom(fd, b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	switch {
	case err == syscall.EAGAIN || err == syscall.EINTR:
		return false
	case err != nil:
		return true // a reset, or another error that ends the connection
	case n == 0:
		return silent
	}
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	return err == nil && info.State == tcpClose
}

// tcpClose is TCP_CLOSE in Linux's tcp_states.h: the state a reset leaves.
const tcpClose = 7
