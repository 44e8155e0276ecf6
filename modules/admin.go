package modules

import (
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves the tracker on Caddy's admin endpoint:
//
//	GET    /layer4chain/connections       live connections in ID order; filters ?state= ?upstream=
//	                                      ?client= (IP, IP:port or CIDR) ?chain_id=, each repeatable
//	                                      (OR), and paging ?limit= ?after=
//	GET    /layer4chain/connections/{id}  one connection, with the kernel's view of its sockets
//	DELETE /layer4chain/connections/{id}  closes it with reason admin
//	GET    /layer4chain/stats             counts by state, totals, closes and failures by reason
//	GET    /layer4chain/upstreams         every upstream a loaded config lists, with its health
//
// Any other path under /layer4chain/ is a 404 with a JSON error, like every
// error of these endpoints.
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
		// The admin server's mux answers an unknown path in plain text;
		// these catch every other path of the module.
		{Pattern: "/layer4chain", Handler: caddy.AdminHandlerFunc(a.handleUnknown)},
		{Pattern: "/layer4chain/", Handler: caddy.AdminHandlerFunc(a.handleUnknown)},
	}
}

func (adminAPI) handleUnknown(_ http.ResponseWriter, r *http.Request) error {
	return apiError(http.StatusNotFound, "no endpoint %s (want /layer4chain/connections, /layer4chain/connections/{id}, /layer4chain/stats or /layer4chain/upstreams)", r.URL.Path)
}

func (adminAPI) handleConnections(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet); err != nil {
		return err
	}
	q, err := parseListQuery(r)
	if err != nil {
		return err
	}
	// The tracker's lock is held only to copy the record pointers (or,
	// by chain ID, the index's few); filtering, the kernel's view and
	// encoding run without it.
	var records []*layer4chain.Record
	if len(q.chainIDs) > 0 {
		for _, id := range q.chainIDs {
			records = append(records, processTracker().ByChainID(id)...)
		}
		slices.SortFunc(records, func(a, b *layer4chain.Record) int { return cmp.Compare(a.ID, b.ID) })
		records = slices.Compact(records) // a chain ID asked for twice
	} else {
		records = processTracker().Records()
	}
	list := []layer4chain.RecordInfo{} // encodes as [] when empty
	// The first record whose id is above after (after+1 would wrap at the
	// largest id).
	start, found := slices.BinarySearchFunc(records, q.after, func(r *layer4chain.Record, id uint64) int { return cmp.Compare(r.ID, id) })
	if found {
		start++
	}
	for _, rec := range records[start:] {
		if q.limit > 0 && len(list) == q.limit {
			break
		}
		if info := rec.Info(); q.match(info) {
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
	if err := noParameters(r); err != nil {
		return err
	}
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil || strings.HasPrefix(r.PathValue("id"), "0") { // IDs start at 1, spelled as listed
		return apiError(http.StatusBadRequest, "invalid connection id %q: want a positive integer", r.PathValue("id"))
	}
	rec, ok := processTracker().Get(id)
	if !ok {
		return apiError(http.StatusNotFound, "no live connection with id %d", id)
	}
	if r.Method != http.MethodDelete {
		return writeJSON(w, rec.InfoWithSockets())
	}
	rec.Close(layer4chain.ReasonAdmin)
	info := rec.InfoWithSockets()
	// Closing has begun, whether or not the connection's goroutine (or
	// the parker, for a quiet one) has taken the closing state yet.
	info.State = layer4chain.StateClosing
	return writeJSON(w, info)
}

func (adminAPI) handleStats(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet); err != nil {
		return err
	}
	if err := noParameters(r); err != nil {
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
	if err := noParameters(r); err != nil {
		return err
	}
	upstreams := pooledUpstreams()
	list := make([]layer4chain.UpstreamInfo, 0, len(upstreams)) // encodes as [] when empty
	for _, u := range upstreams {
		list = append(list, u.Info())
	}
	return writeJSON(w, list)
}

// MaxListLimit is the largest page GET /layer4chain/connections serves.
const MaxListLimit = 10000

// listQuery is a parsed GET /layer4chain/connections query. Values of one
// filter are alternatives (OR); different filters must all match (AND).
type listQuery struct {
	states    []layer4chain.State
	upstreams []string
	clients   []netip.Prefix // an IP is a one-address prefix
	ports     []netip.AddrPort
	chainIDs  []string
	limit     int    // 0: every matching record
	after     uint64 // only records with a greater ID
}

// parseListQuery reads the filters and the paging parameters. Every bad
// value is a 400 naming the parameter.
func parseListQuery(r *http.Request) (listQuery, error) {
	var q listQuery
	values, err := queryValues(r)
	if err != nil {
		return listQuery{}, err
	}
	for _, key := range slices.Sorted(maps.Keys(values)) {
		if (key == "limit" || key == "after") && len(values[key]) > 1 {
			return listQuery{}, apiError(http.StatusBadRequest, "%s: given %d times, want it once", key, len(values[key]))
		}
		for _, v := range values[key] {
			if err := q.add(key, v); err != nil {
				return listQuery{}, err
			}
		}
	}
	return q, nil
}

// add reads one parameter.
func (q *listQuery) add(key, v string) error {
	if v == "" && key != "limit" && key != "after" {
		// Not "no filter": a script that filled it from an empty variable
		// would act on every connection.
		return apiError(http.StatusBadRequest, "filter %s: empty value", key)
	}
	switch key {
	case "state":
		s, err := layer4chain.ParseState(v)
		if err != nil {
			return apiError(http.StatusBadRequest, "filter state: %v", err)
		}
		q.states = append(q.states, s)
	case "upstream":
		// As the config spells it too: "tcp/h:p" is the upstream "h:p".
		v = strings.TrimPrefix(v, "tcp/")
		_, hostPort, family := strings.Cut(v, "/")
		if !family {
			hostPort = v
		}
		if _, _, err := net.SplitHostPort(hostPort); err != nil && !layer4chain.HasPlaceholder(v) {
			return apiError(http.StatusBadRequest, "filter upstream: %q is not host:port, as the config lists upstreams", v)
		}
		q.upstreams = append(q.upstreams, v)
	case "chain_id":
		q.chainIDs = append(q.chainIDs, v)
	case "client":
		if ap, err := netip.ParseAddrPort(v); err == nil {
			q.ports = append(q.ports, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
		} else if ip, err := netip.ParseAddr(v); err == nil {
			q.clients = append(q.clients, netip.PrefixFrom(ip.Unmap(), ip.Unmap().BitLen()))
		} else if p, err := netip.ParsePrefix(v); err == nil {
			if p.Addr().Is4In6() {
				p = netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0))
			}
			q.clients = append(q.clients, p.Masked())
		} else {
			return apiError(http.StatusBadRequest, "filter client: %q is neither an IP, an IP:port nor a CIDR", v)
		}
	case "limit":
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > MaxListLimit {
			return apiError(http.StatusBadRequest, "limit: %q is not an integer from 1 to %d", v, MaxListLimit)
		}
		q.limit = n
	case "after":
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return apiError(http.StatusBadRequest, "after: %q is not a connection id (an integer from 0)", v)
		}
		q.after = n
	default:
		return apiError(http.StatusBadRequest, "unknown parameter %q (want state, upstream, client, chain_id, limit or after)", key)
	}
	return nil
}

