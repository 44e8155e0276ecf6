package modules

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "layer4chain",
		Usage: "list|show|kill|stats|upstreams|trace",
		Short: "Shows the connections of layer4chain hops through their admin APIs",
		Long: `
Talks to the layer4chain admin API of running Caddy processes (the hops of a
chain): lists their connections, shows or closes one, prints the counts and the
upstreams, and follows one connection across every hop by its chain ID.

--admin is the admin address to ask, host:port or http://host:port (default:
Caddy's, localhost:2019 unless the CADDY_ADMIN environment variable says
otherwise); trace takes it once per hop, one address per --admin, and the
other commands once. --json prints what the admin API answers, for scripts;
without it the output is a table.

Exit status: 0 on success; 1 when the admin API cannot be reached or answers an
error, when show or kill find no such connection, and when trace finds the
chain ID on no hop.
`,
		CobraFunc: cliCommands,
	})
}

// listPageSize is how many records `list` asks for per request.
const listPageSize = 1000

// adminTimeout bounds each admin API request, so that an address that
// accepts but never answers does not hang the command. A variable only so
// that tests can shorten it.
var adminTimeout = 10 * time.Second

// cliCommands adds the subcommands to the `caddy layer4chain` command.
func cliCommands(root *cobra.Command) {
	// Without a subcommand, the help; with one it does not know, an error
	// (cobra alone would print the help and exit 0). The flags that follow
	// a mistyped subcommand are the subcommand's, not this command's to
	// refuse: its own flag parsing would answer `upstream --admin X` with
	// "unknown flag: --admin".
	root.Args = cobra.ArbitraryArgs
	root.DisableFlagParsing = true
	// Known here only so that cobra, looking for the subcommand, takes
	// `--json list` for a flag and a subcommand, not a flag and its value.
	root.PersistentFlags().Bool("json", false, "")
	_ = root.PersistentFlags().MarkHidden("json")
	root.RunE = func(cmd *cobra.Command, args []string) error {
		switch {
		case len(args) == 0 || args[0] == "help" || slices.Contains(args, "-h") || slices.Contains(args, "--help"):
			return cmd.Help()
		case strings.HasPrefix(args[0], "-"):
			return fmt.Errorf("no subcommand in %q: want list, show, kill, stats, upstreams or trace", strings.Join(args, " "))
		}
		return fmt.Errorf("unknown subcommand %q: want list, show, kill, stats, upstreams or trace", args[0])
	}
	root.AddCommand(
		cliCommand(&cobra.Command{
			Use:   "list [--state S] [--upstream U] [--client C] [--chain-id ID] [--admin ADDR] [--json]",
			Short: "Lists the live connections of one hop",
			Long: `Lists the live connections of one hop, in ID order. Each filter may be
repeated: values of one filter are alternatives, different filters must all
match. --client takes an IP, an IP:port or a CIDR and matches the socket peer
or the original client.`,
			Args: cobra.NoArgs,
		}, runList, "state", "upstream", "client", "chain-id"),
		cliCommand(&cobra.Command{
			Use:   "show ID [--admin ADDR] [--json]",
			Short: "Shows one connection, with the kernel's view of its sockets",
			Args:  oneArg("a connection ID", "caddy layer4chain show ID; list prints the IDs"),
		}, runShow),
		cliCommand(&cobra.Command{
			Use:   "kill ID [--admin ADDR] [--json]",
			Short: "Closes one connection (close reason admin)",
			Args:  oneArg("a connection ID", "caddy layer4chain kill ID; list prints the IDs"),
		}, runKill),
		cliCommand(&cobra.Command{
			Use:   "stats [--admin ADDR] [--json]",
			Short: "Prints the counts: connections by state, closes by reason, failures, bytes",
			Args:  cobra.NoArgs,
		}, runStats),
		cliCommand(&cobra.Command{
			Use:   "upstreams [--admin ADDR] [--json]",
			Short: "Lists the upstreams of the loaded configs with their health",
			Args:  cobra.NoArgs,
		}, runUpstreams),
		cliCommand(&cobra.Command{
			Use:   "trace CHAIN_ID --admin ADDR [--admin ADDR ...] [--json]",
			Short: "Follows one connection across hops by its chain ID",
			Long: `Asks every given admin API, at once, for the connections carrying the chain
ID and prints the path hop by hop, ordered by hop number: the client, each
hop's connection (admin address, listener, state, bytes up and down, age,
upstream, close reason) and the upstream of the last hop found, which is the
backend when every hop's admin API was given. Exit status 1 when no hop has the
chain ID.`,
			Args: oneArg("a chain ID", "caddy layer4chain trace CHAIN_ID --admin ADDR [--admin ADDR ...]"),
		}, runTrace),
	)
}

