package layer4chain

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"syscall"
	"time"
)

// This file holds what TLS changes on either side of a hop: the handshake
// of a dial to an upstream over TLS, reads of a *tls.Conn that hold no copy
// buffer while idle, half-close through close_notify, and trust in a
// previous hop by its verified client certificate.

// clientHandshake runs the TLS handshake of an upstream connection over tc,
// by deadline (the attempt's connect timeout). On failure tc is closed.
func clientHandshake(ctx context.Context, tc *net.TCPConn, cfg *tls.Config, deadline time.Time) (*tls.Conn, error) {
	hctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	c := tls.Client(tc, cfg)
	if err := c.HandshakeContext(hctx); err != nil {
		tc.Close()
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	return c, nil
}

// tlsInput is the index of tls.Conn's decrypted-but-unread application data
// (a bytes.Reader) and of bytes.Reader's own fields, found once; nil when
// this Go's tls.Conn is not laid out as expected, and TLS reads then fall
// back to reading into a pooled buffer.
var tlsInput, readerS, readerI = func() ([]int, []int, []int) {
	f, ok := reflect.TypeFor[tls.Conn]().FieldByName("input")
	if !ok || f.Type != reflect.TypeFor[bytes.Reader]() {
		return nil, nil, nil
	}
	s, okS := f.Type.FieldByName("s")
	i, okI := f.Type.FieldByName("i")
	if !okS || !okI || s.Type != reflect.TypeFor[[]byte]() || i.Type.Kind() != reflect.Int64 {
		return nil, nil, nil
	}
	return f.Index, s.Index, i.Index
}()

// tlsReadsBufferless says whether a *tls.Conn can be read without holding
// a copy buffer while it is idle (see direction.readTLS).
var tlsReadsBufferless = tlsInput != nil

// tlsBuffered returns how many bytes of decrypted application data c holds
// that a Read returns without touching the network. Only the goroutine that
// reads c may call it.
func tlsBuffered(c *tls.Conn) int {
	in := reflect.ValueOf(c).Elem().FieldByIndex(tlsInput)
	n := in.FieldByIndex(readerS).Len() - int(in.FieldByIndex(readerI).Int())
	return max(n, 0)
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

// CertificateNames returns the names a verified client certificate is
// known by: its Subject common name and its DNS SANs, in that order; nil
// when state holds no verified chain (no client authentication, or a
// certificate that was not verified).
func CertificateNames(state *tls.ConnectionState) []string {
	if state == nil || len(state.VerifiedChains) == 0 || len(state.VerifiedChains[0]) == 0 {
		return nil
	}
	leaf := state.VerifiedChains[0][0]
	var names []string
	if leaf.Subject.CommonName != "" {
		names = append(names, leaf.Subject.CommonName)
	}
	return append(names, leaf.DNSNames...)
}

// trustedByCertificate says whether one of a peer's verified certificate
// names is in allow. Names compare without regard to case, as DNS names do.
func trustedByCertificate(allow, names []string) bool {
	for _, n := range names {
		for _, a := range allow {
			if strings.EqualFold(n, a) {
				return true
			}
		}
	}
	return false
}

// forPeer returns the acceptor that reads peer's header and whether peer is
// trusted: by its address (a itself), or by its verified client certificate
// alone (a copy that allows exactly peer, so Accept reads it as trusted).
func (a *ProxyAcceptor) forPeer(peer netip.Addr, session *tls.ConnectionState) (*ProxyAcceptor, bool) {
	if isTrusted(a.Allow, peer) {
		return a, true
	}
	if len(a.AllowCertificates) == 0 || !trustedByCertificate(a.AllowCertificates, CertificateNames(session)) {
		return a, false
	}
	p := peer.WithZone("").Unmap()
	if !p.IsValid() {
		return a, false
	}
	cp := *a
	cp.Allow = []netip.Prefix{netip.PrefixFrom(p, p.BitLen())}
	return &cp, true
}
