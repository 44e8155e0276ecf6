package modules

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

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
//		upstream [<address>] {
//			dial <address>
//			max_connections <n>|off
//			weight <n>
//			tls
//			tls_client_auth <cert_file> <key_file>
//			tls_insecure_skip_verify
//			tls_server_name <name>
//			tls_trust_pool file <pem_files...>
//			tls_renegotiation never|once|freely
//			tls_curves <curves...>
//		}
//		connect_timeout <duration>
//		idle_timeout <duration>|off
//		half_close_timeout <duration>|off
//		max_lifetime <duration>|off
//		proxy_protocol v1|v2
//		proxy_protocol_crc32c
//		forward_tlvs <types...>
//		accept_proxy_protocol {
//			allow <cidrs...>
//			allow_certificates <names...>
//			timeout <duration>
//			policy require|optional
//		}
//
//		# load balancing
//		lb_policy first|round_robin|weighted_round_robin|least_conn|random|ip_hash
//		lb_tries <n>
//		lb_try_duration <duration>|off
//		lb_try_interval <duration>
//
//		# passive health checks (the circuit breaker)
//		fail_duration <duration>|off
//		max_fails <n>
//		unhealthy_connection_count <n>|off
//
//		# active health checks: any health_* option switches them on
//		health_port <port>
//		health_interval <duration>
//		health_timeout <duration>
//		health_fall <n>
//		health_rise <n>
//
//		close_if_unhealthy
//
//		max_hops <n>
//		max_connections <n>|off
//		max_connections_per_client <n>|off
//	}
//
// Upstreams may be given on the directive's line, with `upstream` lines, or
// both, in that order. An `upstream` line without a block makes one
// upstream per address; with a block, it configures one upstream, whose
// address is on the line or in `dial`. `forward_tlvs` takes TLV types in
// hex ("0x20", "0xE5") or decimal. The option names are caddy-l4
// proxy's. `close_if_unhealthy` applies to every kind of health check that
// is on: active checks (health_checks.active.close_if_unhealthy) and the
// circuit breaker (health_checks.passive.close_if_unhealthy); alone, it
// switches active checks on, as caddy-l4's does. `off` adapts
// to -1, which switches the limit off. Unknown and duplicate options are
// errors with the line, and so are the options of caddy-l4's proxy that
// chain does not have: each error says what to use instead.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()        // the directive's name
	directive := *d // errors about the whole block point at its first line
	for _, addr := range d.RemainingArgs() {
		h.Upstreams = append(h.Upstreams, &Upstream{Dial: []string{addr}})
	}
	var (
		lb                        LoadBalancing
		policy                    string
		passive                   PassiveHealthChecks
		active                    ActiveHealthChecks
		activeOn, closeIfUnhealth bool
	)
	marking := func(opt chaincaddyfile.Option) chaincaddyfile.Option { return chaincaddyfile.Marking(&activeOn, opt) }
	options := map[string]chaincaddyfile.Option{
		"upstream":                   h.parseUpstream,
		"connect_timeout":            chaincaddyfile.NotOff(whyConnectTimeoutOn, chaincaddyfile.Duration(&h.ConnectTimeout)),
		"idle_timeout":               chaincaddyfile.DurationOrOff(&h.IdleTimeout),
		"half_close_timeout":         chaincaddyfile.DurationOrOff(&h.HalfCloseTimeout),
		"max_lifetime":               chaincaddyfile.DurationOrOff(&h.MaxLifetime),
		"proxy_protocol":             chaincaddyfile.OneOf(&h.ProxyProtocol, "v1", "v2"),
		"proxy_protocol_crc32c":      chaincaddyfile.Flag(&h.ProxyProtocolCRC32C),
		"forward_tlvs":               chaincaddyfile.Bytes(&h.ForwardTLVs),
		"lb_policy":                  chaincaddyfile.OneOf(&policy, layer4chain.Policies...),
		"lb_tries":                   chaincaddyfile.Int(&lb.Tries),
		"lb_try_duration":            chaincaddyfile.DurationOrOff(&lb.TryDuration),
		"lb_try_interval":            chaincaddyfile.NotOff(whyTryIntervalOn, chaincaddyfile.Duration(&lb.TryInterval)),
		"fail_duration":              chaincaddyfile.DurationOrOff(&passive.FailDuration),
		"max_fails":                  chaincaddyfile.NotOff(whyMaxFailsOn, chaincaddyfile.Int(&passive.MaxFails)),
		"unhealthy_connection_count": chaincaddyfile.IntOrOff(&passive.UnhealthyConnectionCount),
		"health_port":                marking(chaincaddyfile.Int(&active.Port)),
		"health_interval":            marking(chaincaddyfile.NotOff(whyActiveOn, chaincaddyfile.Duration(&active.Interval))),
		"health_timeout":             marking(chaincaddyfile.NotOff(whyHealthTimeoutOn, chaincaddyfile.Duration(&active.Timeout))),
		"health_fall":                marking(chaincaddyfile.Int(&active.Fall)),
		"health_rise":                marking(chaincaddyfile.Int(&active.Rise)),
		"close_if_unhealthy":         chaincaddyfile.Flag(&closeIfUnhealth),
		"max_hops":                   chaincaddyfile.NotOff(whyMaxHopsOn, chaincaddyfile.Int(&h.MaxHops)),
		"max_connections":            chaincaddyfile.IntOrOff(&h.MaxConnections),
		"max_connections_per_client": chaincaddyfile.IntOrOff(&h.MaxConnectionsPerClient),
		"accept_proxy_protocol": func(d *caddyfile.Dispenser) error {
			if d.CountRemainingArgs() > 0 {
				if args := d.RemainingArgs(); len(args) != 1 || args[0] != "off" {
					return d.Errf("option 'accept_proxy_protocol' takes a block, not arguments: put the trusted peers on its allow line, as in accept_proxy_protocol { allow %s }", strings.Join(args, " "))
				}
				return d.Errf("option 'accept_proxy_protocol' has no off: leave it out, and the hop reads no header")
			}
			app := new(AcceptProxyProtocol)
			h.AcceptProxyProtocol = app
			return chaincaddyfile.ParseBlock(d, "accept_proxy_protocol", map[string]chaincaddyfile.Option{
				"allow":              chaincaddyfile.Strings(&app.Allow),
				"timeout":            chaincaddyfile.NotOff(whyAcceptTimeoutOn, chaincaddyfile.Duration(&app.Timeout)),
				"policy":             chaincaddyfile.OneOf(&app.Policy, policyRequire, policyOptional),
				"allow_certificates": chaincaddyfile.Strings(&app.AllowCertificates),
			}, "allow", "allow_certificates")
		},
	}
	for name, instead := range proxyOptionsNotYet {
		options[name] = chaincaddyfile.Unsupported(instead)
	}
	// Where each option was given, and each upstream, so that an error
	// found once the whole block is read points at its line.
	at := map[string]caddyfile.Dispenser{}
	upstreamAt := make([]caddyfile.Dispenser, len(h.Upstreams))
	for i := range upstreamAt {
		upstreamAt[i] = directive
	}
	for name, opt := range options {
		options[name] = func(d *caddyfile.Dispenser) error {
			here := *d
			if _, ok := at[name]; !ok {
				at[name] = here
			}
			n := len(h.Upstreams)
			err := opt(d)
			for range len(h.Upstreams) - n {
				upstreamAt = append(upstreamAt, here)
			}
			return err
		}
	}
	if err := chaincaddyfile.ParseBlock(d, "chain", options, "upstream"); err != nil {
		return err
	}

	if closeIfUnhealth {
		// It applies to the checks that are on; alone, it switches active
		// checks on, as caddy-l4's does. Beyond caddy-l4, the circuit
		// breaker's transitions close too.
		breakerOn := passive.FailDuration > 0
		activeOn = activeOn || !breakerOn
		passive.CloseIfUnhealthy = breakerOn
		active.CloseIfUnhealthy = activeOn
	}
	if passive != (PassiveHealthChecks{}) || activeOn {
		h.HealthChecks = new(HealthChecks)
		if passive != (PassiveHealthChecks{}) {
			h.HealthChecks.Passive = &passive
		}
		if activeOn {
			h.HealthChecks.Active = &active
		}
	}
	if policy != "" {
		lb.Selection = &Selection{Policy: policy}
	}
	if lb != (LoadBalancing{}) {
		h.LoadBalancing = &lb
	}
	if len(h.Upstreams) == 0 {
		return directive.Err("chain needs at least one upstream")
	}
	if err := h.check(true); err != nil {
		where := directive
		if i, ok := upstreamIndex(err); ok && i < len(upstreamAt) {
			where = upstreamAt[i]
		} else if name, ok := caddyfileOptionOf(err); ok {
			if d, ok := at[name]; ok {
				where = d
			}
		}
		return where.WrapErr(err)
	}
	return nil
}

