package caddyfile_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// chainHandler adapts a Caddyfile with one chain handler and returns that
// handler's JSON.
func chainHandler(t *testing.T, chain string) string {
	t.Helper()
	got, err := adapt(t, "Caddyfile", []byte(wrap(chain)))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct {
			Layer4 struct {
				Servers map[string]struct {
					Routes []struct{ Handle []json.RawMessage }
				}
			}
		}
	}
	if err := json.Unmarshal([]byte(got), &cfg); err != nil {
		t.Fatal(err)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, cfg.Apps.Layer4.Servers["srv0"].Routes[0].Handle[0]); err != nil {
		t.Fatal(err)
	}
	return compact.String()
}

// The options of the PROXY header between hops adapt to their JSON names:
// the policy inside accept_proxy_protocol, TLV types in hex or decimal to
// JSON numbers, and the checksum flag to true.
func TestProxyHeaderOptionsAdapt(t *testing.T) {
	got := chainHandler(t, `chain 127.0.0.1:7002 {
					proxy_protocol v2
					proxy_protocol_crc32c
					forward_tlvs 0x20 0x01 0xE5 231
					accept_proxy_protocol {
						allow 10.0.0.0/8
						policy optional
					}
				}`)
	want := `{"accept_proxy_protocol":{"allow":["10.0.0.0/8"],"policy":"optional"},"forward_tlvs":[32,1,229,231],"handler":"chain","proxy_protocol":"v2","proxy_protocol_crc32c":true,"upstreams":[{"dial":["127.0.0.1:7002"]}]}`
	if got != want {
		t.Fatalf("handler:\n got %s\nwant %s", got, want)
	}
	if got := chainHandler(t, "chain 127.0.0.1:7002 {\n\t\t\t\t\taccept_proxy_protocol {\n\t\t\t\t\t\tallow 10.0.0.1\n\t\t\t\t\t\tpolicy require\n\t\t\t\t\t}\n\t\t\t\t}"); !strings.Contains(got, `"policy":"require"`) {
		t.Fatalf("policy require adapted to %s", got)
	}
}

func TestBadProxyHeaderOptionsFailWithTheOptionAndLine(t *testing.T) {
	for _, tc := range []struct{ name, body, want string }{
		{"unknown accept policy", "chain 127.0.0.1:7002 {\n\t\t\t\t\taccept_proxy_protocol {\n\t\t\t\t\t\tallow 10.0.0.1\n\t\t\t\t\t\tpolicy maybe\n\t\t\t\t\t}\n\t\t\t\t}",
			"option 'policy': unknown value 'maybe' (want one of [require optional]), at Caddyfile:8"},
		{"TLV type out of range", "chain 127.0.0.1:7002 {\n\t\t\t\t\tforward_tlvs 0x20 0x100\n\t\t\t\t}",
			"option 'forward_tlvs': want a value from 0 to 255, in hex (0x20) or decimal, got '0x100', at Caddyfile:6"},
		{"TLV type by name", "chain 127.0.0.1:7002 {\n\t\t\t\t\tforward_tlvs ssl\n\t\t\t\t}",
			"option 'forward_tlvs': want a value from 0 to 255, in hex (0x20) or decimal, got 'ssl'"},
		{"forward_tlvs without types", "chain 127.0.0.1:7002 {\n\t\t\t\t\tforward_tlvs\n\t\t\t\t}",
			"option 'forward_tlvs' needs at least one value, at Caddyfile:6"},
		{"crc32c with a value", "chain 127.0.0.1:7002 {\n\t\t\t\t\tproxy_protocol_crc32c on\n\t\t\t\t}",
			"option 'proxy_protocol_crc32c' takes no value, got 'on', at Caddyfile:6"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := adapt(t, "Caddyfile", []byte(wrap(tc.body)))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}
