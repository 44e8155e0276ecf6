package layer4chain

import (
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// A previous hop that does not know the client (HAProxy behind a health
// checker, say) sends v2 PROXY over UNSPEC, v2's "PROXY UNKNOWN". The
// connection is served with the socket's peer as the original client, and
// the chain's TLVs still count.
func TestAV2HeaderWithoutAddressesIsServedAsTheSocketsPeer(t *testing.T) {
	backend := chaintest.NewEchoBackend(t)
	h := startHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr),
		Accept: &ProxyAcceptor{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}}, nil)
	c := chaintest.Dial(t, h.Addr)
	const chainID = "0123456789abcdef0123456789abcdef"
	tlvs := append([]byte{0x05, 0, byte(len(chainID))}, chainID...)
	tlvs = append(tlvs, byte(TLVHops), 0, 1, 3)
	if _, err := c.Write(append(v2Raw(0x21, 0x00, tlvs), "x"...)); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("no echo through the hop: %v", err)
	}
	info := h.Tracker.Records()[0].Info()
	if info.OriginalClient != c.LocalAddr().String() || info.ChainID != chainID || info.Hop != 4 {
		t.Fatalf("record behind PROXY/UNSPEC: original client %q (want %s), chain ID %q, hop %d (want 4)",
			info.OriginalClient, c.LocalAddr(), info.ChainID, info.Hop)
	}
	c.Close()
	if r := h.reason(t); r != ReasonClientClosed {
		t.Fatalf("reason %s", r)
	}
}
