package modules

import (
	"crypto/tls"
	"fmt"
	"net"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/mholt/caddy-l4/layer4"

	chaincaddyfile "github.com/layer4chain/caddy-layer4chain/caddyfile"
	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

// What to use instead of caddy-l4's upstream TLS options that mean nothing
// to chain, in JSON (tls.handshake_timeout, tls.except_ports) and in the
// Caddyfile (tls_timeout, tls_except_ports).
const (
	insteadOfTLSTimeout     = "connect_timeout bounds the TCP connect and the TLS handshake together; set connect_timeout instead"
	insteadOfTLSExceptPorts = "each chain upstream has one address; leave tls out of the upstreams that take plain TCP"
)

// checkUpstreamTLS rejects the fields of caddy-l4's upstream tls that mean
// nothing to chain, naming what does the job instead.
func checkUpstreamTLS(i int, t *reverseproxy.TLSConfig) error {
	if t == nil {
		return nil
	}
	switch {
	case t.HandshakeTimeout != 0:
		return fmt.Errorf("upstreams[%d].tls.handshake_timeout: %s", i, insteadOfTLSTimeout)
	case len(t.ExceptPorts) > 0:
		return fmt.Errorf("upstreams[%d].tls.except_ports: %s", i, insteadOfTLSExceptPorts)
	}
	name := caddy.NewReplacer().ReplaceKnown(t.ServerName, "")
	for _, ph := range placeholders.FindAllString(name, -1) {
		if !strings.HasPrefix(ph, "{l4.") {
			return fmt.Errorf("upstreams[%d].tls.server_name: %s is no placeholder a connection fills (those are caddy-l4's {l4.*}) nor one known at load ({env.*}, {system.*}, ...)", i, ph)
		}
	}
	if strings.ContainsAny(placeholders.ReplaceAllString(name, ""), "{}") {
		return fmt.Errorf("upstreams[%d].tls.server_name: %q has a brace that opens or closes no placeholder", i, t.ServerName)
	}
	return nil
}

// upstreamTLS builds the client TLS config of each upstream that has tls,
// keyed by the engine's upstream, for Dialer.TLS. An upstream without a
// server_name verifies the certificate against its dial host, as caddy-l4
// does (tls.Dial's rule). One address listed twice must have one TLS
// setting: the engine shares it.
func (h *Handler) upstreamTLS(ctx caddy.Context, ups []*layer4chain.Upstream) (func(*layer4chain.Upstream) *tls.Config, error) {
	configs := map[*layer4chain.Upstream]*tls.Config{}
	plain := map[*layer4chain.Upstream]bool{}
	for i, u := range h.Upstreams {
		up := ups[i]
		if u.TLS == nil {
			if _, ok := configs[up]; ok {
				return nil, fmt.Errorf("upstreams[%d]: %s is listed before with tls and here without; one address is dialed one way", i, up.Addr)
			}
			plain[up] = true
			continue
		}
		if plain[up] {
			return nil, fmt.Errorf("upstreams[%d].tls: %s is listed before without tls; one address is dialed one way", i, up.Addr)
		}
		if _, ok := configs[up]; ok {
			return nil, fmt.Errorf("upstreams[%d].tls: %s is listed twice with tls; list it once (weight gives it a larger share)", i, up.Addr)
		}
		cfg, err := u.TLS.MakeTLSClientConfig(ctx)
		if err != nil {
			return nil, fmt.Errorf("upstreams[%d].tls: %w", i, err)
		}
		if cfg == nil {
			cfg = new(tls.Config)
		}
		// The name is the dial address's host by default, and a template
		// like the address: placeholders known at load are filled now,
		// those of the connection per connection (Dialer.connect).
		if cfg.ServerName == "" {
			host, _, _ := net.SplitHostPort(h.dials[i][strings.Index(h.dials[i], "/")+1:])
			cfg.ServerName = host
		}
		cfg.ServerName = caddy.NewReplacer().ReplaceKnown(cfg.ServerName, "")
		configs[up] = cfg
	}
	if len(configs) == 0 {
		return nil, nil
	}
	return func(u *layer4chain.Upstream) *tls.Config { return configs[u] }, nil
}

// clientSocket returns the TCP socket under cx's connection when handlers
// before chain wrapped it (caddy-l4's tls handler does), so the engine can
// half-close and reset it; nil when there is no wrapper or none it knows.
func clientSocket(cx *layer4.Connection) *net.TCPConn {
	var c net.Conn = cx.Conn
	for range 8 {
		switch x := c.(type) {
		case *net.TCPConn:
			if c == cx.Conn {
				return nil // no wrapper: the engine uses it as it is
			}
			return x
		case *tls.Conn:
			c = x.NetConn()
		case *layer4.Connection:
			c = x.Conn
		default:
			return nil
		}
	}
	return nil
}

// parseUpstreamTLS reads caddy-l4's per-upstream TLS options into u.TLS:
//
//	tls
//	tls_client_auth <cert_file> <key_file>
//	tls_insecure_skip_verify
//	tls_server_name <name>
//	tls_trust_pool file <pem_files...>
//	tls_renegotiation never|once|freely
//	tls_curves <curves...>
//
// Any of them switches TLS on.
func parseUpstreamTLS(u *Upstream, name string) func(d *caddyfile.Dispenser) error {
	return func(d *caddyfile.Dispenser) error {
		if u.TLS == nil {
			u.TLS = new(reverseproxy.TLSConfig)
		}
		t := u.TLS
		if err := chaincaddyfile.NoBlock(d, "each TLS option is a line of the upstream block"); err != nil {
			return err
		}
		args := d.RemainingArgs()
		want := func(n int) error {
			if len(args) != n {
				return d.ArgErr()
			}
			return nil
		}
		switch name {
		case "tls", "tls_insecure_skip_verify":
			if err := want(0); err != nil {
				return err
			}
			t.InsecureSkipVerify = t.InsecureSkipVerify || name == "tls_insecure_skip_verify"
		case "tls_client_auth":
			if err := want(2); err != nil {
				return d.Errf("option 'tls_client_auth': want <cert_file> <key_file>")
			}
			t.ClientCertificateFile, t.ClientCertificateKeyFile = args[0], args[1]
		case "tls_server_name":
			if err := want(1); err != nil {
				return err
			}
			t.ServerName = args[0]
		case "tls_trust_pool":
			if len(args) < 2 || args[0] != "file" {
				return d.Errf("option 'tls_trust_pool': want file <pem_files...> (chain's Caddyfile takes the file source; JSON takes any tls.ca_pool.source module in tls.ca)")
			}
			t.CARaw = caddyconfig.JSONModuleObject(map[string]any{"pem_files": args[1:]}, "provider", "file", nil)
		case "tls_renegotiation":
			if err := want(1); err != nil {
				return err
			}
			t.Renegotiation = args[0]
		case "tls_curves":
			if len(args) == 0 {
				return d.ArgErr()
			}
			t.Curves = append(t.Curves, args...)
		}
		return nil
	}
}