// cliRun runs one subcommand; out is where it prints.
type cliRun func(cmd *cobra.Command, args []string, out io.Writer) error

// cliCommand gives a subcommand its flags (--admin, --json and the
// repeatable filters named) and its run function.
func cliCommand(cmd *cobra.Command, run cliRun, filters ...string) *cobra.Command {
	if cmd.Name() == "trace" {
		cmd.Flags().StringArray("admin", []string{caddy.DefaultAdminListen}, "admin API address of a hop (repeat for each hop)")
	} else {
		// An array too, so that a second --admin is refused rather than
		// silently taking the place of the first (see adminFlag).
		cmd.Flags().StringArray("admin", []string{caddy.DefaultAdminListen}, "admin API address")
	}
	cmd.Flags().Bool("json", false, "print JSON (the admin API's field names) instead of a table")
	for _, f := range filters {
		cmd.Flags().StringArray(f, nil, "only connections with this "+strings.ReplaceAll(f, "-", " ")+" (repeatable: any of them)")
	}
	cmd.SilenceUsage = true // a failed request is no usage error
	cmd.SetFlagErrorFunc(flagError)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		return run(cmd, args, cmd.OutOrStdout())
	}
	return cmd
}

// oneArg requires exactly one argument, what, and says how the command is
// used when it is missing.
func oneArg(what, usage string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		switch len(args) {
		case 1:
			return nil
		case 0:
			return fmt.Errorf("%s needs %s (%s)", cmd.Name(), what, usage)
		}
		return fmt.Errorf("%s takes one argument, %s; got %d: %s", cmd.Name(), what, len(args), strings.Join(args, " "))
	}
}

// negativeArg finds a negative number that pflag took for a shorthand
// flag, as in `show -1`.
var negativeArg = regexp.MustCompile(`^unknown shorthand flag: '[0-9]' in (-[0-9]+)$`)

// flagError rewords pflag's error for a negative connection ID.
func flagError(cmd *cobra.Command, err error) error {
	if m := negativeArg.FindStringSubmatch(err.Error()); m != nil && (cmd.Name() == "show" || cmd.Name() == "kill") {
		_, idErr := connectionID(m[1])
		return idErr
	}
	return err
}

// adminAddress reads one --admin value: an address as Caddy's admin option
// takes it (host:port, unix//path), or an http:// URL of one, as browsers
// and curl spell it.
func adminAddress(v string) (string, error) {
	switch {
	case strings.Contains(v, ","):
		return "", fmt.Errorf("--admin %q: one address per --admin; repeat --admin for each hop", v)
	case strings.HasPrefix(v, "https://"):
		return "", fmt.Errorf("--admin %q: the admin API this command asks is plain HTTP: give its host:port", v)
	case strings.HasPrefix(v, "unix:/"), strings.HasPrefix(v, "/"):
		path := "/" + strings.TrimLeft(strings.TrimPrefix(v, "unix:"), "/")
		return "", fmt.Errorf("--admin %q: a Unix socket is written as Caddy's admin option writes it: unix/%s", v, path)
	}
	addr, isURL := strings.CutPrefix(v, "http://")
	addr = strings.TrimSuffix(addr, "/")
	if addr == "" {
		return "", errors.New("--admin: empty address")
	}
	if _, path, ok := strings.Cut(addr, "/"); ok && isURL {
		return "", fmt.Errorf("--admin %q: the admin API's address has no path (got /%s): give http://host:port or host:port", v, path)
	}
	na, err := caddy.ParseNetworkAddress(addr)
	switch {
	case err != nil:
	case na.PortRangeSize() > 1:
		err = errors.New("a port range; want one port")
	case !na.IsUnixNetwork() && na.StartPort == 0:
		err = fmt.Errorf("no port; Caddy's default admin address is %s", caddy.DefaultAdminListen)
	}
	if err != nil {
		return "", fmt.Errorf("--admin %q: %v", v, err)
	}
	return addr, nil
}

