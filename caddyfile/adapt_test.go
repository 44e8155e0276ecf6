package caddyfile_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/layer4chain/caddy-layer4chain/modules"
)

var update = flag.Bool("update", false, "rewrite the golden JSON files from the current adapter output")

// adapt runs the Caddyfile adapter the way `caddy adapt --pretty` does.
func adapt(t *testing.T, name string, body []byte) (string, error) {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": name})
	if err != nil {
		return "", err
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, out, "", "\t"); err != nil {
		t.Fatal(err)
	}
	return pretty.String() + "\n", nil
}

// TestEveryExampleAdaptsToItsGoldenJSON adapts each examples/*.caddyfile
// and compares the JSON with caddyfile/testdata/<name>.json, which is also
// what `caddy adapt --pretty` must print (CI checks that with the xcaddy
// build). Run with -update after an intended change.
func TestEveryExampleAdaptsToItsGoldenJSON(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", "examples", "*.caddyfile"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no example Caddyfiles found: %v", err)
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".caddyfile")
		t.Run(name, func(t *testing.T) {
			body, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			got, err := adapt(t, file, body)
			if err != nil {
				t.Fatalf("adapting %s: %v", file, err)
			}
			golden := filepath.Join("testdata", name+".json")
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("reading golden (run with -update to create it): %v", err)
			}
			if got != string(want) {
				t.Fatalf("adapted %s differs from %s:\n%s", file, golden, got)
			}
		})
	}
}

// wrap puts a chain directive into a minimal layer4 server.
func wrap(chain string) string {
	return "{\n\tlayer4 {\n\t\t127.0.0.1:7001 {\n\t\t\troute {\n\t\t\t\t" + chain + "\n\t\t\t}\n\t\t}\n\t}\n}\n"
}

func TestEveryHandlerOptionAdapts(t *testing.T) {
	got, err := adapt(t, "Caddyfile", []byte(wrap(`chain 127.0.0.1:7002 127.0.0.1:7003 {
					upstream 127.0.0.1:7004
					connect_timeout 2s
					idle_timeout 10m
					half_close_timeout 30s
					max_lifetime 24h
					proxy_protocol v1
					accept_proxy_protocol {
						allow 127.0.0.1/32 ::1/128
						allow 127.0.0.2
						timeout 1s
					}
					lb_policy round_robin
					lb_tries 5
					max_hops 4
					max_connections 100
					max_connections_per_client 10
				}`)))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct {
			Layer4 struct {
				Servers map[string]struct {
					Routes []struct{ Handle []map[string]any }
				}
			}
		}
	}
	if err := json.Unmarshal([]byte(got), &cfg); err != nil {
		t.Fatal(err)
	}
	h := cfg.Apps.Layer4.Servers["srv0"].Routes[0].Handle[0]
	want := map[string]any{
		"handler":                    "chain",
		"upstreams":                  []any{map[string]any{"dial": []any{"127.0.0.1:7002"}}, map[string]any{"dial": []any{"127.0.0.1:7003"}}, map[string]any{"dial": []any{"127.0.0.1:7004"}}},
		"connect_timeout":            2e9,
		"idle_timeout":               600e9,
		"half_close_timeout":         30e9,
		"max_lifetime":               86400e9,
		"proxy_protocol":             "v1",
		"accept_proxy_protocol":      map[string]any{"allow": []any{"127.0.0.1/32", "::1/128", "127.0.0.2"}, "timeout": 1e9},
		"load_balancing":             map[string]any{"selection": map[string]any{"policy": "round_robin"}, "tries": 5.0},
		"max_hops":                   4.0,
		"max_connections":            100.0,
		"max_connections_per_client": 10.0,
	}
	gotJSON, _ := json.Marshal(h)
	wantJSON, _ := json.Marshal(want)
	if string(gotJSON) != string(wantJSON) {
		t.Fatalf("handler:\n got %s\nwant %s", gotJSON, wantJSON)
	}
}

