package modules

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	chaincaddyfile "github.com/layer4chain/caddy-layer4chain/caddyfile"
	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

// Tracing switches on OpenTelemetry traces of proxied connections: each
// connection is a span named layer4chain.connection, whose trace ID is the
// chain ID, and whose parent is the previous hop's span (sent in the PROXY
// v2 TLV 0xE1), so that the hops of one connection form one trace. The
// exporter is configured by the standard OpenTelemetry environment
// variables (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT,
// OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_SERVICE_NAME, OTEL_BSP_*...), as for
// Caddy's HTTP tracing handler.
type Tracing struct {
	// SampleRatio is the fraction of chains traced when this hop is the
	// first to trace them, from 0 to 1. A connection whose previous hop
	// sent its span follows that hop's decision instead, so a chain is
	// traced on every hop or on none. Default (absent): 1, every chain.
	SampleRatio *float64 `json:"sample_ratio,omitempty"`
}

// The names of tracing: one owner each.
const (
	// spanName names each connection's span.
	spanName = "layer4chain.connection"
	// tracerName is the instrumentation scope of the spans.
	tracerName = "github.com/layer4chain/caddy-layer4chain"
	// tracingPoolKey is the key of the process's tracer provider in
	// tracingPool.
	tracingPoolKey = "tracer_provider"
	// defaultSampleRatio applies when sample_ratio is absent.
	defaultSampleRatio = 1.0
	// tracingShutdownTimeout bounds the flush and shutdown of the tracer
	// provider, so that an unreachable collector cannot hold up a reload
	// or the process's exit.
	tracingShutdownTimeout = 5 * time.Second
)

// The attributes of a connection's span, named like the admin API's fields.
const (
	attrChainID        = "layer4chain.chain_id"
	attrHop            = "layer4chain.hop"
	attrServer         = "layer4chain.server"
	attrClient         = "layer4chain.client"
	attrOriginalClient = "layer4chain.original_client"
	attrUpstream       = "layer4chain.upstream"
	attrCloseReason    = "layer4chain.close_reason"
	attrCloseDetail    = "layer4chain.close_detail"
	attrBytesUp        = "layer4chain.bytes_up"
	attrBytesDown      = "layer4chain.bytes_down"
)

// sampleRatio returns the configured ratio or the default.
func (t *Tracing) sampleRatio() float64 {
	if t.SampleRatio == nil {
		return defaultSampleRatio
	}
	return *t.SampleRatio
}

// check rejects a ratio outside [0, 1], naming the field.
func (t *Tracing) check() error {
	if r := t.SampleRatio; r != nil && (math.IsNaN(*r) || *r < 0 || *r > 1) {
		return fmt.Errorf("tracing.sample_ratio: %v is not a fraction from 0 to 1", *r)
	}
	return nil
}

// parseTracing reads the app's `tracing` option: on its own, or with a
// block
//
//	tracing {
//		sample_ratio <0..1>
//	}
func parseTracing(dst **Tracing) chaincaddyfile.Option {
	return func(d *caddyfile.Dispenser) error {
		if d.CountRemainingArgs() > 0 {
			return d.ArgErr()
		}
		t := new(Tracing)
		*dst = t
		return chaincaddyfile.ParseBlock(d, "tracing", map[string]chaincaddyfile.Option{
			"sample_ratio": func(d *caddyfile.Dispenser) error {
				var v string
				if !d.AllArgs(&v) {
					return d.Errf("option 'sample_ratio' takes one value, a fraction from 0 to 1")
				}
				r, err := strconv.ParseFloat(v, 64)
				if err != nil || math.IsNaN(r) || r < 0 || r > 1 {
					return d.Errf("option 'sample_ratio': want a fraction from 0 to 1, got '%s'", v)
				}
				t.SampleRatio = &r
				return nil
			},
		})
	}
}

// tracingPool holds the process's tracer provider while an app with
// tracing is loaded: a reload provisions the new app (one more reference)
// before it cleans up the old one, so the provider, its exporter and the
// spans of live connections survive reloads, and the last app's Cleanup
// flushes and shuts it down.
var tracingPool = caddy.NewUsagePool()

// newSpanExporter makes the exporter from the OTEL_* environment; tests
// replace it.
var newSpanExporter = func(ctx context.Context) (sdktrace.SpanExporter, error) {
	return autoexport.NewSpanExporter(ctx)
}

// setOTelErrorHandler installs the process's OpenTelemetry error handler
// once.
var setOTelErrorHandler sync.Once