// upstreamIndex reads i from an error about "upstreams[i]".
func upstreamIndex(err error) (int, bool) {
	var i int
	_, scanErr := fmt.Sscanf(err.Error(), "upstreams[%d]", &i)
	return i, scanErr == nil
}

// caddyfileOptionOf names the Caddyfile option of the JSON field an error
// from check begins with ("load_balancing.tries: ..." is lb_tries).
func caddyfileOptionOf(err error) (string, bool) {
	field, _, _ := strings.Cut(err.Error(), ":")
	field, _, _ = strings.Cut(field, "[")
	if name, ok := jsonToCaddyfile[field]; ok {
		return name, true
	}
	if strings.HasPrefix(field, "accept_proxy_protocol") {
		return "accept_proxy_protocol", true
	}
	return field, true // most options are named as their field
}

// jsonToCaddyfile maps the fields whose Caddyfile option has another name.
var jsonToCaddyfile = map[string]string{
	"load_balancing.tries":                             "lb_tries",
	"load_balancing.try_duration":                      "lb_try_duration",
	"load_balancing.try_interval":                      "lb_try_interval",
	"load_balancing.selection.policy":                  "lb_policy",
	"health_checks.passive.fail_duration":              "fail_duration",
	"health_checks.passive.max_fails":                  "max_fails",
	"health_checks.passive.unhealthy_connection_count": "unhealthy_connection_count",
	"health_checks.passive.close_if_unhealthy":         "close_if_unhealthy",
	"health_checks.active.port":                        "health_port",
	"health_checks.active.interval":                    "health_interval",
	"health_checks.active.timeout":                     "health_timeout",
	"health_checks.active.fall":                        "health_fall",
	"health_checks.active.rise":                        "health_rise",
	"health_checks.active.close_if_unhealthy":          "close_if_unhealthy",
}

