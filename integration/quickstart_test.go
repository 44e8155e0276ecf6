package integration

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestQuickstartShowsOriginalClientThroughTwoHops runs the README's
// quickstart, in its Caddyfile and its JSON form, as a user would (on free
// ports instead of the documented ones) and sends
// requests through the chain from two loopback source addresses.
func TestQuickstartShowsOriginalClientThroughTwoHops(t *testing.T) {
	for _, config := range []string{"quickstart.caddyfile", "quickstart.json"} {
		t.Run(config, func(t *testing.T) {
			ex := copyExamples(t, config)
			startCaddy(t, ex.addrs(t, "127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003", "localhost:2019"), ex.args(config)...)
			assertOriginalClient(t, ex.addr(t, "127.0.0.1:8001"))
		})
	}
}

// assertOriginalClient sends HTTP requests to addr from two loopback source
// addresses and checks the backend names each client's own address.
func assertOriginalClient(t *testing.T, addr string) {
	t.Helper()
	for _, source := range []string{"127.0.0.1", "127.0.0.5"} {
		var local net.Addr
		dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}}
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dialer.DialContext(ctx, network, addr)
				if err == nil {
					local = c.LocalAddr()
				}
				return c, err
			},
		}}
		resp, err := client.Get("http://" + addr + "/")
		if err != nil {
			t.Fatalf("GET through the chain from %s: %v", source, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := "original client: " + local.String(); strings.TrimSpace(string(body)) != want {
			t.Fatalf("backend answered %q, want %q", body, want)
		}
	}
}
