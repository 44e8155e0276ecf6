package integration

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// The interop tests put proxies nobody here wrote next to our hops: Debian's
// haproxy (2.6) and nginx with its stream module (1.22), in both directions.
// They run those programs as real processes in the foreground on free
// loopback ports. Where a program is not installed a test skips, saying so;
// CI installs them and sets requireInteropEnv, under which a missing program
// fails the test instead, so CI cannot pass without running them.
const requireInteropEnv = "LAYER4CHAIN_REQUIRE_INTEROP"

// interopClient is the address the tests' clients connect from, so that
// the original client a proxy reports is told apart from the hops, which
// all talk from 127.0.0.1.
var interopClient = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 5)}

// missingInterop skips the test, or fails it in CI, because something it
// needs is not installed.
func missingInterop(t *testing.T, format string, args ...any) {
	t.Helper()
	why := fmt.Sprintf(format, args...)
	if os.Getenv(requireInteropEnv) != "" {
		t.Fatalf("%s, and %s is set: CI must run the interop tests (.ci/run installs haproxy, nginx and libnginx-mod-stream)", why, requireInteropEnv)
	}
	t.Skipf("%s; install Debian's haproxy, nginx and libnginx-mod-stream to run this test", why)
}

// interopBinary finds a program on PATH or in the sbin directories, which a
// user's PATH often lacks.
func interopBinary(t *testing.T, name string) string {
	t.Helper()
	path := findProgram(name)
	if path == "" {
		missingInterop(t, "%s is not installed", name)
	}
	return path
}

// findProgram returns the path of a program on PATH or in the sbin
// directories, or "" when it is not installed.
func findProgram(name string) string {
	if path, err := exec.LookPath(name); err == nil {
		return path
	}
	for _, dir := range []string{"/usr/sbin", "/usr/local/sbin", "/sbin"} {
		path := filepath.Join(dir, name)
		if info, err := os.Stat(path); err == nil && info.Mode().IsRegular() && info.Mode()&0o111 != 0 {
			return path
		}
	}
	return ""
}

// needInterop skips (or fails) the test before it starts anything when a
// program it runs is missing: "haproxy", or "nginx" with its stream module.
func needInterop(t *testing.T, program string) {
	t.Helper()
	bin := interopBinary(t, program)
	if program == "nginx" {
		nginxStreamModule(t, bin)
	}
}

