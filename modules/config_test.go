package modules

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/logging"
)

func TestBadConfigFailsNamingTheField(t *testing.T) {
	ok := []any{map[string]any{"dial": []string{"127.0.0.1:9"}}}
	allow := []string{"127.0.0.1/32"}
	for _, tc := range []struct {
		name    string
		handler map[string]any
		want    string
	}{
		{"no upstreams", map[string]any{}, "upstreams"},
		{"two dial addresses", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:1", "127.0.0.1:2"}}}}, "upstreams[0].dial"},
		{"bad dial address", map[string]any{"upstreams": []any{"127.0.0.1"}}, "upstreams[0].dial"},
		{"unparsable CIDR", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.1/99"}}}, "accept_proxy_protocol.allow"},
		{"certificate pattern", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow_certificates": []string{"*.chain.test"}}},
			`accept_proxy_protocol.allow_certificates[0]: "*.chain.test" is not a certificate name`},
		{"typo in a server name placeholder", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "tls": map[string]any{"server_name": "{evn.HOST}"}}}},
			"upstreams[0].tls.server_name: {evn.HOST} is no placeholder a connection fills"},
		{"stray brace in a server name", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "tls": map[string]any{"server_name": "{l4.tls.server_name"}}}},
			`upstreams[0].tls.server_name: "{l4.tls.server_name" has a brace that opens or closes no placeholder`},
		{"certificate DN", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow_certificates": []string{"CN=outer.chain.test"}}},
			`accept_proxy_protocol.allow_certificates[0]: "CN=outer.chain.test" is a distinguished name`},
		{"certificate name with a dot at the end", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow_certificates": []string{"outer.chain.test."}}},
			`accept_proxy_protocol.allow_certificates[0]: "outer.chain.test." ends with a dot`},
		{"IPv6 address on tcp4", map[string]any{"upstreams": []any{"tcp4/[::1]:9"}}, `upstreams[0].dial: upstream address "tcp4/[::1]:9": ::1 is not an address of tcp4`},
		{"IPv4 address on tcp6", map[string]any{"upstreams": []any{"tcp6/127.0.0.1:9"}}, `127.0.0.1 is not an address of tcp6`},
		{"empty certificate name", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow_certificates": []string{"outer.chain.test", ""}}},
			`accept_proxy_protocol.allow_certificates[1]: "" is not a certificate name`},
		{"negative accept timeout", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow": allow, "timeout": "-1s"}},
			"accept_proxy_protocol.timeout: cannot be switched off (got -1s): a peer that never finishes its header would hold the connection forever"},
		{"connect_timeout off", map[string]any{"upstreams": ok, "connect_timeout": -1},
			"connect_timeout: cannot be switched off (got -1ns): an unreachable upstream would hold each client for the kernel's minutes of SYN retries"},
		{"negative connect_timeout", map[string]any{"upstreams": ok, "connect_timeout": "-1s"}, "connect_timeout: cannot be switched off"},
		{"unknown proxy_protocol", map[string]any{"upstreams": ok, "proxy_protocol": "v3"}, "proxy_protocol"},
		{"unknown policy", map[string]any{"upstreams": ok, "load_balancing": map[string]any{"selection": map[string]any{"policy": "fastest"}}}, "load_balancing.selection.policy"},
		{"negative tries", map[string]any{"upstreams": ok, "load_balancing": map[string]any{"tries": -1}}, "load_balancing.tries"},
		{"unknown field", map[string]any{"upstreams": ok, "idle_timout": "1s"}, "idle_timout"},

		// A bare JSON number is nanoseconds to caddy.Duration.
		{"connect_timeout in ns", map[string]any{"upstreams": ok, "connect_timeout": 5}, `connect_timeout: 5ns; did you mean "5s"?`},
		{"idle_timeout in ns", map[string]any{"upstreams": ok, "idle_timeout": 300}, `idle_timeout: 300ns; did you mean "300s"?`},
		{"half_close_timeout in ns", map[string]any{"upstreams": ok, "half_close_timeout": 30}, `half_close_timeout: 30ns; did you mean "30s"?`},
		{"max_lifetime in ns", map[string]any{"upstreams": ok, "max_lifetime": 3600}, `max_lifetime: 3.6µs; did you mean "3600s"?`},
		{"accept timeout in ns", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow": allow, "timeout": 3}},
			`accept_proxy_protocol.timeout: 3ns; did you mean "3s"?`},
		{"connect_timeout in ms as ns", map[string]any{"upstreams": ok, "connect_timeout": 5000},
			`connect_timeout: 5µs is below the 1ms minimum (written as the JSON number 5000? that counts nanoseconds: did you mean "5000ms"?)`},
		{"sub-millisecond string", map[string]any{"upstreams": ok, "connect_timeout": "500us"}, `connect_timeout: 500µs is below the 1ms minimum`},
		{"over a century", map[string]any{"upstreams": ok, "max_lifetime": "2562047h"}, `max_lifetime: 2562047h0m0s is longer than 100 years; for no limit set -1`},
		{"connect_timeout over a century", map[string]any{"upstreams": ok, "connect_timeout": "1000000h"}, `connect_timeout: 1000000h0m0s is longer than 100 years; set a shorter duration`},
		{"tries beyond the cap", map[string]any{"upstreams": ok, "load_balancing": map[string]any{"tries": 100000000000}}, `load_balancing.tries: at most 100`},

		{"max_hops off", map[string]any{"upstreams": ok, "max_hops": -1},
			"max_hops: cannot be switched off (got -1): a loop between hops would multiply connections without end"},
		{"max_hops beyond the TLV", map[string]any{"upstreams": ok, "max_hops": 256}, "max_hops: at most 255, got 256"},

		{"unknown upstream field", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "foo": 1}}},
			`upstreams[0]: unknown field "foo"`},
		{"unknown field in the second upstream", map[string]any{"upstreams": []any{"127.0.0.1:9", map[string]any{"dial": []string{"127.0.0.1:8"}, "dail": 1}}},
			`upstreams[1]: unknown field "dail"`},
		{"negative upstream weight", map[string]any{"upstreams": []any{"127.0.0.1:8", map[string]any{"dial": []string{"127.0.0.1:9"}, "weight": -1}}},
			"upstreams[1].weight: want at least 1, or 0 for the default 1, got -1"},
		{"upstream weight not a number", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "weight": "3"}}},
			"upstreams[0]: weight: want a whole number, got a JSON string"},
		{"upstream tls handshake_timeout", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "tls": map[string]any{"handshake_timeout": "1s"}}}},
			"upstreams[0].tls.handshake_timeout: connect_timeout bounds the TCP connect and the TLS handshake together"},
		{"upstream tls except_ports", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "tls": map[string]any{"except_ports": []string{"80"}}}}},
			"upstreams[0].tls.except_ports: each chain upstream has one address"},
		{"upstream tls client certificate without key", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "tls": map[string]any{"client_certificate_file": "c.pem"}}}},
			"upstreams[0].tls: client_certificate_file specified without client_certificate_key_file"},
		{"one address with and without tls", map[string]any{"upstreams": []any{"127.0.0.1:9", map[string]any{"dial": []string{"127.0.0.1:9"}, "tls": map[string]any{}}}},
			"upstreams[1].tls: 127.0.0.1:9 is listed before without tls"},

		{"fail_duration in ns", map[string]any{"upstreams": ok, "health_checks": map[string]any{"passive": map[string]any{"fail_duration": 30}}},
			`health_checks.passive.fail_duration: 30ns; did you mean "30s"?`},
		{"max_fails off", map[string]any{"upstreams": ok, "health_checks": map[string]any{"passive": map[string]any{"fail_duration": "10s", "max_fails": -1}}},
			"health_checks.passive.max_fails: cannot be switched off (got -1): fail_duration switches passive health checks off"},
		{"passive close_if_unhealthy without a breaker", map[string]any{"upstreams": ok, "health_checks": map[string]any{"passive": map[string]any{"close_if_unhealthy": true, "unhealthy_connection_count": 5}}},
			"health_checks.passive.close_if_unhealthy: the circuit breaker is off (fail_duration is absent, 0 or negative), so no circuit opens to close connections on; set fail_duration"},
		{"max_fails without a breaker", map[string]any{"upstreams": ok, "health_checks": map[string]any{"passive": map[string]any{"max_fails": 3}}},
			"health_checks.passive.max_fails: the circuit breaker is off (fail_duration is absent, 0 or negative), so no failure is counted; set fail_duration"},
		{"max_fails with the breaker off", map[string]any{"upstreams": ok, "health_checks": map[string]any{"passive": map[string]any{"fail_duration": -1, "max_fails": 3}}},
			"health_checks.passive.max_fails: the circuit breaker is off"},
		{"unknown passive field", map[string]any{"upstreams": ok, "health_checks": map[string]any{"passive": map[string]any{"fail_durration": "10s"}}}, "fail_durration"},
		{"health port too high", map[string]any{"upstreams": ok, "health_checks": map[string]any{"active": map[string]any{"port": 70000}}},
			"health_checks.active.port: want a port from 1 to 65535, or 0 for the upstream's own, got 70000"},
		{"negative health port", map[string]any{"upstreams": ok, "health_checks": map[string]any{"active": map[string]any{"port": -1}}},
			"health_checks.active.port: want a port from 1 to 65535"},
		{"health interval off", map[string]any{"upstreams": ok, "health_checks": map[string]any{"active": map[string]any{"interval": "-1s"}}},
			"health_checks.active.interval: cannot be switched off (got -1s): active health checks are switched off by leaving health_checks.active out"},
		{"health timeout in ns", map[string]any{"upstreams": ok, "health_checks": map[string]any{"active": map[string]any{"timeout": 5}}},
			`health_checks.active.timeout: 5ns; did you mean "5s"?`},
		{"health timeout off", map[string]any{"upstreams": ok, "health_checks": map[string]any{"active": map[string]any{"timeout": -1}}},
			"health_checks.active.timeout: cannot be switched off (got -1ns): a probe of a black-holed upstream would never end"},
		{"negative fall", map[string]any{"upstreams": ok, "health_checks": map[string]any{"active": map[string]any{"fall": -1}}},
			"health_checks.active.fall: want at least 1, or 0 for the default 1, got -1"},
		{"negative rise", map[string]any{"upstreams": ok, "health_checks": map[string]any{"active": map[string]any{"rise": -2}}},
			"health_checks.active.rise: want at least 1, or 0 for the default 1, got -2"},
		{"try_duration in ns", map[string]any{"upstreams": ok, "load_balancing": map[string]any{"try_duration": 5}},
			`load_balancing.try_duration: 5ns; did you mean "5s"?`},
		{"try_interval off", map[string]any{"upstreams": ok, "load_balancing": map[string]any{"try_interval": "-1s"}},
			"load_balancing.try_interval: cannot be switched off (got -1s): without a wait, retrying while every upstream is down would spin on the CPU; try_duration switches retrying off"},

		{"accept without allow", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"timeout": "1s"}},
			"accept_proxy_protocol.allow: empty, so no peer is trusted and every PROXY header would be rejected; list the previous hops' IPs or CIDRs"},
		{"accept with an empty allow", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow": []string{}}},
			"accept_proxy_protocol.allow: empty"},

		{"udp upstream", map[string]any{"upstreams": []any{"udp/127.0.0.1:53"}},
			`upstreams[0].dial: "udp/127.0.0.1:53" is a udp address; chain proxies TCP: use host:port, tcp4/host:port or tcp6/host:port`},
		{"unix socket upstream", map[string]any{"upstreams": []any{"unix//run/backend.sock"}},
			`upstreams[0].dial: "unix//run/backend.sock" is a unix address; chain proxies TCP`},
		{"port range", map[string]any{"upstreams": []any{"127.0.0.1:9000-9001"}},
			`upstreams[0].dial: "127.0.0.1:9000-9001" is a port range; give one port per upstream`},
		{"network without port", map[string]any{"upstreams": []any{"tcp4/127.0.0.1"}}, "upstreams[0].dial: upstream address \"127.0.0.1\" is not host:port"},

		// A value that fails in its own decoder is named by its path.
		{"duration with a space", map[string]any{"upstreams": ok, "connect_timeout": "5 s"}, `connect_timeout: time: unknown unit " s" in duration "5 s"`},
		{"nested bad duration", map[string]any{"upstreams": ok, "health_checks": map[string]any{"passive": map[string]any{"fail_duration": "abc"}}},
			`health_checks.passive.fail_duration: time: invalid duration "abc"`},
		{"bad duration in accept", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow": allow, "timeout": "3 sec"}},
			`accept_proxy_protocol.timeout: time: unknown unit`},
		{"number as a string", map[string]any{"upstreams": ok, "max_hops": "8"}, "max_hops: want a whole number, got a JSON string"},
		{"upstreams as one string", map[string]any{"upstreams": "127.0.0.1:9"}, "upstreams: want a list, got a JSON string"},
		{"duration of the wrong type", map[string]any{"upstreams": ok, "connect_timeout": true}, `connect_timeout: want a duration such as "5s", got a JSON bool`},
		{"number out of range", map[string]any{"upstreams": ok, "max_hops": 1e30}, "max_hops: want a whole number that fits, got number 1e+30"},
		{"IPv6 without brackets", map[string]any{"upstreams": []any{"::1:9"}}, `upstreams[0].dial: upstream address "::1:9" is not host:port: an IPv6 host goes in brackets, with the port after them: [::1]:9 or [::1:9]:PORT`},
		{"IPv6 without brackets or port", map[string]any{"upstreams": []any{"2001:db8::1"}}, `upstreams[0].dial: upstream address "2001:db8::1" is not host:port: an IPv6 host goes in brackets, with the port after them: [2001:db8::1]:PORT`},
		{"bad value in a list", map[string]any{"upstreams": ok, "forward_tlvs": []any{32, "x"}}, "forward_tlvs[1]: want a whole number, got a JSON string"},
		{"unknown upstream tls field", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "tls": map[string]any{"server_nme": "x"}}}},
			`upstreams[0]: tls: json: unknown field "server_nme"`},
		{"unknown nested field", map[string]any{"upstreams": ok, "load_balancing": map[string]any{"selection": map[string]any{"policy": "random", "choose": 2}}},
			`load_balancing.selection: json: unknown field "choose"`},
		{"unknown field in active checks", map[string]any{"upstreams": ok, "health_checks": map[string]any{"active": map[string]any{"uri": "/health"}}},
			`health_checks.active: json: unknown field "uri"`},
		{"bad duration in upstream tls", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "tls": map[string]any{"handshake_timeout": "1 s"}}}},
			`upstreams[0]: tls: handshake_timeout: time: unknown unit`},
	} {
		t.Run(tc.name, func(t *testing.T) { assertLoadError(t, tc.handler, tc.want) })
	}
}

