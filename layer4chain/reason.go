package layer4chain

// CloseReason says why a connection ended. The same words are used in logs,
// metrics, stats and the admin API.
type CloseReason string

// The close-reason vocabulary.
const (
	ReasonNone                  CloseReason = ""
	ReasonClientClosed          CloseReason = "client_closed"
	ReasonUpstreamClosed        CloseReason = "upstream_closed"
	ReasonClientReset           CloseReason = "client_reset"
	ReasonUpstreamReset         CloseReason = "upstream_reset"
	ReasonIdleTimeout           CloseReason = "idle_timeout"
	ReasonHalfCloseTimeout      CloseReason = "half_close_timeout"
	ReasonMaxLifetime           CloseReason = "max_lifetime"
	ReasonConnectTimeout        CloseReason = "connect_timeout"
	ReasonConnectRefused        CloseReason = "connect_refused"
	ReasonConnectFailed         CloseReason = "connect_failed"
	ReasonProxyProtocolRejected CloseReason = "proxy_protocol_rejected"
	ReasonLoopDetected          CloseReason = "loop_detected"
	ReasonLimitExceeded         CloseReason = "limit_exceeded"
	ReasonAdmin                 CloseReason = "admin"
	ReasonShutdown              CloseReason = "shutdown"
	// ReasonNoHealthyUpstream: every upstream was unhealthy, open or full,
	// so none was dialed.
	ReasonNoHealthyUpstream CloseReason = "no_healthy_upstream"
	// ReasonUpstreamUnhealthy: the connection's upstream turned unhealthy
	// and close_if_unhealthy is set.
	ReasonUpstreamUnhealthy CloseReason = "upstream_unhealthy"
)

// CloseReasons lists every reason, in a stable order, so that stats and
// metrics can report zeros for reasons that have not happened yet.
var CloseReasons = []CloseReason{
	ReasonClientClosed, ReasonUpstreamClosed, ReasonClientReset, ReasonUpstreamReset,
	ReasonIdleTimeout, ReasonHalfCloseTimeout, ReasonMaxLifetime,
	ReasonConnectTimeout, ReasonConnectRefused, ReasonConnectFailed,
	ReasonProxyProtocolRejected, ReasonLoopDetected, ReasonLimitExceeded,
	ReasonAdmin, ReasonShutdown, ReasonNoHealthyUpstream, ReasonUpstreamUnhealthy,
}

// DialFailureReasons lists the reasons a dial attempt fails with, in a
// stable order: the dial failure counts report a zero for each.
var DialFailureReasons = []CloseReason{ReasonConnectTimeout, ReasonConnectRefused, ReasonConnectFailed}
