package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The proxies BenchmarkSideBySide measures, each started on the proxies'
// CPU with one thread of work: Go programs with GOMAXPROCS=1, HAProxy with
// nbthread 1, nginx with worker_processes 1.

// hop is one proxy process that a client's connection crosses.
type hop struct {
	proc  *process
	admin string // chain's admin address, to await its records; "" for others
}

// pids are the hop's processes (nginx: master and worker).
func (h hop) pids() []int { return processTree(h.proc.cmd.Process.Pid) }

// started is a running contender: for each upstream it was given, the
// address a client connects to, and its hops in the order a client
// reaches them (none for the load generator's direct row).
type started struct {
	addrs []string
	hops  []hop
}

// pids are the processes of every hop.
func (s started) pids() []int {
	var all []int
	for _, h := range s.hops {
		all = append(all, h.pids()...)
	}
	return all
}

// stop ends the contender's processes now rather than when the benchmark
// ends, so they take no CPU while the next one is measured.
func (s started) stop() {
	for _, h := range s.hops {
		_ = h.proc.cmd.Process.Signal(os.Interrupt)
		select {
		case <-h.proc.exited:
		case <-time.After(10 * time.Second):
			_ = h.proc.cmd.Process.Kill()
			<-h.proc.exited
		}
	}
}

// contender is a row of the table.
type contender struct {
	key     string // what the ratios and targets call the row: "chain", "proxy", "haproxy", "chain2"…
	name    string
	missing string // why it is not measured: a program that is not installed
	// echoes: the proxy answers itself (a floor with no upstream), so
	// there is nothing to move in bulk and one descriptor per connection.
	echoes bool
	// twoHops: a row measured for connection rate and idle memory only.
	twoHops bool
	start   func(b *testing.B, upstreams []string) started
}

// sideBySide is what the benchmark's contenders share.
type sideBySide struct {
	pin       pinning
	idleConns int
	loadStart string // the load average when the benchmark started
}

// startPinned runs a proxy program on the proxies' CPU and waits until it
// listens on ready. taskset execs the program, so the PID is the proxy's.
func (s *sideBySide) startPinned(b *testing.B, env, ready []string, bin string, args ...string) *process {
	if s.pin.proxy < 0 {
		return startCaddyCommand(b, env, ready, bin, args...)
	}
	p := startCaddyCommand(b, env, ready, findProgram("taskset"),
		append([]string{"-c", strconv.Itoa(s.pin.proxy), bin}, args...)...)
	s.checkPinned(b, p.cmd.Process.Pid)
	return p
}

// checkPinned fails the benchmark unless every process of the tree may run
// only on the proxies' CPU.
func (s *sideBySide) checkPinned(b *testing.B, pid int) {
	want := strconv.Itoa(s.pin.proxy)
	for _, p := range processTree(pid) {
		if got := cpusAllowed(p); got != want {
			b.Fatalf("process %d may run on CPUs %q, want only %s", p, got, want)
		}
	}
}

// caddyHop runs one Caddy process with a layer4 server per upstream, each
// with one route whose handler is handler(upstream). The chain app's
// process-wide connection limit (derived from ulimit -n) is lifted, as
// caddy-l4's proxy has none. Its access logs are off (level ERROR), as
// HAProxy's and nginx's are.
func (s *sideBySide) caddyHop(b *testing.B, upstreams []string, handler func(upstream string) string) ([]string, hop) {
	adminAddr := freeAddr(b)
	servers := map[string]any{}
	var addrs []string
	for i, u := range upstreams {
		addr := freeAddr(b)
		addrs = append(addrs, addr)
		servers[fmt.Sprintf("r%d", i)] = map[string]any{"listen": []string{addr},
			"routes": []any{map[string]any{"handle": []json.RawMessage{json.RawMessage(handler(u))}}}}
	}
	cfg, err := json.Marshal(map[string]any{
		"admin":   map[string]any{"listen": adminAddr},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{
			"layer4":      map[string]any{"servers": servers},
			"layer4chain": map[string]any{"max_connections": -1},
		},
	})
	if err != nil {
		b.Fatal(err)
	}
	path := writeConfig(b, string(cfg))
	p := s.startPinned(b, []string{"GOMAXPROCS=1"}, append(addrs, adminAddr), caddyBinary(b), "run", "--config", path)
	return addrs, hop{proc: p, admin: adminAddr}
}

// caddyRow is a contender of one Caddy process whose routes run handler.
func (s *sideBySide) caddyRow(handler func(upstream string) string, isChain bool) func(*testing.B, []string) started {
	return func(b *testing.B, upstreams []string) started {
		addrs, h := s.caddyHop(b, upstreams, handler)
		if !isChain {
			h.admin = ""
		}
		return started{addrs: addrs, hops: []hop{h}}
	}
}