// dialFromClient connects to addr from interopClient.
func dialFromClient(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: interopClient, Timeout: 3 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("connecting from %s to %s: %v", interopClient.IP, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// greetAndEcho reads the greeting of a namedBackend through c and has a
// line echoed: the bytes went end to end in both directions.
func greetAndEcho(t *testing.T, c net.Conn, backend string) {
	t.Helper()
	r := bufio.NewReader(c)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	greeting, err := r.ReadString('\n')
	if err != nil || greeting != backend+"\n" {
		t.Fatalf("greeting %q, %v: want %q", greeting, err, backend)
	}
	if err := echoVia(c, r, "interop"); err != nil {
		t.Fatalf("echo end to end: %v", err)
	}
}

// chainOf returns the one record of a hop whose original client is client.
func chainOf(t *testing.T, hop *healthHop, client string) connInfo {
	t.Helper()
	list := listConnections(t, hop.base())
	of := connectionsOf(list, client)
	if len(of) != 1 {
		t.Fatalf("the hop lists %d connections of client %s, want 1: %+v", len(of), client, list)
	}
	return of[0]
}

// outputLine returns the first line of p's output that contains substr.
func outputLine(p *process, substr string) string {
	for _, line := range strings.Split(p.output.String(), "\n") {
		if strings.Contains(line, substr) {
			return line
		}
	}
	return ""
}

// startHAProxy runs haproxy in the foreground (-db) with cfg, whose global
// section must log to stderr, and waits until it listens on ready.
func startHAProxy(t *testing.T, cfg string, ready ...string) *process {
	t.Helper()
	bin := interopBinary(t, "haproxy")
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c refuses the test's config: %v\n%s\n%s", err, out, cfg)
	}
	return startCaddyCommand(t, nil, ready, bin, "-db", "-f", path)
}

// haproxyGlobal is the start of every test config: logs on stderr, one
// line per connection as soon as it reaches its server (logasap), so a
// test can read it while the connection is open.
const haproxyGlobal = `global
	log stderr format raw local0
defaults
	mode tcp
	log global
	option logasap
	timeout connect 3s
	timeout client 30s
	timeout server 30s
`

var streamModule struct {
	once sync.Once
	line string // the load_module directive, "" when the stream module is built in
	err  error
}

// nginxStreamModule returns the load_module line of the Debian package
// libnginx-mod-stream (modules-enabled/50-mod-stream.conf next to nginx's
// own config), its path made absolute: a test's nginx runs with its own
// prefix (-p), against which nginx would resolve the package's relative one.
func nginxStreamModule(t *testing.T, bin string) string {
	t.Helper()
	line, err := nginxStreamLoadModule(bin)
	if err != nil {
		missingInterop(t, "%v", err)
	}
	return line
}

// nginxStreamLoadModule is nginxStreamModule for callers that do not skip:
// the load_module line, or why nginx cannot run a stream block.
func nginxStreamLoadModule(bin string) (string, error) {
	streamModule.once.Do(func() {
		out, err := exec.Command(bin, "-V").CombinedOutput()
		if err != nil {
			streamModule.err = fmt.Errorf("nginx -V: %v\n%s", err, out)
			return
		}
		build := string(out)
		if strings.Contains(build, "--with-stream ") || strings.HasSuffix(strings.TrimSpace(build), "--with-stream") {
			return // built in
		}
		option := func(name, fallback string) string {
			if m := regexp.MustCompile(`--` + name + `=(\S+)`).FindStringSubmatch(build); m != nil {
				return m[1]
			}
			return fallback
		}
		prefix := option("prefix", "/usr/share/nginx")
		confFile := filepath.Join(filepath.Dir(option("conf-path", "/etc/nginx/nginx.conf")), "modules-enabled", "50-mod-stream.conf")
		text, err := os.ReadFile(confFile)
		if err != nil {
			streamModule.err = fmt.Errorf("nginx's stream module is not installed (libnginx-mod-stream): %v", err)
			return
		}
		m := regexp.MustCompile(`(?m)^\s*load_module\s+(\S+?);`).FindStringSubmatch(string(text))
		if m == nil {
			streamModule.err = fmt.Errorf("%s has no load_module line:\n%s", confFile, text)
			return
		}
		module := m[1]
		if !filepath.IsAbs(module) {
			module = filepath.Join(prefix, module)
		}
		if _, err := os.Stat(module); err != nil {
			streamModule.err = fmt.Errorf("nginx's stream module (libnginx-mod-stream): %v", err)
			return
		}
		streamModule.line = "load_module " + module + ";"
	})
	return streamModule.line, streamModule.err
}

// startNginx runs nginx in the foreground, one process, with the given
// stream block, its pid file and error log in a temporary directory, its
// access log (the stream block's access_log /dev/stdout) in the process's
// output; it waits until nginx listens on ready.
func startNginx(t *testing.T, stream string, ready ...string) *process {
	t.Helper()
	bin := interopBinary(t, "nginx")
	module := nginxStreamModule(t, bin)
	dir := t.TempDir()
	cfg := fmt.Sprintf(`%s
daemon off;
master_process off;
pid %s/nginx.pid;
error_log %s/error.log info;
events { worker_connections 64; }
stream {
%s
}
`, module, dir, dir, stream)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-t", "-p", dir, "-c", path, "-e", filepath.Join(dir, "error.log")).CombinedOutput(); err != nil {
		t.Fatalf("nginx -t refuses the test's config: %v\n%s\n%s", err, out, cfg)
	}
	p := startCaddyCommand(t, nil, ready, bin, "-p", dir, "-c", path, "-e", filepath.Join(dir, "error.log"))
	t.Cleanup(func() {
		if t.Failed() {
			log, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			t.Logf("nginx error.log:\n%s", log)
		}
	})
	return p
}

