// Package integration runs real Caddy processes built from this checkout:
// the examples as a user starts them, and chains across processes.
package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
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

// process is a Caddy (or another server, see startCaddyCommand) started by
// a test; it is stopped (by its PID) when the test ends.
type process struct {
	cmd    *exec.Cmd
	output *syncBuffer
	exited chan struct{}
}

// syncBuffer is a bytes.Buffer the process writes while the test reads.
type syncBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	written chan struct{} // closed and replaced by each write
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.written != nil {
		close(b.written)
		b.written = nil
	}
	return b.buf.Write(p)
}

// contains reports whether the output has substr, and returns a channel
// closed by the next write.
func (b *syncBuffer) contains(substr string) (bool, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.written == nil {
		b.written = make(chan struct{})
	}
	return strings.Contains(b.buf.String(), substr), b.written
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startCaddy runs `caddy run` with args and waits until every address in
// ready is listening in that process.
func startCaddy(t *testing.T, ready []string, args ...string) *process {
	t.Helper()
	return startCaddyEnv(t, nil, ready, args...)
}

// startCaddyEnv is startCaddy with extra environment variables. A config
// without an admin address gets a free one through CADDY_ADMIN instead of
// Caddy's default localhost:2019, which may belong to someone else.
func startCaddyEnv(t testing.TB, env []string, ready []string, args ...string) *process {
	t.Helper()
	return startCaddyCommand(t, env, ready, caddyBinary(t), append([]string{"run"}, args...)...)
}

// startCaddyCommand runs name with args the way startCaddyEnv runs Caddy:
// a caddy command line, or a wrapper that sets something up and then execs
// one, so that the process's PID (whose sockets the readiness wait looks
// for) is Caddy's.
func startCaddyCommand(t testing.TB, env []string, ready []string, name string, args ...string) *process {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "XDG_CONFIG_HOME="+t.TempDir(), "XDG_DATA_HOME="+t.TempDir(),
		"CADDY_ADMIN="+freeAddr(t))
	cmd.Env = append(cmd.Env, env...)
	out := new(syncBuffer)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("starting %s: %v", filepath.Base(name), err)
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
			t.Logf("%s output:\n%s", filepath.Base(name), out)
		}
	})
	p := &process{cmd: cmd, output: out, exited: exited}
	for _, addr := range ready {
		p.waitListening(t, addr)
	}
	return p
}

// name is the program the process runs, for messages: "caddy", or
// another server a test runs next to it ("haproxy", "nginx").
func (p *process) name() string { return filepath.Base(p.cmd.Path) }

// waitOutput waits until the process has written substr.
func (p *process) waitOutput(t testing.TB, substr string, within time.Duration) {
	t.Helper()
	timeout := time.After(within)
	for {
		found, written := p.output.contains(substr)
		if found {
			return
		}
		select {
		case <-written:
		case <-p.exited:
			if found, _ := p.output.contains(substr); !found {
				t.Fatalf("%s exited without writing %q:\n%s", p.name(), substr, p.output)
			}
		case <-timeout:
			t.Fatalf("%s did not write %q within %v:\n%s", p.name(), substr, within, p.output)
		}
	}
}

var (
	portsMu     sync.Mutex
	portsHanded = map[int]bool{}
)

// freeAddr returns "127.0.0.1:port" for a port that was free a moment ago
// and that no other test of this run has been given: a server the test is
// about to start takes it. Another program may still take it in between;
// that race is small and accepted.
func freeAddr(t testing.TB) string {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if !portsHanded[port] {
			portsHanded[port] = true
			return net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		}
	}
}

// waitListening waits until the process has a socket listening on addr,
// failing early if it exits. It never connects: a readiness dial would be
// a connection the chain handler counts, and a socket of another process
// on the same port (SO_REUSEPORT, or someone else's server) does not count.
func (p *process) waitListening(t testing.TB, addr string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		listening, err := listensOn(p.cmd.Process.Pid, addr)
		if err != nil {
			t.Fatalf("waiting for %s: %v", addr, err)
		}
		if listening {
			return
		}
		select {
		case <-p.exited:
			t.Fatalf("%s exited before %s listened:\n%s", p.name(), addr, p.output)
		case <-time.After(20 * time.Millisecond): // polling the kernel's socket table: there is no event to wait on
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen within 30s:\n%s", addr, p.output)
		}
	}
}

// listensOn reports whether process pid holds a socket in LISTEN state on
// addr ("host:port"; a host name stands for the addresses it resolves to,
// and a socket on the unspecified address counts too). It reads
// /proc/net/tcp{,6} and the process's file descriptors: Linux only.
func listensOn(pid int, addr string) (bool, error) {
	host, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return false, err
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return false, fmt.Errorf("port of %s: %w", addr, err)
	}
	var ips []netip.Addr
	if host == "" {
		ips = append(ips, netip.IPv4Unspecified(), netip.IPv6Unspecified())
	} else {
		names, err := net.LookupHost(host)
		if err != nil {
			return false, fmt.Errorf("resolving %s: %w", host, err)
		}
		for _, n := range names {
			if ip, err := netip.ParseAddr(n); err == nil {
				ips = append(ips, ip.Unmap())
			}
		}
	}
	ips = append(ips, netip.IPv4Unspecified(), netip.IPv6Unspecified())
	owned, err := socketInodes(pid)
	if err != nil {
		return false, err
	}
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		sockets, err := listeningSockets(table)
		if err != nil {
			return false, err
		}
		for _, s := range sockets {
			if s.addr.Port() == uint16(port) && slices.Contains(ips, s.addr.Addr()) && owned[s.inode] {
				return true, nil
			}
		}
	}
	return false, nil
}

