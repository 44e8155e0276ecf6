package layer4chain

import (
	"errors"

	"github.com/pires/go-proxyproto"
)

// TLVTrace is the custom PP2 TLV type (in the 0xE0–0xEF application range)
// carrying the sending hop's span, the parent of the next hop's: 8 bytes
// of span ID then 1 byte of W3C trace flags (bit 0: sampled), 9 bytes in
// all. The trace ID is the chain ID, which travels in PP2_TYPE_UNIQUE_ID.
// A hop sends it only when it traces, and a hop receiving none starts a
// new trace (its span is a root).
const TLVTrace = proxyproto.PP2_TYPE_MIN_CUSTOM + 1

// traceParentLen is the length of a TLVTrace value.
const traceParentLen = 9

// errBadTraceParent rejects a TLVTrace value that is not 9 bytes or whose
// span ID is all zeros, which W3C Trace Context makes invalid.
var errBadTraceParent = errors.New("trace TLV is not 8 bytes of non-zero span ID and 1 byte of trace flags")

// TraceParent is a hop's span as the next hop learns it from TLVTrace.
// The zero value means none.
type TraceParent struct {
	// SpanID is the sending hop's span ID.
	SpanID [8]byte
	// Flags are the W3C trace flags of the sending hop's span; bit 0 says
	// it is sampled, which the next hop's parent-based sampler follows.
	Flags byte
}

// IsValid reports whether p names a span (its span ID is not all zeros).
func (p TraceParent) IsValid() bool { return p.SpanID != [8]byte{} }

// appendValue appends p's TLVTrace value to dst.
func (p TraceParent) appendValue(dst []byte) []byte {
	return append(append(dst, p.SpanID[:]...), p.Flags)
}

// parseTraceParent decodes a TLVTrace value, exactly 9 bytes with a valid
// span ID.
func parseTraceParent(v []byte) (TraceParent, error) {
	var p TraceParent
	if len(v) != traceParentLen {
		return p, errBadTraceParent
	}
	copy(p.SpanID[:], v[:8])
	p.Flags = v[8]
	if !p.IsValid() {
		return TraceParent{}, errBadTraceParent
	}
	return p, nil
}

// Tracer makes a span of each connection a Proxy serves. The engine knows
// nothing of a tracing library: it calls StartSpan once per connection and
// keeps what it returns on the record, where the tracker's Observer finds
// it (Record.Span) to add events on StateChanged and end it on Closed.
// A nil Proxy.Tracer costs one comparison per connection.
type Tracer interface {
	// StartSpan is called on the connection's goroutine once its origin
	// is known (Record.Info has its chain ID, hop and original client),
	// before the upstream is dialed. parent is the previous hop's span
	// from TLVTrace, the zero value when none came (a root). It returns
	// the span handle for Record.Span (nil for none, such as a span not
	// sampled) and the parent to send upstream in a v2 header (the zero
	// value to send none).
	StartSpan(r *Record, parent TraceParent) (span any, next TraceParent)
}
