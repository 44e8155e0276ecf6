package modules

import "testing"

func TestBadConfigFailsNamingTheField(t *testing.T) {
	ok := []any{map[string]any{"dial": []string{"127.0.0.1:9"}}}
	for _, tc := range []struct {
		name    string
		handler map[string]any
		want    string
	}{
		{"no upstreams", map[string]any{}, "upstreams"},
		{"two dial addresses", map[string]any{"upstreams": []any{map[string]any{"dial": []string{"127.0.0.1:1", "127.0.0.1:2"}}}}, "upstreams[0].dial"},
		{"bad dial address", map[string]any{"upstreams": []any{"127.0.0.1"}}, "upstreams[0].dial"},
		{"unparsable CIDR", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"allow": []string{"127.0.0.1/99"}}}, "accept_proxy_protocol.allow"},
		{"negative accept timeout", map[string]any{"upstreams": ok, "accept_proxy_protocol": map[string]any{"timeout": "-1s"}}, "accept_proxy_protocol.timeout"},
		{"negative connect_timeout", map[string]any{"upstreams": ok, "connect_timeout": "-1s"}, "connect_timeout"},
		{"negative idle_timeout", map[string]any{"upstreams": ok, "idle_timeout": "-5m"}, "idle_timeout"},
		{"negative half_close_timeout", map[string]any{"upstreams": ok, "half_close_timeout": "-1s"}, "half_close_timeout"},
		{"negative max_lifetime", map[string]any{"upstreams": ok, "max_lifetime": "-1h"}, "max_lifetime"},
		{"unknown proxy_protocol", map[string]any{"upstreams": ok, "proxy_protocol": "v3"}, "proxy_protocol"},
		{"unknown policy", map[string]any{"upstreams": ok, "load_balancing": map[string]any{"selection": map[string]any{"policy": "fastest"}}}, "load_balancing.selection.policy"},
		{"negative tries", map[string]any{"upstreams": ok, "load_balancing": map[string]any{"tries": -1}}, "load_balancing.tries"},
		{"negative max_hops", map[string]any{"upstreams": ok, "max_hops": -1}, "max_hops"},
		{"negative max_connections", map[string]any{"upstreams": ok, "max_connections": -1}, "max_connections"},
		{"negative per-client limit", map[string]any{"upstreams": ok, "max_connections_per_client": -2}, "max_connections_per_client"},
		{"unknown field", map[string]any{"upstreams": ok, "idle_timout": "1s"}, "idle_timout"},
	} {
		t.Run(tc.name, func(t *testing.T) { assertLoadError(t, tc.handler, tc.want) })
	}
}