type listeningSocket struct {
	addr  netip.AddrPort
	inode string
}

// listeningSockets parses a /proc/net/tcp or tcp6 table and returns its
// sockets in LISTEN state (st 0A).
func listeningSockets(table string) ([]listeningSocket, error) {
	data, err := os.ReadFile(table)
	if errors.Is(err, fs.ErrNotExist) && strings.HasSuffix(table, "6") {
		return nil, nil // no IPv6 on this machine
	}
	if err != nil {
		return nil, err
	}
	var sockets []listeningSocket
	for _, line := range strings.Split(string(data), "\n")[1:] {
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		f := strings.Fields(line)
		if len(f) < 10 || f[3] != "0A" {
			continue
		}
		addr, err := parseProcAddr(f[1])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", table, err)
		}
		sockets = append(sockets, listeningSocket{addr: addr, inode: f[9]})
	}
	return sockets, nil
}

// parseProcAddr parses "0100007F:1F41": the address as 32-bit words in
// host byte order (little-endian here), the port in big-endian hex.
func parseProcAddr(s string) (netip.AddrPort, error) {
	hexIP, hexPort, ok := strings.Cut(s, ":")
	raw, err := hex.DecodeString(hexIP)
	if !ok || err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("malformed address %q", s)
	}
	port, err := strconv.ParseUint(hexPort, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("malformed port in %q", s)
	}
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(raw[i:], binary.LittleEndian.Uint32(raw[i:]))
	}
	ip, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(ip.Unmap(), uint16(port)), nil
}

// socketInodes returns the inodes of the sockets among pid's open files.
func socketInodes(pid int) (map[string]bool, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // it exited: the caller sees that on its own
	}
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed since the listing
		}
		if inode, ok := strings.CutPrefix(target, "socket:["); ok {
			inodes[strings.TrimSuffix(inode, "]")] = true
		}
	}
	return inodes, nil
}

// examples is a set of files from examples/ copied into a test's temporary
// directory with every port replaced by a free one. Files copied together
// share the replacement, so the outer hop of a two-process chain still
// dials the inner one.
type examples struct {
	dir   string
	ports map[string]string // documented port → the copies' port
}

// documentedPort is a port in an example: after a colon, as in
// "127.0.0.1:8001", "localhost:2019" and the Caddyfile's "http://:8003".
var documentedPort = regexp.MustCompile(`:([0-9]{2,5})\b`)

// copyExamples copies the named files of examples/ with their ports
// rewritten. Each must set its admin address, so that the copy's admin
// endpoint is a free port too and not Caddy's default localhost:2019.
func copyExamples(t *testing.T, names ...string) *examples {
	t.Helper()
	ex := &examples{dir: t.TempDir(), ports: map[string]string{}}
	for _, name := range names {
		text, err := os.ReadFile(filepath.Join("..", "examples", name))
		if err != nil {
			t.Fatal(err)
		}
		if !setsAdmin(name, text) {
			t.Fatalf("examples/%s sets no admin address: its copy would take Caddy's default localhost:2019", name)
		}
		copied := documentedPort.ReplaceAllStringFunc(string(text), func(m string) string {
			port := m[1:]
			if ex.ports[port] == "" {
				_, ex.ports[port], _ = net.SplitHostPort(freeAddr(t))
			}
			return ":" + ex.ports[port]
		})
		if err := os.WriteFile(filepath.Join(ex.dir, name), []byte(copied), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return ex
}

// setsAdmin reports whether a Caddyfile has an admin option or a JSON
// config an admin.listen.
func setsAdmin(name string, text []byte) bool {
	if strings.HasSuffix(name, ".json") {
		var cfg struct {
			Admin struct {
				Listen string `json:"listen"`
			} `json:"admin"`
		}
		return json.Unmarshal(text, &cfg) == nil && cfg.Admin.Listen != ""
	}
	return regexp.MustCompile(`(?m)^\s*admin\s+\S`).Match(text)
}

// args is the `caddy run` command line for a copied example.
func (ex *examples) args(name string) []string {
	args := []string{"--config", ex.path(name)}
	if strings.HasSuffix(name, ".caddyfile") {
		args = append(args, "--adapter", "caddyfile")
	}
	return args
}

// path is the copy of an example.
func (ex *examples) path(name string) string { return filepath.Join(ex.dir, name) }

// addr turns an address the examples document ("127.0.0.1:8001") into
// the copies' address.
func (ex *examples) addr(t *testing.T, documented string) string {
	t.Helper()
	host, port, err := net.SplitHostPort(documented)
	if err != nil || ex.ports[port] == "" {
		t.Fatalf("no example copied here uses %s", documented)
	}
	return net.JoinHostPort(host, ex.ports[port])
}

// addrs is addr for several addresses.
func (ex *examples) addrs(t *testing.T, documented ...string) []string {
	t.Helper()
	var out []string
	for _, d := range documented {
		out = append(out, ex.addr(t, d))
	}
	return out
}

// writeConfig writes a JSON config into the test's temporary directory and
// returns its path.
func writeConfig(t testing.TB, cfg string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "caddy.json")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