// pooledProvider is tracingPool's value.
type pooledProvider struct{ *sdktrace.TracerProvider }

// Destruct flushes the spans still buffered and shuts the provider down.
func (p pooledProvider) Destruct() error {
	ctx, cancel := context.WithTimeout(context.Background(), tracingShutdownTimeout)
	defer cancel()
	if err := p.ForceFlush(ctx); err != nil {
		caddy.Log().Named("layer4chain").Warn("flushing spans", zap.Error(err))
	}
	return p.Shutdown(ctx)
}

// acquireTracer returns the app's Tracer on the process's tracer provider,
// creating the provider when none is loaded. The caller gives it back with
// releaseTracer.
func acquireTracer(ctx context.Context, ratio float64) (layer4chain.Tracer, error) {
	v, _, err := tracingPool.LoadOrNew(tracingPoolKey, func() (caddy.Destructor, error) {
		exp, err := newSpanExporter(ctx)
		if err != nil {
			return nil, fmt.Errorf("tracing: creating the exporter from the OTEL_* environment: %w", err)
		}
		// service.name defaults to caddy; OTEL_SERVICE_NAME and
		// OTEL_RESOURCE_ATTRIBUTES override it.
		res, err := resource.New(ctx,
			resource.WithAttributes(attribute.String("service.name", "caddy")),
			resource.WithFromEnv(), resource.WithTelemetrySDK())
		if err != nil {
			_ = exp.Shutdown(ctx)
			return nil, fmt.Errorf("tracing: describing the process: %w", err)
		}
		// Export failures reach OpenTelemetry's global error handler, whose
		// default writes them to the standard logger (Caddy's default log,
		// at INFO, unnamed): route them to this module's logger as warnings.
		setOTelErrorHandler.Do(func() {
			otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
				logger().Warn("tracing: exporting spans", zap.Error(err))
			}))
		})
		logger().Info("tracing on: a span per connection, exported as the OTEL_* environment says",
			zap.String("OTEL_TRACES_EXPORTER", os.Getenv("OTEL_TRACES_EXPORTER")),
			zap.String("OTEL_EXPORTER_OTLP_ENDPOINT", os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT")),
			zap.String("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
			zap.Float64("sample_ratio", ratio))
		return pooledProvider{sdktrace.NewTracerProvider(
			sdktrace.WithBatcher(exp),
			sdktrace.WithResource(res),
			sdktrace.WithIDGenerator(chainIDs{}),
			sdktrace.WithSampler(sdktrace.ParentBased(rootSampler{})),
		)}, nil
	})
	if err != nil {
		return nil, err
	}
	return &connTracer{tracer: v.(pooledProvider).Tracer(tracerName), ratio: ratio}, nil
}

// releaseTracer gives back a reference taken by acquireTracer.
func releaseTracer() error {
	_, err := tracingPool.Delete(tracingPoolKey)
	return err
}

// connTracer makes the spans of one app's connections.
type connTracer struct {
	tracer trace.Tracer
	ratio  float64
}

// root is what a connection's span needs that the provider cannot know:
// its trace ID (from the chain ID) and the app's sample ratio, used when
// the span is a root.
type root struct {
	traceID trace.TraceID
	ratio   float64
}

type rootKey struct{}

// StartSpan starts the connection's span, a child of the previous hop's
// when one was received, with the chain ID as the trace ID.
func (t *connTracer) StartSpan(r *layer4chain.Record, parent layer4chain.TraceParent) (any, layer4chain.TraceParent) {
	info := r.Info()
	tid := chainTraceID(info.ChainID)
	ctx := context.WithValue(context.Background(), rootKey{}, root{tid, t.ratio})
	if parent.IsValid() {
		ctx = trace.ContextWithRemoteSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: tid, SpanID: parent.SpanID, TraceFlags: trace.TraceFlags(parent.Flags), Remote: true,
		}))
	}
	_, span := t.tracer.Start(ctx, spanName,
		trace.WithSpanKind(trace.SpanKindServer),
		trace.WithTimestamp(info.Started),
		trace.WithAttributes(
			attribute.String(attrChainID, info.ChainID),
			attribute.Int(attrHop, info.Hop),
			attribute.String(attrServer, info.Server),
			attribute.String(attrClient, info.Client),
			attribute.String(attrOriginalClient, info.OriginalClient),
		))
	sc := span.SpanContext()
	next := layer4chain.TraceParent{SpanID: sc.SpanID(), Flags: byte(sc.TraceFlags())}
	if !span.IsRecording() {
		// Not sampled: the next hop is told so, and nothing is kept.
		return nil, next
	}
	span.AddEvent(layer4chain.StateConnecting.String(), trace.WithTimestamp(info.Started))
	return span, next
}

