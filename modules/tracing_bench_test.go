package modules

import (
	"context"
	"net"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// discardExporter drops every span, so the benchmark measures making them.
type discardExporter struct{}

func (discardExporter) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discardExporter) Shutdown(context.Context) error                             { return nil }

// benchHop serves p on a free loopback port until the benchmark ends.
func benchHop(b *testing.B, p *layer4chain.Proxy) string {
	return chaintest.NewBackend(b, func(c *net.TCPConn) {
		p.Serve(c, nil, layer4chain.ClientMeta{Server: "bench"})
	}).Addr
}

// BenchmarkConnectionsPerSecondTracing opens a connection through one hop
// (the process's tracker and observer, as in Caddy), moves one small
// exchange and closes it: with tracing off (no Tracer), and on with every
// connection sampled and its span batched to an exporter that drops it.
// "off" is the figure that must not move.
func BenchmarkConnectionsPerSecondTracing(b *testing.B) {
	for _, mode := range []string{"off", "on"} {
		b.Run(mode, func(b *testing.B) {
			backend := chaintest.NewEchoBackend(b)
			up := layer4chain.NewUpstream(backend.Addr)
			bal, err := layer4chain.NewBalancer("", []*layer4chain.Upstream{up}, 0)
			if err != nil {
				b.Fatal(err)
			}
			p := &layer4chain.Proxy{Tracker: processTracker(), Balancer: bal,
				Dialer: &layer4chain.Dialer{ConnectTimeout: time.Second}, Timeouts: layer4chain.Timeouts{Idle: time.Minute}}
			if mode == "on" {
				saved := newSpanExporter
				newSpanExporter = func(context.Context) (sdktrace.SpanExporter, error) { return discardExporter{}, nil }
				tracer, err := acquireTracer(context.Background(), 1)
				newSpanExporter = saved
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = releaseTracer() })
				p.Tracer = tracer
			}
			addr := benchHop(b, p)
			msg, got := []byte("ping"), make([]byte, 4)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				chaintest.EchoRound(b, addr, msg, got)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conn/s")
		})
	}
}