// TestEveryLimitThatCanBeOffLoadsOff loads a handler with every limit that
// can be switched off set to -1 (JSON) and its durations also as "-1s".
func TestEveryLimitThatCanBeOffLoadsOff(t *testing.T) {
	for _, off := range []any{-1, "-1s"} {
		startCaddy(t, map[string]any{"s": server("127.0.0.1:0", map[string]any{
			"upstreams":                  []any{map[string]any{"dial": []string{"127.0.0.1:9"}, "max_connections": -1}},
			"idle_timeout":               off,
			"half_close_timeout":         off,
			"max_lifetime":               off,
			"max_connections":            -1,
			"max_connections_per_client": -1,
			"load_balancing":             map[string]any{"try_duration": off},
			"health_checks": map[string]any{"passive": map[string]any{
				"fail_duration": off, "unhealthy_connection_count": -1,
			}},
		})})
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOffResolvesToTheEnginesDisabledValue pins the one place where the
// modules' convention (0 default, negative off) meets the engine's (0
// disabled): an idle_timeout of -1 must not become the 1h default.
func TestOffResolvesToTheEnginesDisabledValue(t *testing.T) {
	for _, tc := range []struct {
		in   caddy.Duration
		want time.Duration
	}{
		{0, time.Hour},
		{-1, 0},
		{caddy.Duration(-time.Second), 0},
		{caddy.Duration(2 * time.Minute), 2 * time.Minute},
	} {
		if got := resolveDuration(tc.in, time.Hour); got != tc.want {
			t.Errorf("resolveDuration(%v, 1h) = %v, want %v", time.Duration(tc.in), got, tc.want)
		}
	}
	for _, tc := range []struct{ in, def, want int }{
		{0, 0, 0}, {-1, 0, 0}, {0, 4096, 4096}, {-1, 4096, 0}, {10, 4096, 10},
	} {
		if got := resolveLimit(tc.in, tc.def); got != tc.want {
			t.Errorf("resolveLimit(%d, %d) = %d, want %d", tc.in, tc.def, got, tc.want)
		}
	}
}

// TestCheckDurationAcceptsOneMillisecond: the smallest sensible value is
// not taken for a unit mistake.
func TestCheckDurationAcceptsOneMillisecond(t *testing.T) {
	if err := checkDuration("idle_timeout", caddy.Duration(time.Millisecond), ""); err != nil {
		t.Fatalf("1ms: %v", err)
	}
	if err := checkDuration("idle_timeout", -1, ""); err != nil {
		t.Fatalf("-1 on a limit that can be off: %v", err)
	}
}

// TestCaddyNetworkAddressFormsLoad shows which address forms dial what: the
// "tcp/" form shares one upstream (and its connection count) with the plain
// form, while tcp4/ and tcp6/ keep their family for the engine's dial.
func TestCaddyNetworkAddressFormsLoad(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:9":        "127.0.0.1:9",
		"tcp/127.0.0.1:9":    "127.0.0.1:9",
		"TCP/127.0.0.1:9":    "127.0.0.1:9",
		"tcp4/localhost:9":   "tcp4/localhost:9",
		"tcp6/[::1]:9":       "tcp6/[::1]:9",
		"[::1]:9":            "[::1]:9",
		"backend.internal:9": "backend.internal:9",
	} {
		got, err := dialAddr(in)
		if err != nil || got != want {
			t.Errorf("dialAddr(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	startCaddy(t, map[string]any{"s": server("127.0.0.1:0", map[string]any{
		"upstreams": upstreams("tcp/127.0.0.1:9", "tcp4/127.0.0.1:9", "tcp6/[::1]:9", "[::1]:9"),
	})})
}

