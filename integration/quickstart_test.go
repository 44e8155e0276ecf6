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
// quickstart, in its Caddyfile and its JSON form, as a user would and sends
// requests through the chain from two loopback source addresses.
func TestQuickstartShowsOriginalClientThroughTwoHops(t *testing.T) {
	for _, config := range []string{"examples/quickstart.caddyfile", "examples/quickstart.json"} {
		t.Run(config, func(t *testing.T) {
			startCaddy(t, []string{"127.0.0.1:8001", "127.0.0.1:8003"}, "--config", config)
			assertOriginalClient(t, "127.0.0.1:8001")
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
