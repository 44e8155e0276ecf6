package integration

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// TestShutdownDrainsThenClosesWithReasonShutdown stops a real Caddy with
// SIGTERM: the live connection keeps working through the grace period and
// is closed when it ends, with reason shutdown in the access log.
func TestShutdownDrainsThenClosesWithReasonShutdown(t *testing.T) {
	hop, adminAddr := chaintest.FreeAddr(t), chaintest.FreeAddr(t)
	cfg := fmt.Sprintf(`{
		"admin": {"listen": %q},
		"apps": {
			"layer4chain": {"shutdown_grace": "1s"},
			"layer4": {"servers": {"hop": {"listen": [%q],
				"routes": [{"handle": [{"handler": "chain", "upstreams": [{"dial": [%q]}]}]}]}}}
		}
	}`, adminAddr, hop, chaintest.NewEchoBackend(t).Addr)
	path := filepath.Join(t.TempDir(), "caddy.json")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startCaddy(t, []string{hop}, "--config", path)

	c, err := net.Dial("tcp", hop)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo := func(msg string) error {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, msg); err != nil {
			return err
		}
		buf := make([]byte, len(msg))
		_, err := io.ReadFull(c, buf)
		return err
	}
	if err := echo("before"); err != nil {
		t.Fatal(err)
	}

	signalled := time.Now()
	if err := p.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	// Within the grace period the connection is still served.
	if err := echo("during grace"); err != nil {
		t.Fatalf("connection cut during the shutdown grace: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1))
	closedAfter := time.Since(signalled)
	if err == nil || closedAfter < 900*time.Millisecond || closedAfter > 5*time.Second {
		t.Fatalf("connection ended %v after SIGTERM (%v), want at the 1s grace", closedAfter, err)
	}
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("caddy did not exit after the drain")
	}
	if log := p.output.String(); !strings.Contains(log, `"reason":"shutdown"`) {
		t.Fatalf("no access-log line with reason shutdown:\n%s", log)
	}
}
