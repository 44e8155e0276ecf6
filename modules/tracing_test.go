package modules

import (
	"context"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// spanSink is an exporter that keeps what it is given, and counts how
// many times the process made one.
type spanSink struct {
	mu    sync.Mutex
	spans []sdktrace.ReadOnlySpan
	made  int
}

func (s *spanSink) ExportSpans(_ context.Context, spans []sdktrace.ReadOnlySpan) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.spans = append(s.spans, spans...)
	return nil
}

func (s *spanSink) Shutdown(context.Context) error { return nil }

func (s *spanSink) exported() []sdktrace.ReadOnlySpan {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.spans)
}

func (s *spanSink) exportersMade() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.made
}

// sinkExporter makes the process's exporter s until the test ends.
func sinkExporter(t *testing.T) *spanSink {
	s := new(spanSink)
	saved := newSpanExporter
	newSpanExporter = func(context.Context) (sdktrace.SpanExporter, error) {
		s.mu.Lock()
		s.made++
		s.mu.Unlock()
		return s, nil
	}
	t.Cleanup(func() { newSpanExporter = saved })
	return s
}

func attrOf(s sdktrace.ReadOnlySpan, key string) attribute.Value {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == key {
			return kv.Value
		}
	}
	return attribute.Value{}
}

func eventNames(s sdktrace.ReadOnlySpan) []string {
	var out []string
	for _, e := range s.Events() {
		out = append(out, e.Name)
	}
	return out
}

// Two hops in one process, PROXY v2 between them: one connection makes a
// span on each hop, in one trace whose ID is the chain ID, the second hop's
// span the child of the first's. The spans reach the exporter when the
// config is unloaded: the last app with tracing flushes the provider.
func TestTracedConnectionIsOneTraceAcrossHops(t *testing.T) {
	checkLeaks(t)
	sink := sinkExporter(t)
	backend := chaintest.NewEchoBackend(t)
	hop1, hop2 := chaintest.FreeAddr(t), chaintest.FreeAddr(t)
	servers := map[string]any{
		"hop1": server(hop1, map[string]any{"upstreams": upstreams(hop2), "proxy_protocol": "v2"}),
		"hop2": server(hop2, map[string]any{"upstreams": upstreams(backend.Addr),
			"accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.1/32"}}}),
	}
	if err := caddy.Load(caddyConfigWith(servers, "", map[string]any{"tracing": map[string]any{"sample_ratio": 1}}), true); err != nil {
		t.Fatal(err)
	}
	c := chaintest.Dial(t, hop1)
	c.Write([]byte("ping"))
	_ = c.CloseWrite()
	if got, _, err := chaintest.ReadUntilClosed(c, 5*time.Second); string(got) != "ping" {
		t.Fatalf("echo read %q (%v)", got, err)
	}
	select {
	case <-processTracker().Empty():
	case <-time.After(5 * time.Second):
		t.Fatal("the connection's records were not removed")
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}

	spans := sink.exported()
	if len(spans) != 2 {
		t.Fatalf("%d spans exported, want 2", len(spans))
	}
	slices.SortFunc(spans, func(a, b sdktrace.ReadOnlySpan) int {
		return int(attrOf(a, attrHop).AsInt64() - attrOf(b, attrHop).AsInt64())
	})
	first, second := spans[0], spans[1]
	chainID := attrOf(first, attrChainID).AsString()
	if first.SpanContext().TraceID().String() != chainID || second.SpanContext().TraceID() != first.SpanContext().TraceID() {
		t.Fatalf("trace IDs %s and %s, chain ID %q: want the chain ID in both", first.SpanContext().TraceID(), second.SpanContext().TraceID(), chainID)
	}
	if first.Parent().IsValid() || second.Parent().SpanID() != first.SpanContext().SpanID() || !second.Parent().IsRemote() {
		t.Fatalf("parents: first %v, second %v; want none, then the first span", first.Parent(), second.Parent())
	}
	for i, s := range spans {
		if s.Name() != spanName || attrOf(s, attrHop).AsInt64() != int64(i+1) ||
			attrOf(s, attrCloseReason).AsString() == "" ||
			attrOf(s, attrBytesUp).AsInt64() != 4 || attrOf(s, attrBytesDown).AsInt64() != 4 ||
			attrOf(s, attrOriginalClient).AsString() != c.LocalAddr().String() {
			t.Fatalf("span %d: %s %v", i+1, s.Name(), s.Attributes())
		}
		if got := eventNames(s); !slices.Equal(got[:2], []string{"connecting", "established"}) || !slices.Contains(got, "half_closed") {
			t.Fatalf("span %d events %v, want connecting, established, half_closed", i+1, got)
		}
	}
	if up := attrOf(first, attrUpstream).AsString(); up != hop2 {
		t.Fatalf("first hop's upstream %q, want %s", up, hop2)
	}
}