// adminFlag reads the command's --admin values: one per hop for trace,
// exactly one for the other commands, whose connection IDs are one
// process's.
func adminFlag(cmd *cobra.Command) ([]string, error) {
	values := flagValues(cmd, "admin")
	if len(values) > 1 && cmd.Name() != "trace" {
		return nil, fmt.Errorf("--admin given %d times: %s asks one hop's admin API (only trace takes one --admin per hop)", len(values), cmd.Name())
	}
	addrs := make([]string, 0, len(values))
	for _, v := range values {
		addr, err := adminAddress(v)
		if err != nil {
			return nil, err
		}
		addrs = append(addrs, addr)
	}
	return addrs, nil
}

// adminRequest sends one request to the admin API at addr (an address as
// Caddy's admin option takes it) and decodes the JSON answer into v. Every
// error names the admin address. It sends what caddycmd.AdminAPIRequest
// sends (the Origin header Caddy's admin server checks; none on a unix
// socket), which takes no deadline.
func adminRequest(addr, method, uri string, v any) error {
	na, err := caddy.ParseNetworkAddress(addr)
	if err != nil {
		return fmt.Errorf("admin API %s: %v", addr, err)
	}
	origin, dial := "http://"+na.JoinHostPort(0), na.JoinHostPort(0)
	if na.IsUnixNetwork() {
		origin = "http://127.0.0.1"            // any host: the socket is the address
		dial, _, _ = strings.Cut(na.Host, "|") // the socket's permission bits are no part of its path
	}
	ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, origin+uri, nil)
	if err != nil {
		return fmt.Errorf("admin API %s: %v", addr, err)
	}
	if !na.IsUnixNetwork() {
		req.Header.Set("Origin", origin)
	}
	client := http.Client{Transport: &http.Transport{
		DisableKeepAlives: true, // one request per command: nothing to keep alive
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, na.Network, dial)
		},
	}}
	resp, err := client.Do(req)
	if err != nil && method == http.MethodGet && !errors.Is(err, context.DeadlineExceeded) {
		// A reload replaces the admin server and closes the old one's
		// listener in the background; a request queued there just then is
		// dropped. A GET changes nothing, so it is sent once more.
		resp, err = client.Do(req)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("admin API %s: no answer to %s %s within %v", addr, method, uri, adminTimeout)
	}
	notAdmin := func(what string) error {
		return fmt.Errorf("%s did not answer as Caddy's admin API with the layer4chain module (is it Caddy's admin address?): %s %s: %s",
			addr, method, uri, what)
	}
	if err != nil {
		var ue *url.Error // it repeats the method and the URL
		if errors.As(err, &ue) {
			err = ue.Err
		}
		if oe := (*net.OpError)(nil); !errors.As(err, &oe) || oe.Op != "dial" {
			// Connected, but what came back was no HTTP answer (a proxy
			// port echoing the request, a server that hung up): not the
			// admin API, whatever is listening there.
			return notAdmin(err.Error())
		}
		return fmt.Errorf("admin API %s: %s %s: %w", addr, method, uri, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 400 {
		var e struct {
			Error string `json:"error"`
		}
		if json.NewDecoder(resp.Body).Decode(&e) != nil || e.Error == "" {
			return notAdmin(resp.Status + " without a JSON error")
		}
		if resp.StatusCode == http.StatusForbidden && strings.HasPrefix(e.Error, "host not allowed") {
			// Caddy's admin server takes requests only for the address its
			// admin option names (localhost, 127.0.0.1 and ::1 for a
			// loopback one): ":2019" is another.
			e.Error += "; give --admin as the admin option spells it (for a loopback admin address, localhost:PORT or 127.0.0.1:PORT)"
		}
		return fmt.Errorf("admin API %s: %s %s: %s: %s", addr, method, uri, resp.Status, e.Error)
	}
	body := io.LimitReader(resp.Body, maxAdminAnswer+1)
	var n countingReader
	n.r = body
	if err := json.NewDecoder(&n).Decode(v); err != nil {
		if n.n > maxAdminAnswer {
			return notAdmin(fmt.Sprintf("an answer larger than %d MiB", maxAdminAnswer>>20))
		}
		return notAdmin(resp.Status + ", but no JSON of the expected shape")
	}
	return nil
}

// maxAdminAnswer bounds what the command reads from one admin answer: a
// page of connections is well under a MiB, so more is not Caddy's.
const maxAdminAnswer = 64 << 20

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}

