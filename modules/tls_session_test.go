package modules

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/pires/go-proxyproto"
	"github.com/pires/go-proxyproto/tlvparse"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// A client connects over TLS with a certificate from the operator's CA;
// caddy-l4's tls handler terminates the session before chain, which sends
// the backend a v2 header describing it: the protocol the client
// negotiated, the server name it asked for, and an SSL TLV saying the
// client certificate (CN client-7) was verified, with version and cipher.
// The header also carries a CRC32C that checks out.
func TestATerminatedTLSSessionIsDescribedToTheNextHop(t *testing.T) {
	checkLeaks(t)
	ca := chaintest.NewCA(t, "chain test CA")
	serverCert := ca.Issue(t, "hop.test", "hop.test")
	clientCert := ca.Issue(t, "client-7")
	keyDER, err := x509.MarshalECPrivateKey(serverCert.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}

	headers := make(chan []byte, 1)
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		hdr := make([]byte, 16)
		if _, err := io.ReadFull(c, hdr); err != nil {
			return
		}
		rest := make([]byte, binary.BigEndian.Uint16(hdr[14:]))
		if _, err := io.ReadFull(c, rest); err != nil {
			return
		}
		headers <- append(hdr, rest...)
		io.Copy(struct{ io.Writer }{c}, c)
	})
	addr := chaintest.FreeAddr(t)
	servers := map[string]any{"hop": map[string]any{
		"listen": []string{addr},
		"routes": []any{map[string]any{"handle": []any{
			map[string]any{"handler": "tls", "connection_policies": []any{map[string]any{
				"alpn": []string{"h2"},
				"client_authentication": map[string]any{
					"trusted_ca_certs": []string{base64.StdEncoding.EncodeToString(ca.Cert.Raw)},
					"mode":             "require_and_verify",
				},
			}}},
			map[string]any{"handler": "chain", "upstreams": upstreams(backend.Addr), "proxy_protocol": "v2", "proxy_protocol_crc32c": true},
		}}},
	}}
	var cfg map[string]any
	if err := json.Unmarshal(caddyConfig(servers), &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["apps"].(map[string]any)["tls"] = map[string]any{
		"certificates": map[string]any{"load_pem": []any{map[string]any{
			"certificate": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: serverCert.Certificate[0]})),
			"key":         string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})),
		}}},
		"disable_ocsp_stapling": true,
		// Storage cleaning takes a lock whose refresher outlives Stop.
		"disable_storage_clean": true,
	}
	b, _ := json.Marshal(cfg)
	if err := caddy.Load(b, true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })

	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{
		ServerName: "hop.test", RootCAs: ca.Pool, Certificates: []tls.Certificate{clientCert}, NextProtos: []string{"h2", "http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "over TLS")

	var raw []byte
	select {
	case raw = <-headers:
	case <-time.After(5 * time.Second):
		t.Fatal("no header at the backend")
	}
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(raw)))
	if err != nil {
		t.Fatal(err)
	}
	tlvs, err := h.TLVs()
	if err != nil {
		t.Fatal(err)
	}
	values := map[proxyproto.PP2Type]string{}
	for _, tlv := range tlvs {
		values[tlv.Type] = string(tlv.Value)
	}
	if values[proxyproto.PP2_TYPE_ALPN] != "h2" || values[proxyproto.PP2_TYPE_AUTHORITY] != "hop.test" {
		t.Fatalf("ALPN %q, authority %q; want h2, hop.test", values[proxyproto.PP2_TYPE_ALPN], values[proxyproto.PP2_TYPE_AUTHORITY])
	}
	ssl, ok := tlvparse.FindSSL(tlvs)
	if !ok || !ssl.ClientSSL() || !ssl.ClientCertConn() || !ssl.Verified() {
		t.Fatalf("SSL TLV %+v (found %v): want SSL, a certificate on the connection, verified", ssl, ok)
	}
	if cn, _ := ssl.ClientCN(); cn != "client-7" {
		t.Fatalf("client CN %q, want client-7", cn)
	}
	if v, _ := ssl.SSLVersion(); v != "TLSv1.3" {
		t.Fatalf("TLS version %q", v)
	}
	if cipher, _ := ssl.SSLCipher(); cipher != tls.CipherSuiteName(c.ConnectionState().CipherSuite) {
		t.Fatalf("cipher %q, the client negotiated %q", cipher, tls.CipherSuiteName(c.ConnectionState().CipherSuite))
	}
	if _, ok := values[proxyproto.PP2_TYPE_CRC32C]; !ok {
		t.Fatal("no CRC32C in the header")
	}
	// A hop accepting this header verifies the checksum: it must pass.
	acc := &layer4chain.ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}
	if _, _, err := acc.Accept(&bytesConn{Reader: bytes.NewReader(raw)}, netip.MustParseAddr("127.0.0.1")); err != nil {
		t.Fatalf("the header chain sent fails its own check: %v", err)
	}
	c.Close()
	waitEmpty(t)
}

// bytesConn is a DeadlineReader over fixed bytes.
type bytesConn struct{ *bytes.Reader }

func (bytesConn) SetReadDeadline(time.Time) error { return nil }