// A reload keeps the process's tracer provider (one exporter made), and a
// config with tracing off leaves none.
func TestTracingSurvivesReloadsAndEndsWithTheLastApp(t *testing.T) {
	checkLeaks(t)
	sink := sinkExporter(t)
	servers := map[string]any{"s": server("127.0.0.1:0", map[string]any{"upstreams": upstreams(chaintest.RefusedAddr(t))})}
	for _, ratio := range []float64{1, 0.5} {
		if err := caddy.Load(caddyConfigWith(servers, "", map[string]any{"tracing": map[string]any{"sample_ratio": ratio}}), true); err != nil {
			t.Fatal(err)
		}
	}
	if n := sink.exportersMade(); n != 1 {
		t.Fatalf("%d exporters made across a reload, want 1", n)
	}
	if err := caddy.Load(caddyConfigWith(servers, "", map[string]any{}), true); err != nil {
		t.Fatal(err)
	}
	if _, loaded := tracingPool.References(tracingPoolKey); loaded {
		t.Fatal("the tracer provider outlived the last config with tracing")
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
}

func TestBadSampleRatioFailsNamingTheField(t *testing.T) {
	for _, ratio := range []float64{-0.1, 1.5} {
		err := caddy.Load(caddyConfigWith(map[string]any{}, "", map[string]any{"tracing": map[string]any{"sample_ratio": ratio}}), true)
		if err == nil {
			_ = caddy.Stop()
			t.Fatalf("sample_ratio %v loaded", ratio)
		}
		if !strings.Contains(err.Error(), "tracing.sample_ratio") {
			t.Fatalf("sample_ratio %v: %v, want it to name tracing.sample_ratio", ratio, err)
		}
	}
}

func TestTracingGlobalOptionAdapts(t *testing.T) {
	adapt := func(body string) (string, error) {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(body), map[string]any{"filename": "Caddyfile"})
		return string(out), err
	}
	for body, want := range map[string]string{
		"{\n\tlayer4chain {\n\t\ttracing {\n\t\t\tsample_ratio 0.1\n\t\t}\n\t}\n}\n": `"layer4chain":{"tracing":{"sample_ratio":0.1}}`,
		"{\n\tlayer4chain {\n\t\ttracing\n\t}\n}\n":                                  `"layer4chain":{"tracing":{}}`,
		"{\n\tlayer4chain {\n\t\ttracing {\n\t\t\tsample_ratio 0\n\t\t}\n\t}\n}\n":   `"layer4chain":{"tracing":{"sample_ratio":0}}`,
	} {
		got, err := adapt(body)
		if err != nil || !strings.Contains(got, want) {
			t.Fatalf("adapting\n%s: %s (%v), want %s", body, got, err, want)
		}
	}
	for body, want := range map[string]string{
		"{\n\tlayer4chain {\n\t\ttracing {\n\t\t\tsample_ratio 2\n\t\t}\n\t}\n}\n": "option 'sample_ratio': want a fraction from 0 to 1, got '2'",
		"{\n\tlayer4chain {\n\t\ttracing {\n\t\t\tsample_ratio\n\t\t}\n\t}\n}\n":   "option 'sample_ratio' takes one value",
		"{\n\tlayer4chain {\n\t\ttracing {\n\t\t\tratio 0.5\n\t\t}\n\t}\n}\n":      "unknown tracing option 'ratio'",
		"{\n\tlayer4chain {\n\t\ttracing on\n\t}\n}\n":                             "wrong argument count",
	} {
		if _, err := adapt(body); err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("adapting\n%s: %v, want an error containing %q", body, err, want)
		}
	}
}

