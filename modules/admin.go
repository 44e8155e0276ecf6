package modules

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"

	"github.com/caddyserver/caddy/v2"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves the tracker on Caddy's admin endpoint:
//
//	GET    /layer4chain/connections       live connections; filters ?state= ?upstream= ?client= ?chain_id=
//	GET    /layer4chain/connections/{id}  one connection, with the kernel's view of its sockets
//	DELETE /layer4chain/connections/{id}  closes it with reason admin
//	GET    /layer4chain/stats             counts by state, totals, closes and failures by reason
//	GET    /layer4chain/upstreams         every upstream a loaded config lists, with its health
//
// It reads the process's tracker, so it lists connections accepted under
// any config, old or current, and the process's upstream pool.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.layer4chain",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Provision registers the process's metrics in the registry of the config
// being loaded. Caddy swaps the admin server, and the registry /metrics
// serves, before it provisions the apps, and keeps the new one when a
// config fails to load: without this, a rejected config would take every
// caddy_layer4chain_ series off /metrics until the next good load.
func (adminAPI) Provision(ctx caddy.Context) error {
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	return nil
}

// Routes returns the admin routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/layer4chain/connections", Handler: caddy.AdminHandlerFunc(a.handleConnections)},
		{Pattern: "/layer4chain/connections/{id}", Handler: caddy.AdminHandlerFunc(a.handleConnection)},
		{Pattern: "/layer4chain/stats", Handler: caddy.AdminHandlerFunc(a.handleStats)},
		{Pattern: "/layer4chain/upstreams", Handler: caddy.AdminHandlerFunc(a.handleUpstreams)},
	}
}

func (adminAPI) handleConnections(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet); err != nil {
		return err
	}
	match, err := parseFilter(r)
	if err != nil {
		return err
	}
	list := []layer4chain.RecordInfo{} // encodes as [] when empty
	for _, rec := range processTracker().Records() {
		if info := rec.Info(); match(info) {
			// The kernel's view costs a system call per socket: only for
			// the records that are shown.
			list = append(list, rec.InfoWithSockets())
		}
	}
	return writeJSON(w, list)
}

func (adminAPI) handleConnection(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet, http.MethodDelete); err != nil {
		return err
	}
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil {
		return apiError(http.StatusBadRequest, "invalid connection id %q: want a positive integer", r.PathValue("id"))
	}
	rec, ok := processTracker().Get(id)
	if !ok {
		return apiError(http.StatusNotFound, "no live connection with id %d", id)
	}
	if r.Method == http.MethodDelete {
		rec.Close(layer4chain.ReasonAdmin)
	}
	return writeJSON(w, rec.InfoWithSockets())
}

func (adminAPI) handleStats(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet); err != nil {
		return err
	}
	return writeJSON(w, processTracker().Stats())
}

// handleUpstreams lists the upstreams of every chain handler of every
// loaded config, sorted by address: one entry per address, since the
// health belongs to the address.
func (adminAPI) handleUpstreams(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet); err != nil {
		return err
	}
	upstreams := pooledUpstreams()
	list := make([]layer4chain.UpstreamInfo, 0, len(upstreams)) // encodes as [] when empty
	for _, u := range upstreams {
		list = append(list, u.Info())
	}
	return writeJSON(w, list)
}

// parseFilter turns the query into a predicate over records. A client
// filter matches the socket peer or the original client, by address or IP.
func parseFilter(r *http.Request) (func(layer4chain.RecordInfo) bool, error) {
	q := r.URL.Query()
	for key := range q {
		switch key {
		case "state", "upstream", "client", "chain_id":
		default:
			return nil, apiError(http.StatusBadRequest, "unknown filter %q (want state, upstream, client or chain_id)", key)
		}
	}
	var state *layer4chain.State
	if v := q.Get("state"); v != "" {
		s, err := layer4chain.ParseState(v)
		if err != nil {
			return nil, apiError(http.StatusBadRequest, "filter state: %v", err)
		}
		state = &s
	}
	client := q.Get("client")
	if client != "" {
		if _, err := netip.ParseAddr(client); err != nil {
			if _, err := netip.ParseAddrPort(client); err != nil {
				return nil, apiError(http.StatusBadRequest, "filter client: %q is neither an IP nor an IP:port", client)
			}
		}
	}
	upstream, chainID := q.Get("upstream"), q.Get("chain_id")
	return func(info layer4chain.RecordInfo) bool {
		return (state == nil || info.State == *state) &&
			(upstream == "" || info.Upstream == upstream) &&
			(chainID == "" || info.ChainID == chainID) &&
			(client == "" || addrMatches(info.Client, client) || addrMatches(info.OriginalClient, client))
	}, nil
}

// addrMatches says whether an "ip:port" is want, or has want as its IP.
func addrMatches(addr, want string) bool {
	if addr == want {
		return true
	}
	ap, err := netip.ParseAddrPort(addr)
	return err == nil && ap.Addr().Unmap().String() == want
}

func allowMethods(r *http.Request, methods ...string) error {
	for _, m := range methods {
		if r.Method == m {
			return nil
		}
	}
	return apiError(http.StatusMethodNotAllowed, "method %s not allowed", r.Method)
}

// apiError is the error value Caddy's admin server turns into a JSON body
// {"error": "..."} with the status. It must be returned unwrapped.
func apiError(status int, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return caddy.APIError{HTTPStatus: status, Err: err, Message: err.Error()}
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// Interface guards
var (
	_ caddy.AdminRouter = adminAPI{}
	_ caddy.Provisioner = adminAPI{}
)
