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
//		upstream <addresses...>
//		connect_timeout <duration>
//		idle_timeout <duration>|off
//		half_close_timeout <duration>|off
//		max_lifetime <duration>|off
//		proxy_protocol v1|v2
//		accept_proxy_protocol {
//			allow <cidrs...>
//			timeout <duration>
//		}
//		lb_policy first|round_robin|least_conn|random|ip_hash
//		lb_tries <n>
//		max_hops <n>
//		max_connections <n>|off
//		max_connections_per_client <n>|off
//	}
//
// Upstreams may be given on the directive's line, with `upstream` lines, or
// both, in that order. `off` adapts to -1, which switches the limit off.
// Unknown and duplicate options are errors, and so are an `upstream` block
// and the options of caddy-l4's proxy that chain does not have yet: each
// error says what to use instead.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	for _, addr := range d.RemainingArgs() {
		h.Upstreams = append(h.Upstreams, &Upstream{Dial: []string{addr}})
	}
	var policy string
	var tries int
	options := map[string]chaincaddyfile.Option{
		"upstream": func(d *caddyfile.Dispenser) error {
			if err := chaincaddyfile.NoBlock(d, "per-upstream options are not supported yet; give one address per 'upstream' line, or the addresses on the chain line"); err != nil {
				return err
			}
			var addrs []string
			if err := chaincaddyfile.Strings(&addrs)(d); err != nil {
				return err
			}
			for _, a := range addrs {
				h.Upstreams = append(h.Upstreams, &Upstream{Dial: []string{a}})
			}
			return nil
		},
		"connect_timeout":            chaincaddyfile.NotOff(whyConnectTimeoutOn, chaincaddyfile.Duration(&h.ConnectTimeout)),
		"idle_timeout":               chaincaddyfile.DurationOrOff(&h.IdleTimeout),
		"half_close_timeout":         chaincaddyfile.DurationOrOff(&h.HalfCloseTimeout),
		"max_lifetime":               chaincaddyfile.DurationOrOff(&h.MaxLifetime),
		"proxy_protocol":             chaincaddyfile.OneOf(&h.ProxyProtocol, "v1", "v2"),
		"lb_policy":                  chaincaddyfile.OneOf(&policy, layer4chain.Policies...),
		"lb_tries":                   chaincaddyfile.Int(&tries),
		"max_hops":                   chaincaddyfile.NotOff(whyMaxHopsOn, chaincaddyfile.Int(&h.MaxHops)),
		"max_connections":            chaincaddyfile.IntOrOff(&h.MaxConnections),
		"max_connections_per_client": chaincaddyfile.IntOrOff(&h.MaxConnectionsPerClient),
		"accept_proxy_protocol": func(d *caddyfile.Dispenser) error {
			if d.CountRemainingArgs() > 0 {
				return d.ArgErr()
			}
			app := new(AcceptProxyProtocol)
			h.AcceptProxyProtocol = app
			return chaincaddyfile.ParseBlock(d, "accept_proxy_protocol", map[string]chaincaddyfile.Option{
				"allow":   chaincaddyfile.Strings(&app.Allow),
				"timeout": chaincaddyfile.NotOff(whyAcceptTimeoutOn, chaincaddyfile.Duration(&app.Timeout)),
			}, "allow")
		},
	}
	for name, instead := range proxyOptionsNotYet {
		options[name] = chaincaddyfile.Unsupported(instead)
	}
	if err := chaincaddyfile.ParseBlock(d, "chain", options, "upstream"); err != nil {
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

// What to use instead of the options of caddy-l4's proxy that chain does
// not have yet, so an operator coming from it is told rather than guessing.
const (
	insteadOfHealthChecks = "upstream health checks are not supported yet; failover on each connection is governed by connect_timeout and lb_tries"
	insteadOfPassiveCheck = "passive health checks are not supported yet; failover on each connection is governed by connect_timeout and lb_tries"
)

var proxyOptionsNotYet = map[string]string{
	"lb_try_duration":            "not supported yet; use lb_tries and connect_timeout to bound failover",
	"lb_try_interval":            "not supported yet; chain fails over to the next upstream at once, lb_tries bounds the attempts",
	"health_interval":            insteadOfHealthChecks,
	"health_port":                insteadOfHealthChecks,
	"health_timeout":             insteadOfHealthChecks,
	"health_fall":                insteadOfHealthChecks,
	"health_rise":                insteadOfHealthChecks,
	"health_uri":                 insteadOfHealthChecks,
	"close_if_unhealthy":         insteadOfHealthChecks,
	"fail_duration":              insteadOfPassiveCheck,
	"max_fails":                  insteadOfPassiveCheck,
	"unhealthy_connection_count": insteadOfPassiveCheck,
}

// parseGlobalOption reads the global option
//
//	layer4chain {
//		sweep_interval <duration>
//		shutdown_grace <duration>
//		max_connections <n>|off
//	}
//
// into apps.layer4chain. `off` adapts to -1, which switches the limit off.
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
		"sweep_interval":  chaincaddyfile.NotOff(whySweepIntervalOn, chaincaddyfile.Duration(&app.SweepInterval)),
		"shutdown_grace":  chaincaddyfile.NotOff(whyShutdownGraceOn, chaincaddyfile.Duration(&app.ShutdownGrace)),
		"max_connections": chaincaddyfile.IntOrOff(&app.MaxConnections),
	})
	if err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "layer4chain", Value: caddyconfig.JSON(app, nil)}, nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