// The first hop to trace a chain samples it by the ratio, over chain IDs
// whose last 8 bytes are a counter; a hop given a parent follows its
// sampled flag whatever its own ratio.
func TestSamplingFollowsTheRatioThenTheParent(t *testing.T) {
	sinkExporter(t)
	tracker := layer4chain.NewTracker()
	// The record has no chain ID (serve sets it): its trace ID is the
	// hash of "".
	start := func(ratio float64, parent layer4chain.TraceParent) (bool, layer4chain.TraceParent) {
		tr, err := acquireTracer(context.Background(), ratio)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = releaseTracer() }()
		r, err := tracker.Admit("test", layer4chain.Limits{}, "srv", netip.MustParseAddrPort("127.0.0.1:1"))
		if err != nil {
			t.Fatal(err)
		}
		defer tracker.Remove(r, layer4chain.ReasonClientClosed)
		span, next := tr.StartSpan(r, parent)
		if span != nil {
			span.(trace.Span).End()
		}
		return span != nil, next
	}
	sampledParent := layer4chain.TraceParent{SpanID: [8]byte{1}, Flags: 1}
	unsampledParent := layer4chain.TraceParent{SpanID: [8]byte{1}, Flags: 0}
	if ok, next := start(0, sampledParent); !ok || next.Flags&1 == 0 || !next.IsValid() {
		t.Fatalf("ratio 0 with a sampled parent: traced %v, next %+v; want traced and sampled", ok, next)
	}
	if ok, next := start(1, unsampledParent); ok || next.Flags&1 != 0 || !next.IsValid() {
		t.Fatalf("ratio 1 with an unsampled parent: traced %v, next %+v; want not traced, and the next hop told so", ok, next)
	}
	if ok, _ := start(1, layer4chain.TraceParent{}); !ok {
		t.Fatal("ratio 1 without a parent: not traced")
	}
	if ok, next := start(0, layer4chain.TraceParent{}); ok || next.Flags&1 != 0 {
		t.Fatalf("ratio 0 without a parent: traced %v, next %+v", ok, next)
	}

	// The root decision over counter-like chain IDs follows the ratio.
	sampler := sdktrace.ParentBased(rootSampler{})
	ctx := context.WithValue(context.Background(), rootKey{}, root{ratio: 0.25})
	sampled := 0
	const n = 4000
	for i := range n {
		tid := chainTraceID(fmt.Sprintf("5f3a9c0e12345678%016x", i+1))
		if sampler.ShouldSample(sdktrace.SamplingParameters{ParentContext: ctx, TraceID: tid}).Decision == sdktrace.RecordAndSample {
			sampled++
		}
	}
	if sampled < n/4-n/20 || sampled > n/4+n/20 {
		t.Fatalf("%d of %d chains sampled at ratio 0.25", sampled, n)
	}
}

// A chain ID of 32 hex digits is the trace ID; any other is hashed into one,
// the same on every hop.
func TestChainTraceID(t *testing.T) {
	id := "0123456789abcdef0123456789abcdef"
	if got := chainTraceID(id); hex.EncodeToString(got[:]) != id {
		t.Fatalf("trace ID %s for chain ID %s", got, id)
	}
	for _, other := range []string{"haproxy-unique-id", strings.Repeat("0", 32), strings.Repeat("z", 32)} {
		a, b := chainTraceID(other), chainTraceID(other)
		if !a.IsValid() || a != b {
			t.Fatalf("chain ID %q: trace IDs %s and %s", other, a, b)
		}
	}
}
