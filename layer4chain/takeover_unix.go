//go:build unix

package layer4chain

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// TakeOver returns a connection to c's socket that outlives c: closing c
// afterwards leaves the socket open, held by the returned connection alone.
// A server that closes every connection its handler returns from (as
// caddy-l4's does) can so hand a connection to ServeDetached and let its
// own goroutine, buffers and wrappers go while the connection lives.
//
// It costs three system calls (the descriptor's duplicate, its flags, its
// registration with the runtime's poller) and, while c stays open, one
// more file descriptor.
func TakeOver(c *net.TCPConn) (net.Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("taking the client socket over: %w", err)
	}
	nfd := -1
	cerr := rc.Control(func(fd uintptr) { nfd, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
	if cerr != nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("taking the client socket over: %w", err)
	}
	// The duplicate shares the socket's non-blocking mode, so os.NewFile
	// registers it with the runtime's poller: reads wait there and
	// deadlines work as on a net.Conn.
	tc := &takenConn{f: os.NewFile(uintptr(nfd), "tcp"), laddr: c.LocalAddr(), raddr: c.RemoteAddr()}
	if tc.raw, err = tc.f.SyscallConn(); err != nil {
		_ = tc.f.Close()
		return nil, fmt.Errorf("taking the client socket over: %w", err)
	}
	return tc, nil
}

// takenConn is a TCP socket taken over by TakeOver: an os.File made to look
// like a *net.TCPConn to the pipe (the same errors, half-close, linger).
type takenConn struct {
	f            *os.File
	raw          syscall.RawConn
	laddr, raddr net.Addr
	closed       atomic.Bool
}

var _ tcpSocket = (*takenConn)(nil)

func (c *takenConn) Read(b []byte) (int, error) {
	n, err := c.f.Read(b)
	return n, c.opError("read", err)
}

func (c *takenConn) Write(b []byte) (int, error) {
	n, err := c.f.Write(b)
	return n, c.opError("write", err)
}

// Close closes the socket (unless another descriptor still holds it).
func (c *takenConn) Close() error {
	if c.closed.Swap(true) {
		return c.opError("close", os.ErrClosed)
	}
	return c.opError("close", c.f.Close())
}

func (c *takenConn) LocalAddr() net.Addr           { return c.laddr }
func (c *takenConn) RemoteAddr() net.Addr          { return c.raddr }
func (c *takenConn) SetDeadline(t time.Time) error { return c.opError("set", c.f.SetDeadline(t)) }
func (c *takenConn) SetReadDeadline(t time.Time) error {
	return c.opError("set", c.f.SetReadDeadline(t))
}
func (c *takenConn) SetWriteDeadline(t time.Time) error {
	return c.opError("set", c.f.SetWriteDeadline(t))
}

// SyscallConn returns the socket's RawConn, whose errors read as a
// net.Conn's.
func (c *takenConn) SyscallConn() (syscall.RawConn, error) { return takenRaw{c}, nil }

// CloseWrite sends FIN: the peer reads EOF, and may still send.
func (c *takenConn) CloseWrite() error {
	return c.control("shutdown", func(fd int) error { return unix.Shutdown(fd, unix.SHUT_WR) })
}

// SetLinger sets SO_LINGER as (*net.TCPConn).SetLinger does: 0 makes Close
// reset the connection.
func (c *takenConn) SetLinger(sec int) error {
	l := unix.Linger{Onoff: 1, Linger: int32(sec)}
	if sec < 0 {
		l = unix.Linger{}
	}
	return c.control("setsockopt", func(fd int) error { return unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &l) })
}

func (c *takenConn) control(op string, f func(fd int) error) error {
	var ferr error
	if err := c.raw.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return c.opError(op, err)
	}
	if ferr != nil {
		return c.opError(op, os.NewSyscallError(op, ferr))
	}
	return nil
}

// opError turns an os.File's error into the one a *net.TCPConn returns,
// which is what the pipe tells apart: net.ErrClosed after Close, deadline
// errors, and the errno of a reset.
func (c *takenConn) opError(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	if c.closed.Load() {
		err = net.ErrClosed
	} else if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
		err = pe.Err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.laddr, Addr: c.raddr, Err: err}
}

// takenRaw is a takenConn's RawConn.
type takenRaw struct{ c *takenConn }

func (r takenRaw) Control(f func(fd uintptr)) error {
	return r.c.opError("raw-control", r.c.raw.Control(f))
}
func (r takenRaw) Read(f func(fd uintptr) bool) error {
	return r.c.opError("read", r.c.raw.Read(f))
}
func (r takenRaw) Write(f func(fd uintptr) bool) error {
	return r.c.opError("write", r.c.raw.Write(f))
}
