package modules

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The config fuzz targets run in CI for a fixed time each (.ci/run); their
// seed corpora are in testdata/fuzz/<target>/, and plain `go test` replays
// them. An operator's config is untrusted input too: whatever its bytes, a
// load must fail with an error, never crash Caddy.

// FuzzChainConfigJSON decodes arbitrary JSON into the chain handler the way
// Caddy does (strictly: an unknown field fails), runs the checks of
// Provision, and, when they pass and nothing would dial (no active health
// checks, which probe upstreams from Provision on), provisions and cleans
// up a whole config with caddy.Validate, as `caddy validate` does. No input
// may panic; an accepted handler has one normalized dial address per
// upstream, which normalizing again leaves alone; and a validation, failed
// or not, leaves no upstream in the pool.
func FuzzChainConfigJSON(f *testing.F) {
	for _, seed := range []string{
		`{"upstreams": [{"dial": ["127.0.0.1:9000"]}]}`,
		`{"upstreams": ["tcp4/127.0.0.1:9000", {"dial": ["[::1]:9001"], "weight": 3, "max_connections": -1}],
			"load_balancing": {"selection": {"policy": "weighted_round_robin"}, "tries": 4, "try_duration": "1s", "try_interval": "10ms"}}`,
		`{"upstreams": [{"dial": ["127.0.0.1:9000"]}], "proxy_protocol": "v2",
			"accept_proxy_protocol": {"allow": ["127.0.0.1/32", "::1"], "timeout": "2s"},
			"max_hops": 255, "max_connections": 10, "max_connections_per_client": -1,
			"connect_timeout": "1ms", "idle_timeout": -1, "half_close_timeout": "5m", "max_lifetime": "1h"}`,
		`{"upstreams": [{"dial": ["127.0.0.1:9000"]}], "health_checks": {"passive": {"fail_duration": "10s", "max_fails": 2, "unhealthy_connection_count": 5, "close_if_unhealthy": true}}}`,
		`{"upstreams": [{"dial": ["127.0.0.1:9000"]}], "health_checks": {"active": {"port": 9100, "interval": "1s", "timeout": "100ms", "fall": 2, "rise": 2}}}`,
		`{"upstreams": [{"dial": ["{env.UPSTREAM}:9000"]}]}`,
		`{"upstreams": [{"dial": ["{l4.tls.server_name}:443"]}]}`,
		`{"upstreams": [{"dial": ["udp/127.0.0.1:53"]}, null]}`,
		`{"upstreams": [{"dial": ["127.0.0.1:9000-9010"], "tls": {}}]}`,
		`{"upstreams": [{"dial": ["127.0.0.1:9000"]}], "accept_proxy_protocol": {"allow": ["0.0.0.0/0", "not-an-ip"]}}`,
		`{"upstreams": [{"dial": ["127.0.0.1:9000"]}], "load_balancing": {"selection": {"policy": "nope"}}, "max_hops": 256}`,
		`{"upstreams": [], "unknown": 1}`,
	} {
		f.Add([]byte(seed))
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		var h Handler
		if err := caddy.StrictUnmarshalJSON(data, &h); err != nil {
			return
		}
		if err := h.check(false); err != nil {
			return
		}
		if len(h.dials) != len(h.Upstreams) {
			t.Fatalf("%d upstreams, %d dial addresses", len(h.Upstreams), len(h.dials))
		}
		for _, d := range h.dials {
			again, err := dialAddr(d)
			if err != nil || again != d {
				t.Fatalf("the normalized address %q normalizes to %q, %v", d, again, err)
			}
		}
		if h.HealthChecks != nil && h.HealthChecks.Active != nil {
			return
		}

		// Decoded as Caddy decodes: the first JSON value, field names
		// matched without regard to case.
		var fields map[string]json.RawMessage
		if err := json.NewDecoder(bytes.NewReader(data)).Decode(&fields); err != nil {
			t.Fatalf("decoded strictly but not as an object: %v", err)
		}
		handler := map[string]any{}
		for name, value := range fields {
			handler[name] = value
		}
		before := len(pooledUpstreams())
		cfg := caddyConfig(map[string]any{"fuzz": server("127.0.0.1:0", handler)})
		var config caddy.Config
		if err := caddy.StrictUnmarshalJSON(cfg, &config); err != nil {
			t.Fatalf("the wrapping config does not decode: %v\n%s", err, cfg)
		}
		_ = caddy.Validate(&config)
		if after := len(pooledUpstreams()); after != before {
			t.Fatalf("validating left %d upstreams in the pool, %d before:\n%s", after, before, cfg)
		}
	})
}