// listAll pages through GET /layer4chain/connections with the query's
// filters, limit and after, and returns every matching record.
func listAll(addr string, filters url.Values) ([]layer4chain.RecordInfo, error) {
	all := []layer4chain.RecordInfo{}
	q := url.Values{}
	for k, v := range filters {
		q[k] = v
	}
	q.Set("limit", strconv.Itoa(listPageSize))
	for after := uint64(0); ; {
		q.Set("after", strconv.FormatUint(after, 10))
		var page []layer4chain.RecordInfo
		if err := adminRequest(addr, http.MethodGet, "/layer4chain/connections?"+q.Encode(), &page); err != nil {
			return nil, err
		}
		all = append(all, page...)
		if len(page) < listPageSize {
			return all, nil
		}
		last := page[len(page)-1].ID
		if last <= after {
			// Caddy's pages always advance: this is not its admin API, and
			// asking again would never end.
			return nil, fmt.Errorf("%s did not answer as Caddy's admin API with the layer4chain module: a page after id %d ended at id %d", addr, after, last)
		}
		after = last
	}
}

// flagValues returns the values given to a repeatable flag, as given:
// pflag's GetStringArray turns a lone empty value into no value at all.
func flagValues(cmd *cobra.Command, name string) []string {
	return cmd.Flags().Lookup(name).Value.(pflag.SliceValue).GetSlice()
}

func runList(cmd *cobra.Command, _ []string, out io.Writer) error {
	filters := url.Values{}
	for _, flag := range []string{"state", "upstream", "client", "chain-id"} {
		vs := flagValues(cmd, flag)
		if slices.Contains(vs, "") {
			// Dropped, it would list every connection: a script's
			// `list --chain-id "$ID" | kill` must not kill them all.
			return fmt.Errorf("--%s: empty value", flag)
		}
		if len(vs) > 0 {
			filters[strings.ReplaceAll(flag, "-", "_")] = vs
		}
	}
	admin, err := adminFlag(cmd)
	if err != nil {
		return err
	}
	list, err := listAll(admin[0], filters)
	if err != nil {
		return err
	}
	if asJSON(cmd) {
		return printJSON(out, list)
	}
	now := time.Now()
	tw := newTable(out)
	fmt.Fprintln(tw, "ID\tCHAIN_ID\tHOP\tSTATE\tSERVER\tORIGINAL_CLIENT\tUPSTREAM\tUP\tDOWN\tAGE")
	for _, c := range list {
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", c.ID, dash(c.ChainID), c.Hop, c.State, dash(c.Server),
			clientOf(c), dash(c.Upstream), c.BytesUp, c.BytesDown, age(c.Started, now))
	}
	return tw.Flush()
}

// connectionID reads a connection ID argument.
func connectionID(arg string) (uint64, error) {
	id, err := strconv.ParseUint(arg, 10, 64)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("connection ID %q: want a positive integer (the ID column of caddy layer4chain list)", arg)
	}
	return id, nil
}

func runShow(cmd *cobra.Command, args []string, out io.Writer) error {
	return oneConnection(cmd, args[0], http.MethodGet, out)
}

func runKill(cmd *cobra.Command, args []string, out io.Writer) error {
	return oneConnection(cmd, args[0], http.MethodDelete, out)
}

