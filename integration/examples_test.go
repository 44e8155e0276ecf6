package integration

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"math/big"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

// TestTwoProcessChain runs examples/outer.caddyfile and inner.caddyfile as
// two Caddy processes: the backend sees the original client, both hops list
// the connection under one chain ID, and the inner hop's remote_ip matcher
// turns away anyone but the outer hop.
func TestTwoProcessChain(t *testing.T) {
	ex := copyExamples(t, "inner.caddyfile", "outer.caddyfile")
	startCaddy(t, ex.addrs(t, "127.0.0.1:8002", "127.0.0.1:8003", "localhost:2020"), ex.args("inner.caddyfile")...)
	startCaddy(t, ex.addrs(t, "127.0.0.1:8001", "localhost:2019"), ex.args("outer.caddyfile")...)
	outerAddr := ex.addr(t, "127.0.0.1:8001")
	assertOriginalClient(t, outerAddr)

	c, err := net.Dial("tcp", outerAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := httpExchange(t, c, bufio.NewReader(c)); got != "original client: "+c.LocalAddr().String() {
		t.Fatalf("backend answered %q", got)
	}
	// The requests of assertOriginalClient may still be closing on the hops:
	// follow this client's connection, as an operator would.
	outer := connectionsOf(listConnections(t, "http://"+ex.addr(t, "localhost:2019")), c.LocalAddr().String())
	inner := connectionsOf(listConnections(t, "http://"+ex.addr(t, "localhost:2020")), c.LocalAddr().String())
	if len(outer) != 1 || len(inner) != 1 || outer[0].ChainID != inner[0].ChainID || outer[0].Hop != 1 || inner[0].Hop != 2 {
		t.Fatalf("for client %s the outer hop lists %+v, the inner hop %+v: want one connection each, one chain ID, hops 1 and 2",
			c.LocalAddr(), outer, inner)
	}

	// A client that is not the outer hop reaches no route on the inner hop.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 2 * time.Second}
	stranger, err := d.Dial("tcp", ex.addr(t, "127.0.0.1:8002"))
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	io.WriteString(stranger, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	stranger.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, _ := io.ReadAll(stranger); len(got) != 0 {
		t.Fatalf("a client from 127.0.0.2 reached the inner hop's backend: %q", got)
	}
}

// selfSigned makes a certificate for the given names.
func selfSigned(t *testing.T, names ...string) tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// tlsBackend listens on addr, reads the PROXY v2 header each connection
// starts with, then terminates TLS and answers with its name and the
// header's authority TLV.
func tlsBackend(t *testing.T, addr, name string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	acceptor := &layer4chain.ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}
	cfg := &tls.Config{Certificates: []tls.Certificate{selfSigned(t, name)}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				info, rest, err := acceptor.Accept(c.(*net.TCPConn), netip.MustParseAddr("127.0.0.1"))
				if err != nil || info == nil {
					return
				}
				tc := tls.Server(&prefixed{Conn: c, pending: rest}, cfg)
				answer, _ := json.Marshal(map[string]string{"backend": name, "authority": info.Authority, "client": info.Source.String()})
				tc.Write(append(answer, '\n'))
				tc.Close()
			}()
		}
	}()
}

// prefixed replays bytes read past the PROXY header before the socket's.
type prefixed struct {
	net.Conn
	pending []byte
}

func (p *prefixed) Read(b []byte) (int, error) {
	if len(p.pending) > 0 {
		n := copy(b, p.pending)
		p.pending = p.pending[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// TestSNIRoutingPassesTLSThroughWithTheServerName runs examples/sni.caddyfile:
// each server name reaches its own backend, whose TLS handshake is end to
// end, and the PROXY header's authority TLV carries the name.
func TestSNIRoutingPassesTLSThroughWithTheServerName(t *testing.T) {
	ex := copyExamples(t, "sni.caddyfile")
	tlsBackend(t, ex.addr(t, "127.0.0.1:9443"), "a.example")
	tlsBackend(t, ex.addr(t, "127.0.0.1:9444"), "b.example")
	startCaddy(t, ex.addrs(t, "127.0.0.1:8443", "localhost:2019"), ex.args("sni.caddyfile")...)
	router := ex.addr(t, "127.0.0.1:8443")

	for _, name := range []string{"a.example", "b.example"} {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", router,
			&tls.Config{ServerName: name, InsecureSkipVerify: true})
		if err != nil {
			t.Fatalf("TLS through the SNI router to %s: %v", name, err)
		}
		if got := c.ConnectionState().PeerCertificates[0].Subject.CommonName; got != name {
			t.Fatalf("handshake for %s reached the certificate of %s", name, got)
		}
		var answer map[string]string
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if err := json.NewDecoder(c).Decode(&answer); err != nil {
			t.Fatal(err)
		}
		c.Close()
		if answer["backend"] != name || answer["authority"] != name || answer["client"] != c.LocalAddr().String() {
			t.Fatalf("for %s the backend answered %v", name, answer)
		}
	}
}