// FuzzChainCaddyfile parses arbitrary text as the body of a chain
// directive (after `chain`: upstreams on the line, then a block), two ways:
// the handler's UnmarshalCaddyfile alone, whose JSON Caddy must decode back
// strictly into the same handler, and the whole Caddyfile adapter, inside
// a layer4 server's route, which must give an error or valid JSON. No input
// may panic.
func FuzzChainCaddyfile(f *testing.F) {
	f.Add("127.0.0.1:9000")
	f.Add("127.0.0.1:9000 {\n\tproxy_protocol v2\n\taccept_proxy_protocol {\n\t\tallow 127.0.0.1/32\n\t\ttimeout 3s\n\t}\n}")
	f.Add("{\n\tupstream 127.0.0.1:9000 127.0.0.1:9001\n\tupstream {\n\t\tdial tcp4/127.0.0.1:9002\n\t\tweight 3\n\t\tmax_connections off\n\t}\n\tlb_policy weighted_round_robin\n\tlb_tries 3\n\tlb_try_duration 1s\n\tlb_try_interval 50ms\n}")
	f.Add("127.0.0.1:9000 {\n\tfail_duration 10s\n\tmax_fails 2\n\tunhealthy_connection_count off\n\thealth_port 9100\n\thealth_interval 1s\n\thealth_timeout 100ms\n\thealth_fall 2\n\thealth_rise 2\n\tclose_if_unhealthy\n}")
	f.Add("127.0.0.1:9000 {\n\tconnect_timeout 1s\n\tidle_timeout off\n\thalf_close_timeout 5m\n\tmax_lifetime 1h\n\tmax_hops 8\n\tmax_connections 100\n\tmax_connections_per_client off\n}")
	f.Add("127.0.0.1:9000 {\n\tproxy_protocol v3\n\tproxy_protocol v1\n\ttls\n\tunknown\n}")
	f.Add("{\n\tupstream 127.0.0.1:9000 {\n\t\tdial 127.0.0.1:9001\n\t}\n}\n}\n}\n}\n}")
	f.Add("\"quoted {\" `backtick` {env.X} # comment\n{\n")

	f.Fuzz(func(t *testing.T, body string) {
		// Tokenized as the adapter does: NewTestDispenser exits the
		// process on input the lexer refuses (a bad heredoc marker); the
		// adapter, below, must refuse that cleanly.
		if tokens, err := caddyfile.Tokenize([]byte("chain "+body), "Caddyfile"); err == nil {
			checkCaddyfileRoundTrip(t, tokens)
		}

		text := "{\n\tlayer4 {\n\t\t127.0.0.1:0 {\n\t\t\troute {\n\t\t\t\tchain " + body + "\n\t\t\t}\n\t\t}\n\t}\n}\n"
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(text), map[string]any{"filename": "Caddyfile"})
		if err == nil && !json.Valid(out) {
			t.Fatalf("the adapter gave invalid JSON: %s", out)
		}
	})
}

// checkCaddyfileRoundTrip parses a chain directive's tokens; what parses
// must marshal to JSON that Caddy decodes strictly into the same handler.
func checkCaddyfileRoundTrip(t *testing.T, tokens []caddyfile.Token) {
	var h Handler
	if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
		return
	}
	out, err := json.Marshal(&h)
	if err != nil {
		t.Fatalf("marshalling what the Caddyfile gave: %v", err)
	}
	var back Handler
	if err := caddy.StrictUnmarshalJSON(out, &back); err != nil {
		t.Fatalf("Caddy cannot decode the JSON the Caddyfile gave: %v\n%s", err, out)
	}
	if again, _ := json.Marshal(&back); string(again) != string(out) {
		t.Fatalf("JSON changed on a round trip:\n%s\n%s", out, again)
	}
}