// parseUpstream parses an `upstream` line: without a block, one upstream
// per address; with a block, one upstream with caddy-l4's per-upstream
// options.
func (h *Handler) parseUpstream(d *caddyfile.Dispenser) error {
	errOneAddress := d.Errf("option 'upstream': a block configures one upstream; give it exactly one address, on the line or with dial")
	addrs := d.RemainingArgs()
	var u Upstream
	options := map[string]chaincaddyfile.Option{
		"dial":            chaincaddyfile.Strings(&addrs),
		"max_connections": chaincaddyfile.IntOrOff(&u.MaxConnections),
		"weight":          chaincaddyfile.Int(&u.Weight),
		// caddy-l4's, with nothing to do in chain: say what does the job.
		"tls_timeout":      chaincaddyfile.Unsupported(insteadOfTLSTimeout),
		"tls_except_ports": chaincaddyfile.Unsupported(insteadOfTLSExceptPorts),
	}
	for _, name := range []string{"tls", "tls_client_auth", "tls_insecure_skip_verify", "tls_server_name", "tls_trust_pool", "tls_renegotiation", "tls_curves"} {
		options[name] = parseUpstreamTLS(&u, name)
	}
	err := chaincaddyfile.ParseBlock(d, "upstream", options, "dial")
	if err != nil {
		return err
	}
	// A block, even an empty one, leaves the cursor on its closing brace;
	// without one, the cursor stays on the line's last token.
	block := d.Val() == "}"
	switch {
	case block && len(addrs) != 1:
		return errOneAddress
	case block:
		u.Dial = addrs
		h.Upstreams = append(h.Upstreams, &u)
	case len(addrs) == 0:
		return errOneAddress
	default:
		for _, a := range addrs {
			h.Upstreams = append(h.Upstreams, &Upstream{Dial: []string{a}})
		}
	}
	return nil
}

// What to use instead of the options of caddy-l4's proxy (and of Caddy's
// reverse_proxy, whose habits operators bring) that chain does not have.
var proxyOptionsNotYet = map[string]string{
	"health_uri": "chain's active health checks are TCP connects (with a PROXY v2 LOCAL header when proxy_protocol is set), not HTTP requests; use health_port, health_interval and health_timeout",
}

// parseGlobalOption reads the global option
//
//	layer4chain {
//		sweep_interval <duration>
//		shutdown_grace <duration>
//		max_connections <n>|off
//		tracing [{
//			sample_ratio <0..1>
//		}]
//	}
//
// into apps.layer4chain. `off` adapts to -1, which switches the limit off.
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	d.Next() // the option's name
	block := *d
	if d.CountRemainingArgs() > 0 {
		return nil, d.ArgErr()
	}
	app := new(App)
	err := chaincaddyfile.ParseBlock(d, "layer4chain", map[string]chaincaddyfile.Option{
		"sweep_interval":  chaincaddyfile.NotOff(whySweepIntervalOn, chaincaddyfile.Duration(&app.SweepInterval)),
		"shutdown_grace":  chaincaddyfile.NotOff(whyShutdownGraceOn, chaincaddyfile.Duration(&app.ShutdownGrace)),
		"max_connections": chaincaddyfile.IntOrOff(&app.MaxConnections),
		"tracing":         parseTracing(&app.Tracing),
	})
	if err != nil {
		return nil, err
	}
	if err := app.check(); err != nil {
		return nil, block.WrapErr(err)
	}
	value := caddyconfig.JSON(app, nil)
	prev, ok := existing.(httpcaddyfile.App)
	if !ok {
		return httpcaddyfile.App{Name: "layer4chain", Value: value}, nil
	}
	// Blocks merge, but an option set in two of them is a mistake, as
	// within one block: the later one would win without a word.
	var before, now map[string]json.RawMessage
	if err := json.Unmarshal(prev.Value, &before); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(value, &now); err != nil {
		return nil, err
	}
	for _, name := range slices.Sorted(maps.Keys(now)) {
		if _, twice := before[name]; twice {
			return nil, block.Errf("duplicate layer4chain option '%s': an earlier layer4chain block sets it", name)
		}
		before[name] = now[name]
	}
	return httpcaddyfile.App{Name: "layer4chain", Value: caddyconfig.JSON(before, nil)}, nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