// TestUpstreamRejectsFieldsInTheObjectsOrder: with several bad fields, the
// message is the same on every load.
func TestUpstreamRejectsFieldsInTheObjectsOrder(t *testing.T) {
	var u Upstream
	if err := json.Unmarshal([]byte(`{"dial":["127.0.0.1:9"],"zz":1,"aa":2}`), &u); err != nil {
		t.Fatal(err)
	}
	if strings.Join(u.rejected, ",") != "aa,zz" || len(u.Dial) != 1 {
		t.Fatalf("rejected %v, dial %v", u.rejected, u.Dial)
	}
}

// TestUpstreamObjectTakesCaddyL4sPerUpstreamFields: max_connections and
// weight and tls (Caddy's reverse proxy TLS config, as caddy-l4 spells it)
// are read.
func TestUpstreamObjectTakesCaddyL4sPerUpstreamFields(t *testing.T) {
	var u Upstream
	if err := json.Unmarshal([]byte(`{"dial":["127.0.0.1:9"],"max_connections":-1,"weight":3,"tls":{"server_name":"inner.example","insecure_skip_verify":false,"client_certificate_file":"c.pem","client_certificate_key_file":"k.pem","root_ca_pem_files":["ca.pem"]}}`), &u); err != nil {
		t.Fatal(err)
	}
	if u.MaxConnections != -1 || u.Weight != 3 || len(u.rejected) != 0 || u.TLS == nil || u.TLS.ServerName != "inner.example" ||
		u.TLS.ClientCertificateFile != "c.pem" || u.TLS.ClientCertificateKeyFile != "k.pem" || len(u.TLS.RootCAPEMFiles) != 1 {
		t.Fatalf("got %+v", u)
	}
}

