package layer4chain

import (
	"sync"

	"golang.org/x/sys/unix"
)

// parker holds the quiet directions of detached connections with no
// goroutine: one epoll instance for the process, watched by one goroutine,
// wakes a parked direction when its socket becomes readable (or its peer
// closes or resets), and a new goroutine carries the direction on from
// there. See direction.park for when a direction parks.
type parker struct {
	epfd   int
	mu     sync.Mutex
	parked map[int32]*direction // by the socket's descriptor
}

var (
	parkerOnce sync.Once
	theParker  *parker // nil where epoll could not be set up: nothing parks
)

// getParker returns the process's parker, starting it on first use.
func getParker() *parker {
	parkerOnce.Do(func() {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			return
		}
		theParker = &parker{epfd: epfd, parked: make(map[int32]*direction)}
		go theParker.run()
	})
	return theParker
}

// arm registers d's socket fd to wake d once, when it becomes readable.
// It must be called while fd is held (in a RawConn's Control), so that the
// descriptor cannot be closed and reused meanwhile.
func (pk *parker) arm(fd int, d *direction) bool {
	// d's fields are written before the registration: once registered, d
	// may be woken and carried on by another goroutine at once.
	wasRegistered := d.registered
	d.registered, d.parkFD = true, int32(fd)
	pk.mu.Lock()
	pk.parked[int32(fd)] = d
	pk.mu.Unlock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(fd)}
	op := unix.EPOLL_CTL_ADD
	if wasRegistered {
		op = unix.EPOLL_CTL_MOD
	}
	err := unix.EpollCtl(pk.epfd, op, fd, &ev)
	switch err {
	case unix.EEXIST:
		err = unix.EpollCtl(pk.epfd, unix.EPOLL_CTL_MOD, fd, &ev)
	case unix.ENOENT:
		err = unix.EpollCtl(pk.epfd, unix.EPOLL_CTL_ADD, fd, &ev)
	}
	if err != nil {
		// Not registered: no wake can come, d is still this caller's.
		d.registered = wasRegistered
		pk.forget(d)
		return false
	}
	return true
}

// forget drops d from the parked set after something else took it over;
// its registration fires at most once more (one-shot), and finds nobody.
func (pk *parker) forget(d *direction) {
	pk.mu.Lock()
	if pk.parked[d.parkFD] == d {
		delete(pk.parked, d.parkFD)
	}
	pk.mu.Unlock()
}

func (pk *parker) run() {
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(pk.epfd, events, -1)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return
		}
		for _, ev := range events[:n] {
			pk.mu.Lock()
			d := pk.parked[ev.Fd]
			delete(pk.parked, ev.Fd)
			pk.mu.Unlock()
			if d != nil {
				d.wake()
			}
		}
	}
}
