package modules

import (
	"go.uber.org/zap/zapcore"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

// closeLevels is the level of the line that reports a connection's end
// (`connection closed`, and `connection refused` at admission), by its
// close reason. The rule:
//
//   - INFO: the connection ended as the client, the upstream, the operator
//     or a configured limit on its life meant it to (closes, a client's
//     reset, the timeouts, max_lifetime, admin, shutdown).
//   - WARN: a failure, the chain could not serve the connection, or keep
//     serving it, because of an upstream, a peer's PROXY header or a
//     connection limit: no upstream connected or none was available, the
//     upstream reset the connection or turned unhealthy, a header was
//     rejected, a limit refused the connection.
//   - ERROR: the chain's configuration is wrong, whatever the traffic: a
//     loop.
//
// Every reason of the engine's vocabulary has an entry (a test checks),
// so a new reason gets its level decided here.
var closeLevels = map[layer4chain.CloseReason]zapcore.Level{
	layer4chain.ReasonClientClosed:     zapcore.InfoLevel,
	layer4chain.ReasonUpstreamClosed:   zapcore.InfoLevel,
	layer4chain.ReasonClientReset:      zapcore.InfoLevel,
	layer4chain.ReasonIdleTimeout:      zapcore.InfoLevel,
	layer4chain.ReasonHalfCloseTimeout: zapcore.InfoLevel,
	layer4chain.ReasonMaxLifetime:      zapcore.InfoLevel,
	layer4chain.ReasonAdmin:            zapcore.InfoLevel,
	layer4chain.ReasonShutdown:         zapcore.InfoLevel,

	layer4chain.ReasonUpstreamReset:         zapcore.WarnLevel,
	layer4chain.ReasonUpstreamUnhealthy:     zapcore.WarnLevel,
	layer4chain.ReasonConnectTimeout:        zapcore.WarnLevel,
	layer4chain.ReasonConnectRefused:        zapcore.WarnLevel,
	layer4chain.ReasonConnectFailed:         zapcore.WarnLevel,
	layer4chain.ReasonNoHealthyUpstream:     zapcore.WarnLevel,
	layer4chain.ReasonProxyProtocolRejected: zapcore.WarnLevel,
	layer4chain.ReasonLimitExceeded:         zapcore.WarnLevel,

	layer4chain.ReasonLoopDetected: zapcore.ErrorLevel,
}

// closeLevel returns the level of the line reporting a connection that
// ended with reason (see closeLevels); WARN for a reason it does not know.
func closeLevel(reason layer4chain.CloseReason) zapcore.Level {
	if l, ok := closeLevels[reason]; ok {
		return l
	}
	return zapcore.WarnLevel
}