// TestAllowEveryPeerWarnsAtLoad: an allow prefix of length 0 lets any peer
// forge the client address. It is legal (a private network behind a
// firewall) but never silent.
func TestAllowEveryPeerWarnsAtLoad(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	var cfg map[string]any
	if err := json.Unmarshal(caddyConfig(map[string]any{"s": server("127.0.0.1:0", map[string]any{
		"upstreams":             upstreams("127.0.0.1:9"),
		"accept_proxy_protocol": map[string]any{"allow": []string{"0.0.0.0/0", "::/0", "127.0.0.1"}},
	})}), &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["logging"] = map[string]any{"logs": map[string]any{"default": map[string]any{
		"writer": map[string]any{"output": "file", "filename": logFile},
		"level":  "WARN", "encoder": map[string]any{"format": "json"},
	}}}
	b, _ := json.Marshal(cfg)
	if err := caddy.Load(b, true); err != nil {
		t.Fatalf("loading: %v", err)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	log, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	var warned []string
	for _, line := range strings.Split(strings.TrimSpace(string(log)), "\n") {
		var entry struct{ Level, Logger, Msg, Prefix string }
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Level == "warn" && strings.Contains(entry.Msg, "trusts every peer") {
			if entry.Logger != "layer4.handlers.chain" {
				t.Errorf("warning logged by %q, want the handler's own logger", entry.Logger)
			}
			warned = append(warned, entry.Prefix)
		}
	}
	if strings.Join(warned, " ") != "0.0.0.0/0 ::/0" {
		t.Fatalf("warned for prefixes %q, want 0.0.0.0/0 and ::/0 only; log:\n%s", warned, log)
	}
}

// TestDialPlaceholdersKnownAtLoadAreResolved: {env.*} in a dial address is
// resolved when the config loads; a placeholder only a connection knows
// leaves a template, filled per connection.
func TestDialPlaceholdersKnownAtLoadAreResolved(t *testing.T) {
	t.Setenv("LAYER4CHAIN_TEST_UPSTREAM", "127.0.0.1:9")
	if got, err := dialAddr("{env.LAYER4CHAIN_TEST_UPSTREAM}"); err != nil || got != "127.0.0.1:9" {
		t.Fatalf("dialAddr({env...}) = %q, %v", got, err)
	}
	if got, err := dialAddr("tcp4/127.0.0.1:{env.LAYER4CHAIN_TEST_PORT_UNSET}9"); err != nil || got != "tcp4/127.0.0.1:9" {
		t.Fatalf("an unset env placeholder: %q, %v; want it empty", got, err)
	}
	// A placeholder only a connection knows makes a template, whose shape
	// is checked with each placeholder standing for one character.
	if got, err := dialAddr("tcp/{l4.tls.server_name}:443"); err != nil || got != "{l4.tls.server_name}:443" {
		t.Fatalf("a connection placeholder: %q, %v; want the template", got, err)
	}
	if _, err := dialAddr("{l4.tls.server_name}.example"); err == nil || !strings.Contains(err.Error(), "its placeholders aside") {
		t.Fatalf("a template without a port: %v", err)
	}
	if got, err := dialAddr("{l4.conn.local_addr}"); err != nil || got != "{l4.conn.local_addr}" {
		t.Fatalf("a placeholder for the whole address: %q, %v", got, err)
	}
	if _, err := dialAddr("{env.LAYER4CHAIN_TEST_PORT_UNSET}:80"); err == nil || !strings.Contains(err.Error(), `(written "{env.LAYER4CHAIN_TEST_PORT_UNSET}:80": placeholders known at load filled it`) {
		t.Errorf("an unset env placeholder for the host: %v, want the address as written named", err)
	}
	for addr, mention := range map[string]string{
		"{evn.X}:80":                  "{evn.X} is no placeholder a connection fills",
		"{}:80":                       "{} is no placeholder",
		"{unclosed:80":                "a brace that opens or closes no placeholder",
		"{{l4.tls.server_name}:80":    "its placeholders aside",
		"{l4.tls.server_name}}:80":    "its placeholders aside",
		"tcp4/{l4.tls.server_name}:x": "its placeholders aside",
	} {
		if _, err := dialAddr(addr); err == nil || !strings.Contains(err.Error(), mention) {
			t.Errorf("%s: %v, want an error mentioning %q", addr, err, mention)
		}
	}
	assertLoadError(t, map[string]any{"upstreams": []any{"{l4.tls.server_name}:443"},
		"health_checks": map[string]any{"active": map[string]any{"interval": "1s"}}},
		`health_checks.active: upstreams[0] ("{l4.tls.server_name}:443") has placeholders that each connection fills`)
}
