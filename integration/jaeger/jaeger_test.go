// Package jaeger runs a three-hop chain of Caddy processes built from this
// checkout with tracing on, exporting to a real Jaeger (all-in-one, memory
// storage), and checks what Jaeger's query API shows. It is a module of
// its own so that Jaeger, a tool dependency of some 320 modules, stays out
// of the plugin's go.mod; the root `go test ./...` does not enter it, and
// .ci/run runs it.
package jaeger

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// freeAddr returns a loopback address whose port was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// goBuild builds pkg in dir into the test's temporary directory.
func goBuild(t *testing.T, dir, pkg, name string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), name)
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// jaegerBinary returns the path of the jaeger tool this module pins, built
// (or taken from the build cache) by `go tool -n`.
func jaegerBinary(t *testing.T) string {
	t.Helper()
	b, err := exec.Command("go", "tool", "-n", "jaeger").CombinedOutput()
	if err != nil {
		t.Fatalf("go tool -n jaeger: %v\n%s", err, b)
	}
	return strings.TrimSpace(string(b))
}

// process is a server the test started; it is interrupted, then killed if
// it lingers, when the test ends.
type process struct {
	name  string
	lines chan string // every line of its output, until it exits
	mu    sync.Mutex
	log   strings.Builder
}

// start runs bin with args and env, and waits until its output has a line
// containing ready.
func start(t *testing.T, name, ready string, env []string, bin string, args ...string) *process {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &process{name: name, lines: make(chan string, 1024)}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); pw.Close(); close(exited) }()
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(pr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.log.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			select {
			case p.lines <- sc.Text():
			default: // nobody waits for lines any more
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
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
			t.Logf("%s output:\n%s", name, p.output())
		}
	})
	deadline := time.After(60 * time.Second)
	for {
		select {
		case line, ok := <-p.lines:
			if !ok {
				t.Fatalf("%s exited before it was ready:\n%s", name, p.output())
			}
			if strings.Contains(line, ready) {
				return p
			}
		case <-deadline:
			t.Fatalf("%s did not write %q within 60s:\n%s", name, ready, p.output())
		}
	}
}

func (p *process) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// jaegerConfig is a collector-style config: an OTLP HTTP receiver, memory
// storage and the query API, each on the given address, and no other
// listener (the defaults are fixed ports).
func jaegerConfig(otlp, query, queryGRPC string) string {
	return fmt.Sprintf(`service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 1000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: %q
    grpc:
      endpoint: %q
receivers:
  otlp:
    protocols:
      http:
        endpoint: %q
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
`, query, queryGRPC, otlp)
}

