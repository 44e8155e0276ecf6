// Package caddylayer4chain plugs caddy-layer4chain into Caddy: importing it
// (as xcaddy's --with does) registers the layer4 handler `chain`.
package caddylayer4chain

import (
	// The Caddy modules of the plugin.
	_ "github.com/layer4chain/caddy-layer4chain/modules"
)
