// Package layer4chain is the engine of caddy-layer4chain: everything a hop in
// a chain of TCP proxies does to one connection, in plain Go with no Caddy
// imports.
//
// The pieces, by file:
//   - tracker.go, record.go: one Record per proxied connection from admission
//     to removal, with an explicit State, limits and a snapshot for operators.
//   - dial.go, balance.go: upstream selection, a connect timeout per attempt,
//     failover and the classification of every dial failure.
//   - upstream.go, healthcheck.go: each upstream's health: the circuit
//     breaker with its half-open trial, and active checks.
//   - fdlimit.go, listeners_linux.go: the connection limit the file limit
//     allows, and stopping listeners when a drain starts.
//   - proxyproto.go: PROXY protocol v1/v2 emit (with the chain TLVs) and a
//     trusted-source parse, built on github.com/pires/go-proxyproto.
//   - pipe.go: the two directions of a connection, each ending on its own
//     (half-close), with idle, half-close and lifetime limits and byte counts.
//
// The Caddy modules in ../modules translate config and lifecycle into calls
// on this package.
package layer4chain