// oneConnection GETs or DELETEs one connection and prints it.
func oneConnection(cmd *cobra.Command, arg, method string, out io.Writer) error {
	id, err := connectionID(arg)
	if err != nil {
		return err
	}
	admin, err := adminFlag(cmd)
	if err != nil {
		return err
	}
	var c layer4chain.RecordInfo
	if err := adminRequest(admin[0], method, fmt.Sprintf("/layer4chain/connections/%d", id), &c); err != nil {
		return err
	}
	if asJSON(cmd) {
		return printJSON(out, c)
	}
	tw := newTable(out)
	if method == http.MethodDelete {
		fmt.Fprintf(tw, "closing connection %d (close reason admin)\n", c.ID)
	}
	now := time.Now()
	rows := [][2]string{
		{"id", strconv.FormatUint(c.ID, 10)}, {"chain_id", dash(c.ChainID)}, {"hop", strconv.Itoa(c.Hop)},
		{"state", c.State.String()}, {"server", dash(c.Server)}, {"client", c.Client},
		{"original_client", dash(c.OriginalClient)}, {"upstream", dash(c.Upstream)},
		{"started", c.Started.Format(time.RFC3339Nano) + " (" + age(c.Started, now) + " ago)"},
		{"last_activity", c.LastActivity.Format(time.RFC3339Nano) + " (" + age(c.LastActivity, now) + " ago)"},
		{"bytes_up", strconv.FormatInt(c.BytesUp, 10)}, {"bytes_down", strconv.FormatInt(c.BytesDown, 10)},
	}
	if c.UpstreamTemplate != "" {
		rows = append(rows, [2]string{"upstream_template", c.UpstreamTemplate})
	}
	if c.Established != nil {
		rows = append(rows, [2]string{"established", c.Established.Format(time.RFC3339Nano)})
	}
	if c.Reason != "" {
		rows = append(rows, [2]string{"close", closeOf(c)})
	}
	for i, d := range c.FailedDials {
		rows = append(rows, [2]string{fmt.Sprintf("failed_dial[%d]", i), fmt.Sprintf("%s %s after %v: %s", d.Upstream, d.Reason, d.Duration, d.Error)})
	}
	for _, s := range []struct {
		name string
		info *layer4chain.SocketInfo
	}{{"client_socket", c.ClientSocket}, {"upstream_socket", c.UpstreamSocket}} {
		if s.info != nil {
			rows = append(rows, [2]string{s.name, fmt.Sprintf("rtt %v, rtt_var %v, retransmits %d, unacked %d",
				s.info.RTT, s.info.RTTVar, s.info.Retransmits, s.info.Unacked)})
		}
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}

func runStats(cmd *cobra.Command, _ []string, out io.Writer) error {
	admin, err := adminFlag(cmd)
	if err != nil {
		return err
	}
	var st layer4chain.Stats
	if err := adminRequest(admin[0], http.MethodGet, "/layer4chain/stats", &st); err != nil {
		return err
	}
	if asJSON(cmd) {
		return printJSON(out, st)
	}
	tw := newTable(out)
	var active []string
	for _, s := range layer4chain.States {
		active = append(active, fmt.Sprintf("%s=%d", s, st.Active[s]))
	}
	fmt.Fprintf(tw, "active_total\t%d\n", st.ActiveTotal)
	fmt.Fprintf(tw, "active\t%s\n", strings.Join(active, " "))
	fmt.Fprintf(tw, "connections_total\t%d\n", st.ConnectionsTotal)
	fmt.Fprintf(tw, "closed\t%s\n", nonZero(st.Closed))
	fmt.Fprintf(tw, "dial_failures\t%s\n", nonZero(st.DialFailures))
	fmt.Fprintf(tw, "proxy_protocol_rejected\t%s\n", nonZero(st.ProxyProtocolRejected))
	fmt.Fprintf(tw, "bytes_up\t%d\n", st.BytesUp)
	fmt.Fprintf(tw, "bytes_down\t%d\n", st.BytesDown)
	fmt.Fprintf(tw, "sweeps\t%d\n", st.Sweeps)
	fmt.Fprintf(tw, "zombies_reaped\t%d\n", st.ZombiesReaped)
	fmt.Fprintf(tw, "draining\t%t\n", st.Draining)
	return tw.Flush()
}

// nonZero prints a count map's non-zero entries as "key=n", sorted, or "-".
func nonZero[K ~string](m map[K]int64) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if m[k] != 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
		}
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, " ")
}

func runUpstreams(cmd *cobra.Command, _ []string, out io.Writer) error {
	admin, err := adminFlag(cmd)
	if err != nil {
		return err
	}
	var list []layer4chain.UpstreamInfo
	if err := adminRequest(admin[0], http.MethodGet, "/layer4chain/upstreams", &list); err != nil {
		return err
	}
	if asJSON(cmd) {
		return printJSON(out, list)
	}
	tw := newTable(out)
	fmt.Fprintln(tw, "ADDRESS\tHEALTH\tACTIVE\tFAILURES\tLAST_ERROR")
	for _, u := range list {
		lastErr := dash(u.LastError)
		if u.LastErrorAt != nil {
			lastErr += " (" + age(*u.LastErrorAt, time.Now()) + " ago)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\n", u.Address, u.Health, u.ActiveConnections, u.ConsecutiveFailures, lastErr)
	}
	return tw.Flush()
}