// TestInteropHAProxySendsProxyV2ToTheInnerHop puts HAProxy in front of an
// inner hop, as an operator whose edge is HAProxy would: HAProxy sends a
// PROXY v2 header with its unique ID, and the hop's record shows the
// client HAProxy accepted as the original client and HAProxy's unique ID
// as the chain ID, so one ID follows the connection across both products.
func TestInteropHAProxySendsProxyV2ToTheInnerHop(t *testing.T) {
	needInterop(t, "haproxy")
	backend := startNamedBackend(t, "backend", "")
	inner := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}],
		"accept_proxy_protocol": {"allow": ["127.0.0.1/32"]}}`, backend.addr))
	front := freeAddr(t)
	haproxy := startHAProxy(t, haproxyGlobal+fmt.Sprintf(`
frontend clients
	bind %s
	unique-id-format haproxy-%%ci:%%cp
	log-format "haproxy accepted %%ci:%%cp unique_id=%%ID"
	default_backend inner_hop
backend inner_hop
	server inner %s send-proxy-v2 proxy-v2-options unique-id,authority
`, front, inner.listen), front)

	c := dialFromClient(t, front)
	client := c.LocalAddr().String()
	greetAndEcho(t, c, "backend")

	wantID := "haproxy-" + client
	haproxy.waitOutput(t, "unique_id="+wantID, 5*time.Second)
	t.Logf("haproxy: %s", outputLine(haproxy, "unique_id="+wantID))
	rec := chainOf(t, inner, client)
	if rec.ChainID != wantID {
		t.Fatalf("the inner hop's record has chain_id %q, want HAProxy's unique ID %q: %+v", rec.ChainID, wantID, rec)
	}
	t.Logf("inner hop: original_client=%s chain_id=%s hop=%d", rec.OriginalClient, rec.ChainID, rec.Hop)
}

// tlsGreeter listens on a free port, terminates TLS with a certificate
// for name, greets with name and echoes: a TLS backend behind HAProxy.
func tlsGreeter(t *testing.T, name string) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{selfSigned(t, name)}})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.WriteString(c, name+"\n"); err == nil {
					_, _ = io.Copy(c, c)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// TestInteropOuterHopSendsProxyV2ToHAProxy puts HAProxy behind an outer
// hop: HAProxy accepts our v2 header (accept-proxy) and logs the original
// client, our chain ID (PP2_TYPE_UNIQUE_ID) and the server name the client
// asked for (PP2_TYPE_AUTHORITY, which the hop knows from caddy-l4's tls
// matcher; the TLS session itself passes through to the backend).
func TestInteropOuterHopSendsProxyV2ToHAProxy(t *testing.T) {
	needInterop(t, "haproxy")
	const serverName = "interop.example"
	backend := tlsGreeter(t, serverName)
	haproxyAddr := freeAddr(t)
	haproxy := startHAProxy(t, haproxyGlobal+fmt.Sprintf(`
frontend from_chain
	bind %s accept-proxy
	log-format "haproxy accepted src=%%[src]:%%[src_port] unique_id=%%[fc_pp_unique_id] authority=%%[fc_pp_authority]"
	default_backend tls_backend
backend tls_backend
	server backend %s
