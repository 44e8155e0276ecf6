// Package integration runs real Caddy processes built from this checkout:
// the examples as a user starts them, and chains across processes.
package integration

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	caddyBin  string
	buildErr  error
)

// caddyBinary builds ./cmd/caddy once per test run, as `go build` would for
// a user, and returns its path.
func caddyBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "layer4chain-caddy")
		if err != nil {
			buildErr = err
			return
		}
		caddyBin = filepath.Join(dir, "caddy")
		cmd := exec.Command("go", "build", "-o", caddyBin, "./cmd/caddy")
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = err
			caddyBin = string(out)
		}
	})
	if buildErr != nil {
		t.Fatalf("building caddy: %v\n%s", buildErr, caddyBin)
	}
	return caddyBin
}

// process is a Caddy started by a test; it is stopped (by its PID) when the
// test ends.
type process struct {
	cmd    *exec.Cmd
	output *syncBuffer
	exited chan struct{}
}

// syncBuffer is a bytes.Buffer the process writes while the test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startCaddy runs `caddy run` with args and waits until every address in
// ready accepts connections.
func startCaddy(t *testing.T, ready []string, args ...string) *process {
	t.Helper()
	return startCaddyEnv(t, nil, ready, args...)
}

// startCaddyEnv is startCaddy with extra environment variables.
func startCaddyEnv(t testing.TB, env []string, ready []string, args ...string) *process {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, caddyBinary(t), append([]string{"run"}, args...)...)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "XDG_CONFIG_HOME="+t.TempDir(), "XDG_DATA_HOME="+t.TempDir())
	cmd.Env = append(cmd.Env, env...)
	out := new(syncBuffer)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("starting caddy: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cancel() // kills the process we started
			<-exited
		}
		cancel()
		if t.Failed() {
			t.Logf("caddy output:\n%s", out)
		}
	})
	for _, addr := range ready {
		waitListening(t, addr, exited, out)
	}
	return &process{cmd: cmd, output: out, exited: exited}
}

// waitListening waits until addr accepts a connection, failing early if the
// process exits.
func waitListening(t testing.TB, addr string, exited <-chan struct{}, out *syncBuffer) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			t.Fatalf("caddy exited before %s listened:\n%s", addr, out)
		case <-time.After(50 * time.Millisecond): // polling a port: there is no event to wait on
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen within 30s", addr)
		}
	}
}