// TraceHop is one hop's connection in a trace: the admin API's record and
// the admin address that reported it.
type TraceHop struct {
	// Admin is the admin API address that listed the connection.
	Admin string `json:"admin"`
	layer4chain.RecordInfo
}

// ChainTrace is the path of one chain ID across hops, as `caddy layer4chain
// trace --json` prints it.
type ChainTrace struct {
	// ChainID is the chain ID followed.
	ChainID string `json:"chain_id"`
	// Client is the original client, as the first hop found knows it.
	Client string `json:"client"`
	// Hops lists the connections found, ordered by hop number.
	Hops []TraceHop `json:"hops"`
	// MissingHops lists the hop numbers below the last one found that no
	// admin API reported; empty, not null, when none is missing.
	MissingHops []int `json:"missing_hops"`
	// Backend is the upstream of the last hop found ("" while it is
	// connecting): the backend when the admin APIs of every hop were
	// asked, else the next hop, which no admin API given reported.
	Backend string `json:"backend"`
	// Unreachable lists the admin APIs that could not be asked, and why;
	// empty, not null, when every one answered.
	Unreachable []TraceFailure `json:"unreachable"`
}

// TraceFailure is an admin API a trace could not ask.
type TraceFailure struct {
	// Admin is the address given.
	Admin string `json:"admin"`
	// Error says what went wrong.
	Error string `json:"error"`
}

// ErrChainNotFound is returned by trace when no hop has the chain ID.
var ErrChainNotFound = errors.New("chain ID found on no hop")

func runTrace(cmd *cobra.Command, args []string, out io.Writer) error {
	admins, err := adminFlag(cmd)
	if err != nil {
		return err
	}
	// The hops found are printed even when an admin API did not answer
	// (then the command still fails): in an incident, they are the lead.
	tr, err := TraceChain(args[0], admins)
	if asJSON(cmd) {
		if perr := printJSON(out, tr); perr != nil {
			return perr
		}
		return err
	}
	if len(tr.Hops) == 0 {
		return err
	}
	now := time.Now()
	fmt.Fprintf(out, "chain %s\n", tr.ChainID)
	tw := newTable(out)
	fmt.Fprintln(tw, "HOP\tADMIN\tSERVER\tID\tSTATE\tUP\tDOWN\tAGE\tUPSTREAM\tCLOSE")
	fmt.Fprintf(tw, "client\t\t\t\t\t\t\t\t%s\t\n", dash(tr.Client))
	for i, h := range tr.Hops {
		for _, m := range tr.MissingHops {
			if m < h.Hop && (i == 0 || m > tr.Hops[i-1].Hop) {
				fmt.Fprintf(tw, "%d\t(not found on the admin APIs given)\t\t\t\t\t\t\t\t\n", m)
			}
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%d\t%d\t%s\t%s\t%s\n", h.Hop, h.Admin, dash(h.Server), h.ID, h.State,
			h.BytesUp, h.BytesDown, age(h.Started, now), dash(h.Upstream), closeOf(h.RecordInfo))
	}
	last := tr.Hops[len(tr.Hops)-1].Hop
	fmt.Fprintf(tw, "upstream of hop %d\t\t\t\t\t\t\t\t%s\tthe backend, if hop %d is the last hop\n", last, dash(tr.Backend), last)
	for _, u := range tr.Unreachable {
		fmt.Fprintf(tw, "?\t%s\t(no answer)\t\t\t\t\t\t\t%s\n", u.Admin, u.Error)
	}
	if ferr := tw.Flush(); ferr != nil {
		return ferr
	}
	return err
}

// sameRecord says whether two answers describe one connection: the same
// listener, record ID and admission time (no two processes listen on one
// address with the same ID at the same instant).
func sameRecord(a, b layer4chain.RecordInfo) bool {
	return a.Server == b.Server && a.ID == b.ID && a.Started.Equal(b.Started)
}

