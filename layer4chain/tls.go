package layer4chain

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"reflect"
	"strings"
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