func chainHandler(upstream string) string {
	return fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}]}`, upstream)
}

func l4ProxyHandler(upstream string) string {
	return fmt.Sprintf(`{"handler": "proxy", "upstreams": [{"dial": [%q]}]}`, upstream)
}

// l4EchoHandler is caddy-l4's echo handler (layer4.handlers.echo, an
// io.Copy of the connection onto itself): what caddy-l4's server costs
// per connection with nothing behind it.
func l4EchoHandler(string) string { return `{"handler": "echo"}` }

// chainTwoHops is an outer chain hop sending PROXY v2 to an inner one,
// which trusts it, each in its own process on the proxies' CPU.
func (s *sideBySide) chainTwoHops(b *testing.B, upstreams []string) started {
	innerAddrs, inner := s.caddyHop(b, upstreams, func(u string) string {
		return fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}],
			"accept_proxy_protocol": {"allow": ["127.0.0.1/32"]}}`, u)
	})
	addrs, outer := s.caddyHop(b, innerAddrs, func(u string) string {
		return fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}], "proxy_protocol": "v2"}`, u)
	})
	return started{addrs: addrs, hops: []hop{outer, inner}}
}

// haproxyHop runs HAProxy in the foreground with one thread and a
// frontend per upstream, no logs, its default buffers and no splicing.
// acceptProxy and sendProxy set accept-proxy on the binds and
// send-proxy-v2 on the servers.
func (s *sideBySide) haproxyHop(b *testing.B, bin string, upstreams []string, acceptProxy, sendProxy bool) ([]string, hop) {
	var cfg strings.Builder
	maxconn := s.idleConns + 1000
	fmt.Fprintf(&cfg, "global\n\tnbthread 1\n\tmaxconn %d\ndefaults\n\tmode tcp\n\tmaxconn %d\n"+
		"\ttimeout connect 3s\n\ttimeout client 1m\n\ttimeout server 1m\n", maxconn, maxconn)
	var addrs []string
	for i, u := range upstreams {
		addr := freeAddr(b)
		addrs = append(addrs, addr)
		bind, server := addr, u
		if acceptProxy {
			bind += " accept-proxy"
		}
		if sendProxy {
			server += " send-proxy-v2"
		}
		fmt.Fprintf(&cfg, "frontend f%d\n\tbind %s\n\tdefault_backend b%d\nbackend b%d\n\tserver s%d %s\n", i, bind, i, i, i, server)
	}
	path := filepath.Join(b.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-f", path).CombinedOutput(); err != nil {
		b.Fatalf("haproxy -c refuses the benchmark's config: %v\n%s\n%s", err, out, cfg.String())
	}
	return addrs, hop{proc: s.startPinned(b, nil, addrs, bin, "-db", "-f", path)}
}

func (s *sideBySide) haproxyRow(bin string) func(*testing.B, []string) started {
	return func(b *testing.B, upstreams []string) started {
		addrs, h := s.haproxyHop(b, bin, upstreams, false, false)
		return started{addrs: addrs, hops: []hop{h}}
	}
}

// haproxyTwoHops is HAProxy in front of HAProxy with PROXY v2 between.
func (s *sideBySide) haproxyTwoHops(bin string) func(*testing.B, []string) started {
	return func(b *testing.B, upstreams []string) started {
		innerAddrs, inner := s.haproxyHop(b, bin, upstreams, true, false)
		addrs, outer := s.haproxyHop(b, bin, innerAddrs, false, true)
		return started{addrs: addrs, hops: []hop{outer, inner}}
	}
}

// nginxRow runs nginx in the foreground as a master with one worker
// process, its pid file and error log in a temporary directory, no
// access log, a server block per upstream in its stream module.
func (s *sideBySide) nginxRow(bin, loadModule string) func(*testing.B, []string) started {
	return func(b *testing.B, upstreams []string) started {
		dir := b.TempDir()
		conns := 2*s.idleConns + 1000
		var servers strings.Builder
		var addrs []string
		for _, u := range upstreams {
			addr := freeAddr(b)
			addrs = append(addrs, addr)
			fmt.Fprintf(&servers, "\tserver { listen %s; proxy_pass %s; }\n", addr, u)
		}
		cfg := fmt.Sprintf("%s\ndaemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile %d;\n"+
			"pid %s/nginx.pid;\nerror_log %s/error.log warn;\nevents { worker_connections %d; }\nstream {\n%s}\n",
			loadModule, conns+100, dir, dir, conns, servers.String())
		path := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			b.Fatal(err)
		}
		errorLog := filepath.Join(dir, "error.log")
		if out, err := exec.Command(bin, "-t", "-p", dir, "-c", path, "-e", errorLog).CombinedOutput(); err != nil {
			b.Fatalf("nginx -t refuses the benchmark's config: %v\n%s\n%s", err, out, cfg)
		}
		p := s.startPinned(b, nil, addrs, bin, "-p", dir, "-c", path, "-e", errorLog)
		// The master listens before it starts its worker: wait for the
		// worker, whose CPU and memory are what the rows measure.
		deadline := time.Now().Add(10 * time.Second)
		for len(processTree(p.cmd.Process.Pid)) < 2 {
			if time.Now().After(deadline) {
				log, _ := os.ReadFile(errorLog)
				b.Fatalf("nginx started no worker within 10s:\n%s", log)
			}
			<-time.After(10 * time.Millisecond) // the process table has no event to wait on
		}
		if s.pin.proxy >= 0 {
			s.checkPinned(b, p.cmd.Process.Pid)
		}
		return started{addrs: addrs, hops: []hop{{proc: p}}}
	}
}

// bareProxyRow runs testdata/bareproxy, built once per benchmark run.
func (s *sideBySide) bareProxyRow(bin string) func(*testing.B, []string) started {
	return func(b *testing.B, upstreams []string) started {
		var args []string
		var addrs []string
		for _, u := range upstreams {
			addr := freeAddr(b)
			addrs = append(addrs, addr)
			args = append(args, "-route", addr+"="+u)
		}
		p := s.startPinned(b, []string{"GOMAXPROCS=1"}, addrs, bin, args...)
		return started{addrs: addrs, hops: []hop{{proc: p}}}
	}
}

// buildBareProxy builds testdata/bareproxy into the benchmark's
// temporary directory.
func buildBareProxy(b *testing.B) string {
	bin := filepath.Join(b.TempDir(), "bareproxy")
	cmd := exec.Command("go", "build", "-o", bin, "./integration/testdata/bareproxy")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("building bareproxy: %v\n%s", err, out)
	}
	return bin
}

// programVersion returns the first match of pattern in the output of
// bin's version flag ("2.6.12"), or "".
func programVersion(bin, flag, pattern string) string {
	out, _ := exec.Command(bin, flag).CombinedOutput()
	if m := regexp.MustCompile(pattern).FindStringSubmatch(string(out)); m != nil {
		return m[1]
	}
	return ""
}

// contenders lists the rows in the order they are measured.
func (s *sideBySide) contenders(b *testing.B) []contender {
	direct := func(_ *testing.B, upstreams []string) started { return started{addrs: upstreams} }
	rows := []contender{
		{key: "direct", name: "no proxy (the load generator's ceiling)", start: direct},
		{key: "chain", name: "`chain`", start: s.caddyRow(chainHandler, true)},
		{key: "proxy", name: "caddy-l4 `proxy`", start: s.caddyRow(l4ProxyHandler, false)},
	}
	haproxy := contender{key: "haproxy", name: "HAProxy", missing: "haproxy is not installed"}
	haproxy2 := contender{key: "haproxy2", name: "HAProxy, 2 hops (PROXY v2)", twoHops: true, missing: haproxy.missing}
	if bin := findProgram("haproxy"); bin != "" {
		haproxy.name += " " + programVersion(bin, "-v", `HAProxy version (\S+?)[-\s]`)
		haproxy.missing, haproxy2.missing = "", ""
		haproxy.start, haproxy2.start = s.haproxyRow(bin), s.haproxyTwoHops(bin)
	}
	nginx := contender{key: "nginx", name: "nginx stream", missing: "nginx is not installed"}
	if bin := findProgram("nginx"); bin != "" {
		nginx.name = "nginx " + programVersion(bin, "-v", `nginx/(\S+)`) + " stream"
		if line, err := nginxStreamLoadModule(bin); err != nil {
			nginx.missing = err.Error()
		} else {
			nginx.missing, nginx.start = "", s.nginxRow(bin, line)
		}
	}
	return append(rows, haproxy, nginx,
		contender{key: "echo", name: "floor: caddy-l4 `echo` (no upstream)", echoes: true, start: s.caddyRow(l4EchoHandler, false)},
		contender{key: "bare", name: "floor: bare Go proxy (testdata/bareproxy)", start: s.bareProxyRow(buildBareProxy(b))},
		contender{key: "chain2", name: "`chain`, 2 hops (PROXY v2)", twoHops: true, start: s.chainTwoHops},
		haproxy2,
	)
}
