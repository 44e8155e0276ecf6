package modules

import (
	"encoding/json"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	chaincaddyfile "github.com/layer4chain/caddy-layer4chain/caddyfile"
	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("layer4chain", parseGlobalOption)
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	chain [<upstreams...>] {
//		upstream <address>
//		connect_timeout <duration>
//		idle_timeout <duration>
//		half_close_timeout <duration>
//		max_lifetime <duration>
//		proxy_protocol v1|v2
//		accept_proxy_protocol {
//			allow <cidrs...>
//			timeout <duration>
//		}
//		lb_policy first|round_robin|least_conn|random|ip_hash
//		lb_tries <n>
//		max_hops <n>
//		max_connections <n>
//		max_connections_per_client <n>
//	}
//
// Upstreams may be given on the directive's line, with `upstream` lines, or
// both, in that order. Unknown and duplicate options are errors.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	for _, addr := range d.RemainingArgs() {
		h.Upstreams = append(h.Upstreams, &Upstream{Dial: []string{addr}})
	}
	var policy string
	var tries int
	err := chaincaddyfile.ParseBlock(d, "chain", map[string]chaincaddyfile.Option{
		"upstream": func(d *caddyfile.Dispenser) error {
			var addrs []string
			if err := chaincaddyfile.Strings(&addrs)(d); err != nil {
				return err
			}
			for _, a := range addrs {
				h.Upstreams = append(h.Upstreams, &Upstream{Dial: []string{a}})
			}
			return nil
		},
		"connect_timeout":            chaincaddyfile.Duration(&h.ConnectTimeout),
		"idle_timeout":               chaincaddyfile.Duration(&h.IdleTimeout),
		"half_close_timeout":         chaincaddyfile.Duration(&h.HalfCloseTimeout),
		"max_lifetime":               chaincaddyfile.Duration(&h.MaxLifetime),
		"proxy_protocol":             chaincaddyfile.OneOf(&h.ProxyProtocol, "v1", "v2"),
		"lb_policy":                  chaincaddyfile.OneOf(&policy, layer4chain.Policies...),
		"lb_tries":                   chaincaddyfile.Int(&tries),
		"max_hops":                   chaincaddyfile.Int(&h.MaxHops),
		"max_connections":            chaincaddyfile.Int(&h.MaxConnections),
		"max_connections_per_client": chaincaddyfile.Int(&h.MaxConnectionsPerClient),
		"accept_proxy_protocol": func(d *caddyfile.Dispenser) error {
			if d.CountRemainingArgs() > 0 {
				return d.ArgErr()
			}
			app := new(AcceptProxyProtocol)
			h.AcceptProxyProtocol = app
			return chaincaddyfile.ParseBlock(d, "accept_proxy_protocol", map[string]chaincaddyfile.Option{
				"allow":   chaincaddyfile.Strings(&app.Allow),
				"timeout": chaincaddyfile.Duration(&app.Timeout),
			}, "allow")
		},
	}, "upstream")
	if err != nil {
		return err
	}
	if policy != "" || tries != 0 {
		h.LoadBalancing = &LoadBalancing{Tries: tries}
		if policy != "" {
			h.LoadBalancing.Selection = &Selection{Policy: policy}
		}
	}
	if len(h.Upstreams) == 0 {
		return d.Err("chain needs at least one upstream")
	}
	return nil
}

// parseGlobalOption reads the global option
//
//	layer4chain {
//		sweep_interval <duration>
//		shutdown_grace <duration>
//		max_connections <n>
//	}
//
// into apps.layer4chain.
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	app := new(App)
	if prev, ok := existing.(httpcaddyfile.App); ok {
		if err := json.Unmarshal(prev.Value, app); err != nil {
			return nil, err
		}
	}
	d.Next() // the option's name
	if d.CountRemainingArgs() > 0 {
		return nil, d.ArgErr()
	}
	err := chaincaddyfile.ParseBlock(d, "layer4chain", map[string]chaincaddyfile.Option{
		"sweep_interval":  chaincaddyfile.Duration(&app.SweepInterval),
		"shutdown_grace":  chaincaddyfile.Duration(&app.ShutdownGrace),
		"max_connections": chaincaddyfile.Int(&app.MaxConnections),
	})
	if err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "layer4chain", Value: caddyconfig.JSON(app, nil)}, nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