// chainTraceID is the trace ID of a chain: the chain ID itself when it is
// 32 hex digits (as the first hop makes it), else the first 16 bytes of its
// SHA-256, so that every hop derives the same one from an ID another proxy
// made.
func chainTraceID(chainID string) trace.TraceID {
	var tid trace.TraceID
	if len(chainID) == 2*len(tid) {
		if _, err := hex.Decode(tid[:], []byte(chainID)); err == nil && tid.IsValid() {
			return tid
		}
	}
	sum := sha256.Sum256([]byte(chainID))
	copy(tid[:], sum[:])
	return tid
}

// chainIDs gives a root span the trace ID its connection's chain ID
// names, and every span a random span ID.
type chainIDs struct{}

// NewIDs implements sdktrace.IDGenerator.
func (chainIDs) NewIDs(ctx context.Context) (trace.TraceID, trace.SpanID) {
	tid, _ := ctx.Value(rootKey{}).(root)
	for !tid.traceID.IsValid() {
		binary.NativeEndian.PutUint64(tid.traceID[:8], rand.Uint64())
		binary.NativeEndian.PutUint64(tid.traceID[8:], rand.Uint64())
	}
	return tid.traceID, newSpanID()
}

// NewSpanID implements sdktrace.IDGenerator.
func (chainIDs) NewSpanID(context.Context, trace.TraceID) trace.SpanID { return newSpanID() }

func newSpanID() trace.SpanID {
	var sid trace.SpanID
	for !sid.IsValid() {
		binary.NativeEndian.PutUint64(sid[:], rand.Uint64())
	}
	return sid
}

// rootSampler decides for a chain's first traced hop: a chain is sampled
// when a hash of its trace ID falls under the app's ratio. The SDK's
// TraceIDRatioBased reads the trace ID's last 8 bytes as random, but a
// chain ID's are a counter; the hash mixes all 16.
type rootSampler struct{}

// ShouldSample implements sdktrace.Sampler.
func (rootSampler) ShouldSample(p sdktrace.SamplingParameters) sdktrace.SamplingResult {
	res := sdktrace.SamplingResult{Decision: sdktrace.Drop, Tracestate: trace.SpanContextFromContext(p.ParentContext).TraceState()}
	rt, _ := p.ParentContext.Value(rootKey{}).(root)
	hi, lo := binary.BigEndian.Uint64(p.TraceID[:8]), binary.BigEndian.Uint64(p.TraceID[8:])
	// The top 53 bits of the hash, as a fraction in [0, 1).
	if float64(mix64(hi^mix64(lo))>>11)/(1<<53) < rt.ratio {
		res.Decision = sdktrace.RecordAndSample
	}
	return res
}

// Description implements sdktrace.Sampler.
func (rootSampler) Description() string { return "layer4chain.sample_ratio" }

// mix64 is SplitMix64's finalizer: every input bit affects every output bit.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// spanStateChanged adds the state a traced connection entered as an event
// of its span; the connecting event was added when the span started, and
// closing ends it (endSpan).
func spanStateChanged(r *layer4chain.Record, to layer4chain.State) {
	span, ok := r.Span().(trace.Span)
	if !ok || (to != layer4chain.StateEstablished && to != layer4chain.StateHalfClosed) {
		return
	}
	span.AddEvent(to.String())
}

// endSpan ends a traced connection's span with what is known at its close.
func endSpan(r *layer4chain.Record) {
	span, ok := r.Span().(trace.Span)
	if !ok {
		return
	}
	info := r.Info()
	span.SetAttributes(
		attribute.String(attrUpstream, info.Upstream),
		attribute.String(attrCloseReason, string(info.Reason)),
		attribute.Int64(attrBytesUp, info.BytesUp),
		attribute.Int64(attrBytesDown, info.BytesDown),
	)
	if info.Detail != "" {
		span.SetAttributes(attribute.String(attrCloseDetail, info.Detail))
	}
	// A failure as the access log rates it (closeLevel) is an error span.
	if closeLevel(info.Reason) >= zapcore.WarnLevel {
		span.SetStatus(codes.Error, string(info.Reason))
	}
	span.End()
}