// match says whether a record passes every filter. A client filter matches
// the socket peer or the original client.
func (q *listQuery) match(info layer4chain.RecordInfo) bool {
	return (len(q.states) == 0 || slices.Contains(q.states, info.State)) &&
		(len(q.upstreams) == 0 || slices.Contains(q.upstreams, info.Upstream) ||
			(info.UpstreamTemplate != "" && slices.Contains(q.upstreams, info.UpstreamTemplate))) &&
		(len(q.chainIDs) == 0 || slices.Contains(q.chainIDs, info.ChainID)) &&
		(len(q.clients)+len(q.ports) == 0 || q.clientMatches(info.Client) || q.clientMatches(info.OriginalClient))
}

// clientMatches says whether an "ip:port" is one of the addresses asked
// for, or has its IP in one of the prefixes.
func (q *listQuery) clientMatches(addr string) bool {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return false
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	if slices.Contains(q.ports, ap) {
		return true
	}
	return slices.ContainsFunc(q.clients, func(p netip.Prefix) bool { return p.Contains(ap.Addr()) })
}

// noParameters rejects a query on an endpoint that takes none, as a typo
// in a filter would otherwise go unnoticed.
func noParameters(r *http.Request) error {
	values, err := queryValues(r)
	if err != nil || len(values) == 0 {
		return err
	}
	return apiError(http.StatusBadRequest, "unknown parameter %q (%s takes none)", slices.Min(slices.Collect(maps.Keys(values))), r.URL.Path)
}

// queryValues parses the request's query. A pair it cannot read (a bad
// %-escape, a ';') is a 400: dropped, as r.URL.Query() drops it, a filter
// would silently list or act on every connection.
func queryValues(r *http.Request) (url.Values, error) {
	values, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, apiError(http.StatusBadRequest, "query %q: %v", r.URL.RawQuery, err)
	}
	return values, nil
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