// TraceChain asks every admin API (addresses as Caddy's admin option takes
// them; one given twice is asked once) at once for the chain ID's
// connections and orders what they answer by hop; it is what `caddy
// layer4chain trace` prints. When an admin API cannot be asked it returns
// what the others answered with an error naming each that failed; with
// ErrChainNotFound when all answered and none has the chain ID.
func TraceChain(chainID string, admins []string) (ChainTrace, error) {
	if chainID == "" {
		return ChainTrace{}, errors.New("chain ID: empty")
	}
	var unique []string
	for _, a := range admins {
		if !slices.Contains(unique, a) {
			unique = append(unique, a)
		}
	}
	admins = unique
	type answer struct {
		list []layer4chain.RecordInfo
		err  error
	}
	answers := make([]answer, len(admins))
	var wg sync.WaitGroup
	for i, addr := range admins {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var list []layer4chain.RecordInfo
			err := adminRequest(addr, http.MethodGet, "/layer4chain/connections?chain_id="+url.QueryEscape(chainID), &list)
			answers[i] = answer{list, err}
		}()
	}
	wg.Wait()
	tr := ChainTrace{ChainID: chainID, Hops: []TraceHop{}, MissingHops: []int{}, Unreachable: []TraceFailure{}}
	var errs []error
	for i, a := range answers {
		if a.err != nil {
			errs = append(errs, a.err)
			tr.Unreachable = append(tr.Unreachable, TraceFailure{Admin: admins[i], Error: a.err.Error()})
			continue
		}
		for _, info := range a.list {
			// Two names for one admin API (localhost and 127.0.0.1) answer
			// with the same records: keep each once.
			if !slices.ContainsFunc(tr.Hops, func(h TraceHop) bool { return sameRecord(h.RecordInfo, info) }) {
				tr.Hops = append(tr.Hops, TraceHop{Admin: admins[i], RecordInfo: info})
			}
		}
	}
	if len(tr.Hops) == 0 {
		var answered []string
		for i, a := range answers {
			if a.err == nil {
				answered = append(answered, admins[i])
			}
		}
		if len(answered) == 0 {
			return tr, errors.Join(errs...)
		}
		return tr, errors.Join(append([]error{fmt.Errorf("%w: %s (asked %s)", ErrChainNotFound, chainID, strings.Join(answered, ", "))}, errs...)...)
	}
	// Stable: hops with one number (a chain through one process twice)
	// keep the order of the admin addresses given.
	slices.SortStableFunc(tr.Hops, func(a, b TraceHop) int { return cmp.Compare(a.Hop, b.Hop) })
	first, last := tr.Hops[0], tr.Hops[len(tr.Hops)-1]
	tr.Client = clientOf(first.RecordInfo)
	tr.Backend = last.Upstream
	for n, i := 1, 0; n < last.Hop; n++ {
		for i < len(tr.Hops) && tr.Hops[i].Hop < n {
			i++
		}
		if tr.Hops[i].Hop != n {
			tr.MissingHops = append(tr.MissingHops, n)
		}
	}
	return tr, errors.Join(errs...)
}

// clientOf is the connection's original client, or its socket peer when
// no PROXY header told one.
func clientOf(c layer4chain.RecordInfo) string {
	if c.OriginalClient != "" {
		return c.OriginalClient
	}
	return c.Client
}

// closeOf is "reason: detail", or "-" while the connection lives.
func closeOf(c layer4chain.RecordInfo) string {
	switch {
	case c.Reason == "":
		return "-"
	case c.Detail == "":
		return string(c.Reason)
	}
	return string(c.Reason) + ": " + c.Detail
}

// age is how long ago t was, rounded for people.
func age(t, now time.Time) string {
	d := now.Sub(t)
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func asJSON(cmd *cobra.Command) bool {
	v, _ := cmd.Flags().GetBool("json")
	return v
}

func printJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(out io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(escapingControls{out}, 0, 0, 2, ' ', 0)
}

// escapingControls writes control bytes other than the table's tab and
// newline as \xNN: a record's texts (a dial error that repeats a client's
// SNI, say) must not drive the operator's terminal.
type escapingControls struct{ w io.Writer }

func (e escapingControls) Write(p []byte) (int, error) {
	if !slices.ContainsFunc(p, isControl) {
		return e.w.Write(p)
	}
	out := make([]byte, 0, len(p)+16)
	for _, b := range p {
		if isControl(b) {
			out = fmt.Appendf(out, "\\x%02x", b)
		} else {
			out = append(out, b)
		}
	}
	if _, err := e.w.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

func isControl(b byte) bool { return (b < 0x20 && b != '\t' && b != '\n') || b == 0x7f }
