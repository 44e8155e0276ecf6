package integration

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// TestTwoProcessChainOverTLS runs examples/outer-tls.caddyfile and
// inner-tls.caddyfile with certificates from a throwaway CA: the backend
// sees the original client, carried inside TLS and trusted by the outer
// hop's certificate name. A PROXY header forged by a peer without that
// certificate is refused: over plain TCP, with another CA's certificate,
// or with the right CA's certificate under another name.
func TestTwoProcessChainOverTLS(t *testing.T) {
	ex := copyExamples(t, "inner-tls.caddyfile", "outer-tls.caddyfile")
	certs := filepath.Join(ex.dir, "certs")
	ca := chaintest.NewCA(t, "chain test CA")
	ca.WriteCA(t, filepath.Join(certs, "ca.pem"))
	ca.WriteIssued(t, filepath.Join(certs, "inner.pem"), filepath.Join(certs, "inner-key.pem"), "inner.chain.test", "inner.chain.test")
	ca.WriteIssued(t, filepath.Join(certs, "outer.pem"), filepath.Join(certs, "outer-key.pem"), "outer.chain.test", "outer.chain.test")
	// The examples name their certificates relative to the repository
	// root, where Caddy runs; the copies name this test's.
	for _, name := range []string{"inner-tls.caddyfile", "outer-tls.caddyfile"} {
		b, err := os.ReadFile(ex.path(name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(ex.path(name), []byte(strings.ReplaceAll(string(b), "certs/", certs+"/")), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	startCaddy(t, ex.addrs(t, "127.0.0.1:8012", "127.0.0.1:8013", "localhost:2022"), ex.args("inner-tls.caddyfile")...)
	startCaddy(t, ex.addrs(t, "127.0.0.1:8011", "localhost:2021"), ex.args("outer-tls.caddyfile")...)
	assertOriginalClient(t, ex.addr(t, "127.0.0.1:8011"))

	c, err := net.Dial("tcp", ex.addr(t, "127.0.0.1:8011"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := httpExchange(t, c, bufio.NewReader(c)); got != "original client: "+c.LocalAddr().String() {
		t.Fatalf("backend answered %q", got)
	}

	inner := ex.addr(t, "127.0.0.1:8012")
	forged := netip.MustParseAddrPort("203.0.113.9:4242")
	hdr, err := (&layer4chain.ProxyHeader{Version: 2, Source: forged, Destination: netip.MustParseAddrPort("198.51.100.1:80")}).AppendTo(nil)
	if err != nil {
		t.Fatal(err)
	}
	request := append(hdr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"...)
	// answer sends the forged header and a request over c and returns all
	// the backend's answer, if any came.
	answer := func(c net.Conn) string {
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(request); err != nil {
			return ""
		}
		b, _ := io.ReadAll(c)
		return string(b)
	}
	dialTLS := func(cert tls.Certificate) (net.Conn, error) {
		return tls.Dial("tcp", inner, &tls.Config{RootCAs: ca.Pool, ServerName: "inner.chain.test", Certificates: []tls.Certificate{cert}})
	}

	// The right certificate: the header is used (the control for the
	// refusals below).
	trusted, err := dialTLS(ca.Issue(t, "outer.chain.test", "outer.chain.test"))
	if err != nil {
		t.Fatal(err)
	}
	if got := answer(trusted); !strings.Contains(got, "original client: "+forged.String()) {
		t.Fatalf("the outer hop's certificate did not make its header trusted: %q", got)
	}

	plain, err := net.Dial("tcp", inner)
	if err != nil {
		t.Fatal(err)
	}
	if got := answer(plain); strings.Contains(got, "original client") {
		t.Fatalf("a plain TCP peer's forged header reached the backend: %q", got)
	}

	otherCA := chaintest.NewCA(t, "someone else's CA")
	if wrongCA, err := dialTLS(otherCA.Issue(t, "outer.chain.test", "outer.chain.test")); err == nil {
		// TLS 1.3: the client learns of the rejected certificate on its
		// first read.
		if got := answer(wrongCA); strings.Contains(got, "original client") {
			t.Fatalf("a certificate from another CA reached the backend: %q", got)
		}
	}

	stranger, err := dialTLS(ca.Issue(t, "stranger.chain.test", "stranger.chain.test"))
	if err != nil {
		t.Fatal(err)
	}
	if got := answer(stranger); got != "" {
		t.Fatalf("a peer of the right CA under another name got %q; want its header refused and the connection closed", got)
	}
}