// Two layer4chain blocks with different options merge into one app.
func TestGlobalOptionBlocksMerge(t *testing.T) {
	got, err := adapt(t, "Caddyfile", []byte("{\n\tlayer4chain {\n\t\tsweep_interval 1s\n\t}\n\tlayer4chain {\n\t\tmax_connections 5\n\t}\n}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(got, `"max_connections": 5`) || !strings.Contains(got, `"sweep_interval": 1000000000`) {
		t.Fatalf("merged app:\n%s", got)
	}
}

func TestGlobalOptionAdaptsToTheApp(t *testing.T) {
	got, err := adapt(t, "Caddyfile", []byte("{\n\tlayer4chain {\n\t\tsweep_interval 250ms\n\t\tshutdown_grace 1m\n\t\tmax_connections 5000\n\t}\n}\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := "\"layer4chain\": {\n\t\t\t\"sweep_interval\": 250000000,\n\t\t\t\"shutdown_grace\": 60000000000,\n\t\t\t\"max_connections\": 5000\n\t\t}"
	if !strings.Contains(got, want) {
		t.Fatalf("adapted:\n%s\nwant it to contain:\n%s", got, want)
	}
}

// TestOffAdaptsToMinusOne: `off` is the Caddyfile's word for the JSON -1
// that switches a limit off, on the handler and in the global option.
func TestOffAdaptsToMinusOne(t *testing.T) {
	got, err := adapt(t, "Caddyfile", []byte(wrap(`chain 127.0.0.1:7002 {
					idle_timeout off
					half_close_timeout off
					max_lifetime off
					max_connections off
					max_connections_per_client off
				}`)))
	if err != nil {
		t.Fatal(err)
	}
	for _, opt := range []string{"idle_timeout", "half_close_timeout", "max_lifetime", "max_connections", "max_connections_per_client"} {
		if want := "\"" + opt + "\": -1"; !strings.Contains(got, want) {
			t.Errorf("adapted:\n%s\nwant it to contain %s", got, want)
		}
	}
	got, err = adapt(t, "Caddyfile", []byte("{\n\tlayer4chain {\n\t\tmax_connections off\n\t}\n}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "\"layer4chain\": {\n\t\t\t\"max_connections\": -1\n\t\t}"; !strings.Contains(got, want) {
		t.Fatalf("adapted:\n%s\nwant it to contain:\n%s", got, want)
	}
}

// TestProxyOptionsChainLacksSayWhatToUse: an operator who brings an
// option chain does not have is told what to use instead.
func TestProxyOptionsChainLacksSayWhatToUse(t *testing.T) {
	for option, want := range map[string]string{
		"health_uri /health": "option 'health_uri': chain's active health checks are TCP connects (with a PROXY v2 LOCAL header when proxy_protocol is set), not HTTP requests; use health_port, health_interval and health_timeout, at Caddyfile:6",
		"upstream 127.0.0.1:7003 {\n\t\t\t\t\t\ttls_trust_pool inline abc\n\t\t\t\t\t}":            "option 'tls_trust_pool': want file <pem_files...>",
		"upstream 127.0.0.1:7003 {\n\t\t\t\t\t\ttls\n\t\t\t\t\t\ttls_timeout 2s\n\t\t\t\t\t}":      "option 'tls_timeout': connect_timeout bounds the TCP connect and the TLS handshake together; set connect_timeout instead, at Caddyfile:8",
		"upstream 127.0.0.1:7003 {\n\t\t\t\t\t\ttls\n\t\t\t\t\t\ttls_except_ports 80\n\t\t\t\t\t}": "option 'tls_except_ports': each chain upstream has one address",
	} {
		_, err := adapt(t, "Caddyfile", []byte(wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\t"+option+"\n\t\t\t\t}")))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want it to contain %q", option, err, want)
		}
	}
}

// handlerJSON adapts a chain directive and returns its handler's JSON,
// compact, keys sorted.
func handlerJSON(t *testing.T, chain string) string {
	t.Helper()
	got, err := adapt(t, "Caddyfile", []byte(wrap(chain)))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct {
			Layer4 struct {
				Servers map[string]struct {
					Routes []struct{ Handle []map[string]any }
				}
			}
		}
	}
	if err := json.Unmarshal([]byte(got), &cfg); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(cfg.Apps.Layer4.Servers["srv0"].Routes[0].Handle[0])
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestHealthAndRetryOptionsAdapt: caddy-l4's option names land in
// caddy-l4's JSON places; close_if_unhealthy applies to both kinds of
// check when both are on.
func TestHealthAndRetryOptionsAdapt(t *testing.T) {
	got := handlerJSON(t, `chain 127.0.0.1:7002 {
					fail_duration 30s
					max_fails 3
					unhealthy_connection_count 100
					health_port 9000
					health_interval 10s
					health_timeout 2s
					health_fall 3
					health_rise 2
					close_if_unhealthy
					lb_try_duration 5s
					lb_try_interval 100ms
				}`)
	want := `{"handler":"chain",` +
		`"health_checks":{"active":{"close_if_unhealthy":true,"fall":3,"interval":10000000000,"port":9000,"rise":2,"timeout":2000000000},` +
		`"passive":{"close_if_unhealthy":true,"fail_duration":30000000000,"max_fails":3,"unhealthy_connection_count":100}},` +
		`"load_balancing":{"try_duration":5000000000,"try_interval":100000000},` +
		`"upstreams":[{"dial":["127.0.0.1:7002"]}]}`
	if got != want {
		t.Fatalf("handler:\n got %s\nwant %s", got, want)
	}
}

// TestCloseIfUnhealthyFollowsTheChecksThatAreOn: close_if_unhealthy
// applies to the checks that are on; with only the circuit breaker on it
// does not switch active checks on (an active object is what switches
// them on), and alone it does, as caddy-l4's does.
func TestCloseIfUnhealthyFollowsTheChecksThatAreOn(t *testing.T) {
	for _, tc := range []struct{ options, want string }{
		{"close_if_unhealthy", `"health_checks":{"active":{"close_if_unhealthy":true}}`},
		{"fail_duration 10s\n\t\t\t\t\tclose_if_unhealthy",
			`"health_checks":{"passive":{"close_if_unhealthy":true,"fail_duration":10000000000}}`},
		{"close_if_unhealthy\n\t\t\t\t\thealth_interval 5s",
			`"health_checks":{"active":{"close_if_unhealthy":true,"interval":5000000000}}`},
		// unhealthy_connection_count alone opens no circuit: only the
		// active side gets close_if_unhealthy.
		{"unhealthy_connection_count 5\n\t\t\t\t\thealth_port 9000\n\t\t\t\t\tclose_if_unhealthy",
			`"health_checks":{"active":{"close_if_unhealthy":true,"port":9000},"passive":{"unhealthy_connection_count":5}}`},
		// Any health_* option alone switches active checks on with defaults.
		{"health_rise 2", `"health_checks":{"active":{"rise":2}}`},
	} {
		if got := handlerJSON(t, "chain 127.0.0.1:7002 {\n\t\t\t\t\t"+tc.options+"\n\t\t\t\t}"); !strings.Contains(got, tc.want) {
			t.Errorf("%q adapted to\n%s\nwant it to contain\n%s", tc.options, got, tc.want)
		}
	}
}

// TestOffAdaptsForHealthAndRetry: the options that can be off adapt `off`
// to -1 like every other limit.
func TestOffAdaptsForHealthAndRetry(t *testing.T) {
	got := handlerJSON(t, `chain {
					upstream 127.0.0.1:7002 {
						max_connections off
					}
					fail_duration off
					unhealthy_connection_count off
					lb_try_duration off
				}`)
	want := `{"handler":"chain","health_checks":{"passive":{"fail_duration":-1,"unhealthy_connection_count":-1}},` +
		`"load_balancing":{"try_duration":-1},"upstreams":[{"dial":["127.0.0.1:7002"],"max_connections":-1}]}`
	if got != want {
		t.Fatalf("handler:\n got %s\nwant %s", got, want)
	}
}

// TestUpstreamBlocksAdapt: caddy-l4's per-upstream block, with the address
// on the line or in dial, beside plain upstream lines.
func TestUpstreamBlocksAdapt(t *testing.T) {
	got := handlerJSON(t, `chain 127.0.0.1:7001 {
					upstream 127.0.0.1:7002 {
						max_connections 100
						weight 3
					}
					upstream {
						dial tcp4/127.0.0.1:7003
						weight 2
					}
					upstream 127.0.0.1:7004 127.0.0.1:7005
					upstream 127.0.0.1:7006 {
					}
					lb_policy weighted_round_robin
				}`)
	want := `{"handler":"chain","load_balancing":{"selection":{"policy":"weighted_round_robin"}},"upstreams":[` +
		`{"dial":["127.0.0.1:7001"]},` +
		`{"dial":["127.0.0.1:7002"],"max_connections":100,"weight":3},` +
		`{"dial":["tcp4/127.0.0.1:7003"],"weight":2},` +
		`{"dial":["127.0.0.1:7004"]},{"dial":["127.0.0.1:7005"]},` +
		`{"dial":["127.0.0.1:7006"]}]}`
	if got != want {
		t.Fatalf("handler:\n got %s\nwant %s", got, want)
	}
}

// TestUpstreamLinesStillTakeAddresses: the check for a block leaves the
// addresses of an `upstream` line, and the next option, to their parsers.
func TestUpstreamLinesStillTakeAddresses(t *testing.T) {
	got, err := adapt(t, "Caddyfile", []byte(wrap(`chain {
					upstream 127.0.0.1:7002 tcp4/127.0.0.1:7003
					upstream upstream:7004
					idle_timeout 1m
				}`)))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"127.0.0.1:7002"`, `"tcp4/127.0.0.1:7003"`, `"upstream:7004"`, `"idle_timeout": 60000000000`} {
		if !strings.Contains(got, want) {
			t.Errorf("adapted:\n%s\nwant it to contain %s", got, want)
		}
	}
}

// TestBadCaddyfilesFailWithTheOptionAndLine checks the exact messages an
// operator sees.
func TestBadCaddyfilesFailWithTheOptionAndLine(t *testing.T) {
	for _, tc := range []struct {
		name, body, want string
	}{
		{"unknown option", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tidle_timout 1s\n\t\t\t\t}"),
			"unknown chain option 'idle_timout', at Caddyfile:6"},
		{"duplicate option", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tidle_timeout 1s\n\t\t\t\t\tidle_timeout 2s\n\t\t\t\t}"),
			"duplicate chain option 'idle_timeout', at Caddyfile:7"},
		{"bad duration", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tconnect_timeout soon\n\t\t\t\t}"),
			"option 'connect_timeout': invalid duration 'soon'"},
		{"negative duration", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\thalf_close_timeout -1s\n\t\t\t\t}"),
			"option 'half_close_timeout': must not be negative, got '-1s'; 'off' switches it off, at Caddyfile:6"},
		{"connect_timeout off", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tconnect_timeout off\n\t\t\t\t}"),
			"option 'connect_timeout' cannot be off: an unreachable upstream would hold each client for the kernel's minutes of SYN retries, at Caddyfile:6"},
		{"accept timeout off", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\taccept_proxy_protocol {\n\t\t\t\t\t\tallow 10.0.0.1\n\t\t\t\t\t\ttimeout off\n\t\t\t\t\t}\n\t\t\t\t}"),
			"option 'timeout' cannot be off: a peer that never finishes its header would hold the connection forever, at Caddyfile:8"},
		{"max_hops off", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tmax_hops off\n\t\t\t\t}"),
			"option 'max_hops' cannot be off: a loop between hops would multiply connections without end, at Caddyfile:6"},
		{"bad limit", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tmax_connections -1\n\t\t\t\t}"),
			"option 'max_connections': want a non-negative integer or 'off', got '-1', at Caddyfile:6"},
		{"upstream block with two addresses", wrap("chain {\n\t\t\t\t\tupstream 127.0.0.1:7002 127.0.0.1:7003 {\n\t\t\t\t\t\tmax_connections 10\n\t\t\t\t\t}\n\t\t\t\t}"),
			"option 'upstream': a block configures one upstream; give it exactly one address, on the line or with dial, at Caddyfile:6"},
		{"upstream block with an address and a dial", wrap("chain {\n\t\t\t\t\tupstream 127.0.0.1:7002 {\n\t\t\t\t\t\tdial 127.0.0.1:7003\n\t\t\t\t\t}\n\t\t\t\t}"),
			"option 'upstream': a block configures one upstream; give it exactly one address, on the line or with dial, at Caddyfile:6"},
		{"upstream without address", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tupstream\n\t\t\t\t}"),
			"option 'upstream': a block configures one upstream; give it exactly one address, on the line or with dial, at Caddyfile:6"},
		{"unknown upstream option", wrap("chain {\n\t\t\t\t\tupstream 127.0.0.1:7002 {\n\t\t\t\t\t\tlocal_addr 127.0.0.2\n\t\t\t\t\t}\n\t\t\t\t}"),
			"unknown upstream option 'local_addr', at Caddyfile:7"},
		{"duplicate upstream option", wrap("chain {\n\t\t\t\t\tupstream 127.0.0.1:7002 {\n\t\t\t\t\t\tweight 1\n\t\t\t\t\t\tweight 2\n\t\t\t\t\t}\n\t\t\t\t}"),
			"duplicate upstream option 'weight', at Caddyfile:8"},
		{"negative weight", wrap("chain {\n\t\t\t\t\tupstream 127.0.0.1:7002 {\n\t\t\t\t\t\tweight -1\n\t\t\t\t\t}\n\t\t\t\t}"),
			"option 'weight': want a non-negative integer, got '-1', at Caddyfile:7"},
		{"accept_proxy_protocol with arguments", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\taccept_proxy_protocol 127.0.0.1/32\n\t\t\t\t}"),
			"option 'accept_proxy_protocol' takes a block, not arguments: put the trusted peers on its allow line, as in accept_proxy_protocol { allow 127.0.0.1/32 }, at Caddyfile:6"},
		{"accept_proxy_protocol off", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\taccept_proxy_protocol off\n\t\t\t\t}"),
			"option 'accept_proxy_protocol' has no off: leave it out, and the hop reads no header, at Caddyfile:6"},
		{"close_if_unhealthy with a value", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tclose_if_unhealthy yes\n\t\t\t\t}"),
			"option 'close_if_unhealthy' takes no value, got 'yes', at Caddyfile:6"},
		{"duplicate health option", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\thealth_interval 1s\n\t\t\t\t\thealth_interval 2s\n\t\t\t\t}"),
			"duplicate chain option 'health_interval', at Caddyfile:7"},
		{"max_fails off", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tmax_fails off\n\t\t\t\t}"),
			"option 'max_fails' cannot be off: fail_duration switches passive health checks off, at Caddyfile:6"},
		{"health_interval off", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\thealth_interval off\n\t\t\t\t}"),
			"option 'health_interval' cannot be off: active health checks are switched off by leaving health_checks.active out, at Caddyfile:6"},
		{"health_timeout off", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\thealth_timeout off\n\t\t\t\t}"),
			"option 'health_timeout' cannot be off: a probe of a black-holed upstream would never end, at Caddyfile:6"},
		{"lb_try_interval off", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tlb_try_interval off\n\t\t\t\t}"),
			"option 'lb_try_interval' cannot be off: without a wait, retrying while every upstream is down would spin on the CPU; try_duration switches retrying off, at Caddyfile:6"},
		{"bare number for a duration", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tidle_timeout -1\n\t\t\t\t}"),
			"option 'idle_timeout': invalid duration '-1': time: missing unit in duration \"-1\"; a duration has a unit, such as '1ms' or '1s', and 'off' switches it off, at Caddyfile:6"},
		{"bare milliseconds for a duration", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tconnect_timeout 5000\n\t\t\t\t}"),
			"option 'connect_timeout': invalid duration '5000': time: missing unit in duration \"5000\"; a duration has a unit, such as '5000ms' or '5000s', at Caddyfile:6"},
		{"bad fail_duration", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tfail_duration often\n\t\t\t\t}"),
			"option 'fail_duration': invalid duration 'often'"},
		{"bad health_port", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\thealth_port http\n\t\t\t\t}"),
			"option 'health_port': want a non-negative integer, got 'http', at Caddyfile:6"},
		{"global sweep_interval off", "{\n\tlayer4chain {\n\t\tsweep_interval off\n\t}\n}\n",
			"option 'sweep_interval' cannot be off: the sweep is the safety net that enforces the limits no deadline caught and reaps zombie records, at Caddyfile:3"},
		{"unknown version", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tproxy_protocol v3\n\t\t\t\t}"),
			"option 'proxy_protocol': unknown value 'v3' (want one of [v1 v2]), at Caddyfile:6"},
		{"unknown policy", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tlb_policy fastest\n\t\t\t\t}"),
			"option 'lb_policy': unknown value 'fastest'"},
		{"bad count", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tmax_hops many\n\t\t\t\t}"),
			"option 'max_hops': want a non-negative integer, got 'many', at Caddyfile:6"},
		{"two values", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tidle_timeout 1s 2s\n\t\t\t\t}"),
			"option 'idle_timeout' takes one value, got another: '2s', at Caddyfile:6"},
		{"unknown accept option", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\taccept_proxy_protocol {\n\t\t\t\t\t\tdeny 127.0.0.1\n\t\t\t\t\t}\n\t\t\t\t}"),
			"unknown accept_proxy_protocol option 'deny', at Caddyfile:7"},
		{"no upstream", wrap("chain {\n\t\t\t\t\tidle_timeout 1s\n\t\t\t\t}"),
			"chain needs at least one upstream, at Caddyfile:5"},

		// What only the whole block shows fails at the line of the option
		// (or the upstream) it is about, else at the directive's, with the
		// field's JSON name, as loading would.
		{"upstream without a port", wrap("chain 127.0.0.1"),
			`upstreams[0].dial: upstream address "127.0.0.1" is not host:port: address 127.0.0.1: missing port in address, at Caddyfile:5`},
		{"max_hops beyond the TLV", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tmax_hops 300\n\t\t\t\t}"),
			"max_hops: at most 255, got 300, at Caddyfile:6"},
		{"max_fails without the breaker", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tmax_fails 3\n\t\t\t\t}"),
			"health_checks.passive.max_fails: the circuit breaker is off (fail_duration is absent, 0 or negative), so no failure is counted; set fail_duration, at Caddyfile:6"},
		{"the second upstream line", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tupstream 127.0.0.1:7003\n\t\t\t\t\tupstream udp/127.0.0.1:53\n\t\t\t\t}"),
			`upstreams[2].dial: "udp/127.0.0.1:53" is a udp address; chain proxies TCP: use host:port, tcp4/host:port or tcp6/host:port, at Caddyfile:7`},
		{"lb_tries beyond the cap", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tidle_timeout 1m\n\t\t\t\t\tlb_tries 256\n\t\t\t\t}"),
			"load_balancing.tries: at most 100, got 256, at Caddyfile:7"},
		{"bad CIDR", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\taccept_proxy_protocol {\n\t\t\t\t\t\tallow 127.0.0.1/33\n\t\t\t\t\t}\n\t\t\t\t}"),
			`accept_proxy_protocol.allow: invalid CIDR "127.0.0.1/33"`},
		{"forward_tlvs without a header to read", wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\tproxy_protocol v2\n\t\t\t\t\tforward_tlvs 0x20\n\t\t\t\t}"),
			"forward_tlvs: there is no header to forward TLVs from; set accept_proxy_protocol, at Caddyfile:7"},
		{"unknown global option", "{\n\tlayer4chain {\n\t\tgrace 1s\n\t}\n}\n",
			"unknown layer4chain option 'grace', at Caddyfile:3"},
		{"duplicate global option", "{\n\tlayer4chain {\n\t\tsweep_interval 1s\n\t\tsweep_interval 2s\n\t}\n}\n",
			"duplicate layer4chain option 'sweep_interval', at Caddyfile:4"},
		{"global duration below the minimum", "{\n\tlayer4chain {\n\t\tsweep_interval 500us\n\t}\n}\n",
			"sweep_interval: 500µs is below the 1ms minimum; no timeout that short works on a network, at Caddyfile:2"},
		{"global option in two blocks", "{\n\tlayer4chain {\n\t\tmax_connections 10\n\t}\n\tlayer4chain {\n\t\tmax_connections off\n\t}\n}\n",
			"duplicate layer4chain option 'max_connections': an earlier layer4chain block sets it, at Caddyfile:5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := adapt(t, "Caddyfile", []byte(tc.body))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

// An address with a placeholder is checked when Caddy loads the config,
// not when it adapts: {env.*} may be set only where Caddy runs.
func TestPlaceholderAddressesAdaptWhereTheyAreNotSet(t *testing.T) {
	t.Setenv("LAYER4CHAIN_TEST_UNSET", "")
	got, err := adapt(t, "Caddyfile", []byte(wrap("chain {env.LAYER4CHAIN_TEST_UNSET}:7002")))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(got, `"{env.LAYER4CHAIN_TEST_UNSET}:7002"`) {
		t.Fatalf("the address did not adapt as written:\n%s", got)
	}
}