// hopConfig is one hop's Caddy config: listen on listen, proxy to
// upstream with a PROXY v2 header unless it is the last hop (the backend
// speaks no PROXY protocol), accept one from loopback peers unless it is
// the first hop, and trace every chain.
func hopConfig(admin, listen, upstream string, first, last bool) string {
	handler := map[string]any{
		"handler":   "chain",
		"upstreams": []any{map[string]any{"dial": []string{upstream}}},
	}
	if !last {
		handler["proxy_protocol"] = "v2"
	}
	if !first {
		handler["accept_proxy_protocol"] = map[string]any{"allow": []string{"127.0.0.1/32"}}
	}
	cfg := map[string]any{
		"admin": map[string]any{"listen": admin, "config": map[string]any{"persist": false}},
		"apps": map[string]any{
			"layer4": map[string]any{"servers": map[string]any{"hop": map[string]any{
				"listen": []string{listen},
				"routes": []any{map[string]any{"handle": []any{handler}}},
			}}},
			"layer4chain": map[string]any{"tracing": map[string]any{"sample_ratio": 1}},
		},
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// echoBackend echoes each connection until the client half-closes.
func echoBackend(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// getJSON decodes a GET of url into v and returns the status code.
func getJSON(url string, v any) (int, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, nil
	}
	return resp.StatusCode, json.NewDecoder(resp.Body).Decode(v)
}

// jaegerTrace is the part of Jaeger's /api/traces/{id} answer the test reads.
type jaegerTrace struct {
	Data []struct {
		TraceID string `json:"traceID"`
		Spans   []struct {
			TraceID       string `json:"traceID"`
			SpanID        string `json:"spanID"`
			OperationName string `json:"operationName"`
			ProcessID     string `json:"processID"`
			References    []struct {
				RefType string `json:"refType"`
				TraceID string `json:"traceID"`
				SpanID  string `json:"spanID"`
			} `json:"references"`
			Tags []struct {
				Key   string `json:"key"`
				Value any    `json:"value"`
			} `json:"tags"`
			Logs []struct {
				Fields []struct {
					Key   string `json:"key"`
					Value any    `json:"value"`
				} `json:"fields"`
			} `json:"logs"`
		} `json:"spans"`
		Processes map[string]struct {
			ServiceName string `json:"serviceName"`
		} `json:"processes"`
	} `json:"data"`
}

// TestThreeHopChainIsOneTraceInJaeger: one client connection through three
// Caddy processes is one trace in Jaeger, its ID the chain ID, with one
// span per hop, each the child of the previous hop's.
func TestThreeHopChainIsOneTraceInJaeger(t *testing.T) {
	jaegerBin := jaegerBinary(t)
	caddyBin := goBuild(t, filepath.Join("..", ".."), "./cmd/caddy", "caddy")

	otlp, query := freeAddr(t), freeAddr(t)
	cfgPath := filepath.Join(t.TempDir(), "jaeger.yaml")
	if err := os.WriteFile(cfgPath, []byte(jaegerConfig(otlp, query, freeAddr(t))), 0o644); err != nil {
		t.Fatal(err)
	}
	start(t, "jaeger", "Everything is ready", nil, jaegerBin, "--config", cfgPath)

	backend := echoBackend(t)
	listen := []string{freeAddr(t), freeAddr(t), freeAddr(t)}
	admins := []string{freeAddr(t), freeAddr(t), freeAddr(t)}
	for i := 2; i >= 0; i-- { // last hop first, so each upstream listens
		upstream := backend
		if i < 2 {
			upstream = listen[i+1]
		}
		cfg := filepath.Join(t.TempDir(), "caddy.json")
		if err := os.WriteFile(cfg, []byte(hopConfig(admins[i], listen[i], upstream, i == 0, i == 2)), 0o644); err != nil {
			t.Fatal(err)
		}
		home := t.TempDir()
		start(t, fmt.Sprintf("hop%d", i+1), "serving initial configuration", []string{
			"HOME=" + home, "XDG_CONFIG_HOME=" + home, "XDG_DATA_HOME=" + home,
			"OTEL_TRACES_EXPORTER=otlp",
			"OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
			"OTEL_EXPORTER_OTLP_ENDPOINT=http://" + otlp,
			"OTEL_BSP_SCHEDULE_DELAY=100",
			fmt.Sprintf("OTEL_SERVICE_NAME=layer4chain-hop%d", i+1),
		}, caddyBin, "run", "--config", cfg)
	}

	c, err := net.Dial("tcp", listen[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	// The echo came back through every hop: the first hop lists the
	// connection, with its chain ID.
	var conns []struct {
		ChainID string `json:"chain_id"`
	}
	if code, err := getJSON("http://"+admins[0]+"/layer4chain/connections", &conns); err != nil || code != http.StatusOK || len(conns) != 1 {
		t.Fatalf("first hop's connections: status %d, %v, %+v", code, err, conns)
	}
	chainID := conns[0].ChainID
	if len(chainID) != 32 {
		t.Fatalf("chain ID %q is not 32 hex digits", chainID)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Fatalf("after the half-close: %q, %v", rest, err)
	}

	// The spans reach Jaeger within the batch delay; polling its query API
	// is the only way to know when.
	var tr jaegerTrace
	deadline := time.Now().Add(30 * time.Second)
	for {
		tr = jaegerTrace{}
		code, err := getJSON("http://"+query+"/api/traces/"+chainID, &tr)
		if err == nil && code == http.StatusOK && len(tr.Data) == 1 && len(tr.Data[0].Spans) >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Jaeger has no trace %s with 3 spans after 30s: status %d, %v, %+v", chainID, code, err, tr)
		}
		time.Sleep(100 * time.Millisecond) // polling: Jaeger has no event to wait on
	}

	trace := tr.Data[0]
	if len(trace.Spans) != 3 || trace.TraceID != chainID {
		t.Fatalf("trace %s has %d spans, want 3 in trace %s", trace.TraceID, len(trace.Spans), chainID)
	}
	byHop := map[int]int{} // hop → index in trace.Spans
	for i, s := range trace.Spans {
		if s.OperationName != "layer4chain.connection" || s.TraceID != chainID {
			t.Fatalf("span %s: operation %q, trace %s", s.SpanID, s.OperationName, s.TraceID)
		}
		tags := map[string]any{}
		for _, tag := range s.Tags {
			tags[tag.Key] = tag.Value
		}
		hop, _ := tags["layer4chain.hop"].(float64)
		byHop[int(hop)] = i
		if tags["layer4chain.chain_id"] != chainID || tags["layer4chain.close_reason"] == nil ||
			tags["layer4chain.bytes_up"] != float64(4) || tags["layer4chain.bytes_down"] != float64(4) {
			t.Fatalf("hop %v span tags: %v", hop, tags)
		}
		if want := fmt.Sprintf("layer4chain-hop%d", int(hop)); trace.Processes[s.ProcessID].ServiceName != want {
			t.Fatalf("hop %v span from service %q, want %s", hop, trace.Processes[s.ProcessID].ServiceName, want)
		}
		var events []string
		for _, l := range s.Logs {
			for _, f := range l.Fields {
				if f.Key == "event" {
					events = append(events, fmt.Sprint(f.Value))
				}
			}
		}
		if strings.Join(events, ",") != "connecting,established,half_closed" {
			t.Fatalf("hop %v span events %v, want connecting, established, half_closed", hop, events)
		}
	}
	for hop := 1; hop <= 3; hop++ {
		i, ok := byHop[hop]
		if !ok {
			t.Fatalf("no span of hop %d: %v", hop, byHop)
		}
		refs := trace.Spans[i].References
		if hop == 1 {
			if len(refs) != 0 {
				t.Fatalf("the first hop's span has references %+v, want none (a root)", refs)
			}
			continue
		}
		parent := trace.Spans[byHop[hop-1]].SpanID
		if len(refs) != 1 || refs[0].RefType != "CHILD_OF" || refs[0].SpanID != parent || refs[0].TraceID != chainID {
			t.Fatalf("hop %d's span references %+v, want CHILD_OF hop %d's span %s", hop, refs, hop-1, parent)
		}
	}
}
