// Command bareproxy is the floor BenchmarkSideBySide measures the proxies
// against: a TCP proxy with nothing but the copy. Each connection has two
// goroutines (one per direction) and no buffer while it is idle: a
// direction waits for readability through the runtime's poller, takes a
// 64 KiB buffer from a pool for one read and one write, and gives it back.
// One side's EOF becomes a CloseWrite on the other; an error closes both.
//
//	bareproxy -route 127.0.0.1:9001=127.0.0.1:9002 [-route ...]
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"
)

// routes is the -route flag: listen=upstream pairs.
type routes [][2]string

func (r *routes) String() string { return fmt.Sprint(*r) }

func (r *routes) Set(v string) error {
	listen, upstream, ok := strings.Cut(v, "=")
	if !ok || listen == "" || upstream == "" {
		return fmt.Errorf("route %q: want listen=upstream", v)
	}
	*r = append(*r, [2]string{listen, upstream})
	return nil
}

// buffers holds the copy buffers; a direction holds one only between a
// readable event and the end of the write that follows it.
var buffers = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

func main() {
	var rs routes
	flag.Var(&rs, "route", "listen=upstream (repeatable)")
	flag.Parse()
	if len(rs) == 0 {
		log.Fatal("bareproxy: no -route")
	}
	lns := make([]net.Listener, len(rs))
	for i, r := range rs {
		ln, err := net.Listen("tcp", r[0])
		if err != nil {
			log.Fatalf("bareproxy: %v", err)
		}
		lns[i] = ln
	}
	errs := make(chan error, len(rs))
	for i, r := range rs {
		go func() { errs <- serve(lns[i], r[1]) }()
	}
	log.Fatalf("bareproxy: %v", <-errs)
}

// serve accepts connections and proxies each to upstream.
func serve(ln net.Listener, upstream string) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		go proxy(c.(*net.TCPConn), upstream)
	}
}

// proxy dials upstream and copies both ways until both directions end.
func proxy(client *net.TCPConn, upstream string) {
	c, err := net.DialTimeout("tcp", upstream, 3*time.Second)
	if err != nil {
		client.Close()
		return
	}
	up := c.(*net.TCPConn)
	var once sync.Once
	closeBoth := func() { once.Do(func() { client.Close(); up.Close() }) }
	done := make(chan struct{})
	go func() { pipe(up, client, closeBoth); close(done) }()
	pipe(client, up, closeBoth)
	<-done
	closeBoth()
}

// pipe copies src to dst: it waits for src to be readable holding no
// buffer, then moves what is there through a pooled one.
func pipe(dst, src *net.TCPConn, closeBoth func()) {
	raw, err := src.SyscallConn()
	if err != nil {
		closeBoth()
		return
	}
	var peek [1]byte
	readable := func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return err != syscall.EAGAIN
	}
	for {
		if err := raw.Read(readable); err != nil {
			closeBoth()
			return
		}
		buf := buffers.Get().(*[]byte)
		n, err := src.Read(*buf)
		if n > 0 {
			if _, werr := dst.Write((*buf)[:n]); werr != nil {
				buffers.Put(buf)
				closeBoth()
				return
			}
		}
		buffers.Put(buf)
		if errors.Is(err, io.EOF) {
			dst.CloseWrite()
			return
		}
		if err != nil {
			closeBoth()
			return
		}
	}
}
