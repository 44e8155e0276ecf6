package layer4chain

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Accept retry pauses, as net/http's Server.Serve spaces them.
const (
	minAcceptPause = 5 * time.Millisecond
	maxAcceptPause = time.Second
)

// RescueListener accepts connections on the listening socket fd until the
// returned stop is called, handing each to serve on a goroutine of its
// own. It works on a duplicate of fd, which stays its owner's. An accept
// error (EMFILE when the process is out of descriptors) is reported to
// onError and retried after a pause that doubles from 5 ms to 1 s, as
// net/http's server does, so a listener whose own accept loop gave up on
// such an error serves again once descriptors are free.
//
// stop closes the duplicate and waits for the accept loop to end; the
// connections it handed to serve are serve's.
func RescueListener(fd int, serve func(net.Conn), onError func(error)) (stop func(), err error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicating listener %d: %w", fd, err)
	}
	f := os.NewFile(uintptr(nfd), "listener")
	ln, err := net.FileListener(f) // a duplicate of its own
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("listener %d: %w", fd, err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		pause := time.Duration(0)
		for {
			c, err := ln.Accept()
			if err == nil {
				pause = 0
				go serve(c)
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			onError(err)
			pause = min(max(2*pause, minAcceptPause), maxAcceptPause)
			select {
			case <-done:
				return
			case <-time.After(pause):
			}
		}
	}()
	return func() {
		close(done)
		ln.Close()
		wg.Wait()
	}, nil
}
