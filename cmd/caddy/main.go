// Command caddy is Caddy with its standard modules, the layer4 app
// (caddy-l4) and caddy-layer4chain.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/layer4chain/caddy-layer4chain/modules"
)

func main() {
	caddycmd.Main()
}
