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

// TestProxyOptionsChainLacksSayWhatToUse: an operator who brings
// caddy-l4's proxy options is told what governs the same thing here.
func TestProxyOptionsChainLacksSayWhatToUse(t *testing.T) {
	const (
		health  = "upstream health checks are not supported yet; failover on each connection is governed by connect_timeout and lb_tries"
		passive = "passive health checks are not supported yet; failover on each connection is governed by connect_timeout and lb_tries"
	)
	for option, want := range map[string]string{
		"lb_try_duration 5s":           "option 'lb_try_duration': not supported yet; use lb_tries and connect_timeout to bound failover",
		"lb_try_interval 250ms":        "option 'lb_try_interval': not supported yet; chain fails over to the next upstream at once, lb_tries bounds the attempts",
		"health_interval 10s":          "option 'health_interval': " + health,
		"health_port 8080":             "option 'health_port': " + health,
		"health_timeout 2s":            "option 'health_timeout': " + health,
		"health_fall 3":                "option 'health_fall': " + health,
		"health_rise 2":                "option 'health_rise': " + health,
		"health_uri /health":           "option 'health_uri': " + health,
		"close_if_unhealthy":           "option 'close_if_unhealthy': " + health,
		"fail_duration 30s":            "option 'fail_duration': " + passive,
		"max_fails 3":                  "option 'max_fails': " + passive,
		"unhealthy_connection_count 5": "option 'unhealthy_connection_count': " + passive,
	} {
		_, err := adapt(t, "Caddyfile", []byte(wrap("chain 127.0.0.1:7002 {\n\t\t\t\t\t"+option+"\n\t\t\t\t}")))
		if want += ", at Caddyfile:6"; err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want it to contain %q", option, err, want)
		}
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
		{"upstream block", wrap("chain {\n\t\t\t\t\tupstream 127.0.0.1:7002 {\n\t\t\t\t\t\tmax_connections 10\n\t\t\t\t\t}\n\t\t\t\t}"),
			"option 'upstream' takes no block: per-upstream options are not supported yet; give one address per 'upstream' line, or the addresses on the chain line, at Caddyfile:6"},
		{"upstream block without address", wrap("chain {\n\t\t\t\t\tupstream {\n\t\t\t\t\t\tdial 127.0.0.1:7002\n\t\t\t\t\t}\n\t\t\t\t}"),
			"option 'upstream' takes no block: per-upstream options are not supported yet; give one address per 'upstream' line, or the addresses on the chain line, at Caddyfile:6"},
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
			"chain needs at least one upstream"},
		{"unknown global option", "{\n\tlayer4chain {\n\t\tgrace 1s\n\t}\n}\n",
			"unknown layer4chain option 'grace', at Caddyfile:3"},
		{"duplicate global option", "{\n\tlayer4chain {\n\t\tsweep_interval 1s\n\t\tsweep_interval 2s\n\t}\n}\n",
			"duplicate layer4chain option 'sweep_interval', at Caddyfile:4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := adapt(t, "Caddyfile", []byte(tc.body))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}