`, haproxyAddr, backend), haproxyAddr)

	outer := &healthHop{listen: freeAddr(t), admin: freeAddr(t)}
	cfg := fmt.Sprintf(`{"admin": {"listen": %q},
		"apps": {"layer4": {"servers": {"hop": {"listen": [%q], "routes": [{
			"match": [{"tls": {"sni": [%q]}}],
			"handle": [{"handler": "chain", "upstreams": [{"dial": [%q]}], "proxy_protocol": "v2"}]
		}]}}}}}`, outer.admin, outer.listen, serverName, haproxyAddr)
	outer.proc = startCaddy(t, []string{outer.listen, outer.admin}, "--config", writeConfig(t, cfg))

	raw := dialFromClient(t, outer.listen)
	client := raw.LocalAddr().String()
	c := tls.Client(raw, &tls.Config{ServerName: serverName, InsecureSkipVerify: true})
	greetAndEcho(t, c, serverName)
	rec := chainOf(t, outer, client)
	if rec.ChainID == "" {
		t.Fatalf("the outer hop's record has no chain ID: %+v", rec)
	}

	want := fmt.Sprintf("haproxy accepted src=%s unique_id=%s authority=%s", client, rec.ChainID, serverName)
	haproxy.waitOutput(t, want, 5*time.Second)
	t.Logf("outer hop: original_client=%s chain_id=%s", rec.OriginalClient, rec.ChainID)
	t.Logf("haproxy: %s", outputLine(haproxy, want))
}

// TestInteropNginxSendsProxyV1ToTheInnerHop puts nginx's stream proxy in
// front of an inner hop. nginx sends v1 only (proxy_protocol on): the
// hop's record shows the client nginx accepted as the original client.
func TestInteropNginxSendsProxyV1ToTheInnerHop(t *testing.T) {
	needInterop(t, "nginx")
	backend := startNamedBackend(t, "backend", "")
	inner := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}],
		"accept_proxy_protocol": {"allow": ["127.0.0.1/32"]}}`, backend.addr))
	front := freeAddr(t)
	nginx := startNginx(t, fmt.Sprintf(`
	log_format interop "nginx proxied $remote_addr:$remote_port to $upstream_addr";
	access_log /dev/stdout interop;
	server {
		listen %s;
		proxy_protocol on;
		proxy_pass %s;
	}`, front, inner.listen), front)

	c := dialFromClient(t, front)
	client := c.LocalAddr().String()
	greetAndEcho(t, c, "backend")
	rec := chainOf(t, inner, client)
	t.Logf("inner hop: original_client=%s chain_id=%s hop=%d", rec.OriginalClient, rec.ChainID, rec.Hop)

	// nginx writes its stream access log when the session ends.
	c.Close()
	want := fmt.Sprintf("nginx proxied %s to %s", client, inner.listen)
	nginx.waitOutput(t, want, 5*time.Second)
	t.Logf("nginx: %s", outputLine(nginx, want))
}

// TestInteropOuterHopSendsProxyV2ToNginx puts nginx behind an outer hop:
// nginx takes the original client from our v2 header (listen ...
// proxy_protocol, set_real_ip_from the hop) and answers with what it
// learned, which is the client's own address.
func TestInteropOuterHopSendsProxyV2ToNginx(t *testing.T) {
	needInterop(t, "nginx")
	nginxAddr := freeAddr(t)
	startNginx(t, fmt.Sprintf(`
	server {
		listen %s proxy_protocol;
		set_real_ip_from 127.0.0.1;
		return "$proxy_protocol_addr:$proxy_protocol_port $remote_addr\n";
	}`, nginxAddr), nginxAddr)
	outer := startHealthHop(t, "", fmt.Sprintf(`{"handler": "chain", "upstreams": [{"dial": [%q]}], "proxy_protocol": "v2"}`, nginxAddr))

	c := dialFromClient(t, outer.listen)
	client := c.LocalAddr().(*net.TCPAddr)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	answer, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("nginx's answer through the outer hop: %q, %v", answer, err)
	}
	if want := fmt.Sprintf("%s %s\n", client, client.IP); answer != want {
		t.Fatalf("nginx answered %q, want %q: it did not take the client from our header", answer, want)
	}
	t.Logf("nginx answered: %s", strings.TrimSpace(answer))
}
