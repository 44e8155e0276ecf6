package modules

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// fakeAdmin is an admin API serving canned records, paged and filtered by
// chain ID as the real one does, and keeping the queries it was sent.
type fakeAdmin struct {
	addr    string
	records []layer4chain.RecordInfo

	mu      sync.Mutex
	queries []url.Values
	deleted []string
}

func startFakeAdmin(t *testing.T, records []layer4chain.RecordInfo) *fakeAdmin {
	t.Helper()
	f := &fakeAdmin{records: records}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /layer4chain/connections", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		f.mu.Lock()
		f.queries = append(f.queries, q)
		f.mu.Unlock()
		after, _ := strconv.ParseUint(q.Get("after"), 10, 64)
		limit, _ := strconv.Atoi(q.Get("limit"))
		page := []layer4chain.RecordInfo{}
		for _, rec := range f.records {
			if rec.ID <= after || (q.Has("chain_id") && !slices.Contains(q["chain_id"], rec.ChainID)) {
				continue
			}
			if limit > 0 && len(page) == limit {
				break
			}
			page = append(page, rec)
		}
		json.NewEncoder(w).Encode(page)
	})
	mux.HandleFunc("/layer4chain/connections/{id}", func(w http.ResponseWriter, r *http.Request) {
		for _, rec := range f.records {
			if strconv.FormatUint(rec.ID, 10) == r.PathValue("id") {
				if r.Method == http.MethodDelete {
					f.mu.Lock()
					f.deleted = append(f.deleted, r.PathValue("id"))
					f.mu.Unlock()
				}
				json.NewEncoder(w).Encode(rec)
				return
			}
		}
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, `{"error": "no live connection with id %s"}`, r.PathValue("id"))
	})
	mux.HandleFunc("GET /layer4chain/stats", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(layer4chain.Stats{ActiveTotal: 2, ConnectionsTotal: 9,
			Active: map[layer4chain.State]int64{layer4chain.StateEstablished: 2},
			Closed: map[layer4chain.CloseReason]int64{layer4chain.ReasonClientClosed: 7}})
	})
	mux.HandleFunc("GET /layer4chain/upstreams", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode([]layer4chain.UpstreamInfo{{Address: "127.0.0.1:9000", Health: layer4chain.HealthHealthy, ActiveConnections: 2}})
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	f.addr = strings.TrimPrefix(srv.URL, "http://")
	return f
}

// runCLI runs `caddy layer4chain args...` in this process and returns its
// output and error.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := &cobra.Command{Use: "layer4chain", SilenceErrors: true}
	cliCommands(root)
	var out bytes.Buffer
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(io.Discard)
	err := root.Execute()
	return out.String(), err
}

func record(id uint64, chainID string, hop int, upstream string) layer4chain.RecordInfo {
	return layer4chain.RecordInfo{ID: id, ChainID: chainID, Hop: hop, State: layer4chain.StateEstablished,
		Server: "127.0.0.1:8001", Client: "127.0.0.1:40000", OriginalClient: "127.0.0.9:5555", Upstream: upstream,
		Started: time.Now().Add(-3 * time.Second), BytesUp: 10 * int64(hop), BytesDown: 20 * int64(hop)}
}

func TestCLIListPagesThroughEveryRecordAndPassesFilters(t *testing.T) {
	checkLeaks(t)
	var records []layer4chain.RecordInfo
	for i := 1; i <= 2*listPageSize+7; i++ {
		records = append(records, record(uint64(i), fmt.Sprintf("c%d", i), 1, "127.0.0.1:9000"))
	}
	admin := startFakeAdmin(t, records)

	out, err := runCLI(t, "list", "--admin", admin.addr, "--json", "--state", "established", "--state", "half_closed",
		"--client", "127.0.0.0/8", "--chain-id", "x")
	if err != nil {
		t.Fatal(err)
	}
	var listed []layer4chain.RecordInfo
	if err := json.Unmarshal([]byte(out), &listed); err != nil {
		t.Fatalf("--json output is no JSON array of records: %v\n%.300s", err, out)
	}
	// The fake filters by chain ID only when asked; "x" matches nothing
	// here, so ask again without it for the paging.
	if len(listed) != 0 {
		t.Fatalf("chain-id x listed %d records", len(listed))
	}
	q := admin.queries[0]
	if !slices.Equal(q["state"], []string{"established", "half_closed"}) || q.Get("client") != "127.0.0.0/8" ||
		q.Get("chain_id") != "x" || q.Get("limit") != strconv.Itoa(listPageSize) {
		t.Fatalf("the filters reached the admin API as %v", q)
	}

	// An empty value is refused, not dropped: dropped, `list --chain-id
	// "$ID"` with $ID unset would list (and a script kill) everything.
	for _, flag := range []string{"--chain-id", "--upstream", "--client", "--state"} {
		if _, err := runCLI(t, "list", "--admin", admin.addr, flag, ""); err == nil || !strings.Contains(err.Error(), flag+": empty value") {
			t.Errorf("list %s '': %v, want an error naming the flag", flag, err)
		}
	}

	admin.queries = nil
	out, err = runCLI(t, "list", "--admin", admin.addr, "--json")
	if err != nil {
		t.Fatal(err)
	}
	listed = nil
	if err := json.Unmarshal([]byte(out), &listed); err != nil {
		t.Fatal(err)
	}
	if len(listed) != len(records) || listed[len(listed)-1].ID != records[len(records)-1].ID {
		t.Fatalf("list printed %d records, want %d", len(listed), len(records))
	}
	if len(admin.queries) != 3 || admin.queries[1].Get("after") != strconv.Itoa(listPageSize) {
		t.Fatalf("list paged with %d requests (%v), want 3, the second after %d", len(admin.queries), admin.queries, listPageSize)
	}
	for _, name := range []string{`"chain_id"`, `"bytes_up"`, `"original_client"`, `"state": "established"`} {
		if !strings.Contains(out, name) {
			t.Errorf("--json output lacks %s", name)
		}
	}

	out, err = runCLI(t, "list", "--admin", admin.addr)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(records)+1 || !regexpMatch(`^ID +CHAIN_ID +HOP +STATE +SERVER +ORIGINAL_CLIENT +UPSTREAM `, lines[0]) ||
		!regexpMatch(`^1 +c1 +1 +established +127\.0\.0\.1:8001 +127\.0\.0\.9:5555 +127\.0\.0\.1:9000 +10 +20 +[0-9]+s$`, lines[1]) {
		t.Fatalf("table:\n%s\n%s\n... (%d lines)", lines[0], lines[1], len(lines))
	}
}

func TestCLITraceOrdersHopsAndNamesTheBackend(t *testing.T) {
	checkLeaks(t)
	const id = "0123456789abcdef0123456789abcdef"
	inner := startFakeAdmin(t, []layer4chain.RecordInfo{record(4, "other", 2, "x"), record(5, id, 2, "127.0.0.1:8003")})
	outer := startFakeAdmin(t, []layer4chain.RecordInfo{record(9, id, 1, "127.0.0.1:8002")})

	// Inner first: the output must still be ordered by hop.
	out, err := runCLI(t, "trace", id, "--admin", inner.addr, "--admin", outer.addr)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	want := []string{
		`^chain ` + id + `$`,
		`^HOP +ADMIN +SERVER +ID +STATE +UP +DOWN +AGE +UPSTREAM +CLOSE$`,
		`^client +127\.0\.0\.9:5555$`,
		`^1 +` + outer.addr + ` +127\.0\.0\.1:8001 +9 +established +10 +20 +[0-9]+s +127\.0\.0\.1:8002 +-$`,
		`^2 +` + inner.addr + ` +127\.0\.0\.1:8001 +5 +established +20 +40 +[0-9]+s +127\.0\.0\.1:8003 +-$`,
		`^upstream of hop 2 +127\.0\.0\.1:8003 +the backend, if hop 2 is the last hop$`,
	}
	if len(lines) != len(want) {
		t.Fatalf("trace printed:\n%s", out)
	}
	for i, w := range want {
		if !regexpMatch(w, strings.TrimRight(lines[i], " ")) {
			t.Errorf("line %d %q does not match %s", i, lines[i], w)
		}
	}

	out, err = runCLI(t, "trace", id, "--admin", inner.addr, "--admin", outer.addr, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var tr struct {
		ChainID     string `json:"chain_id"`
		Client      string `json:"client"`
		Backend     string `json:"backend"`
		MissingHops []int  `json:"missing_hops"`
		Hops        []struct {
			Admin    string `json:"admin"`
			ID       uint64 `json:"id"`
			Hop      int    `json:"hop"`
			Upstream string `json:"upstream"`
			BytesUp  int64  `json:"bytes_up"`
		} `json:"hops"`
	}
	if err := json.Unmarshal([]byte(out), &tr); err != nil {
		t.Fatalf("trace --json: %v\n%s", err, out)
	}
	if !strings.Contains(out, `"missing_hops": []`) {
		t.Errorf("trace --json with no hop missing: missing_hops is not []:\n%s", out)
	}
	if tr.ChainID != id || tr.Client != "127.0.0.9:5555" || tr.Backend != "127.0.0.1:8003" || len(tr.Hops) != 2 ||
		tr.Hops[0].Admin != outer.addr || tr.Hops[0].ID != 9 || tr.Hops[1].Hop != 2 || tr.Hops[1].BytesUp != 20 {
		t.Fatalf("trace --json: %+v", tr)
	}
}

func TestCLITraceMarksAMissingHop(t *testing.T) {
	checkLeaks(t)
	first := startFakeAdmin(t, []layer4chain.RecordInfo{record(1, "c", 1, "127.0.0.1:8002")})
	third := startFakeAdmin(t, []layer4chain.RecordInfo{record(2, "c", 3, "127.0.0.1:8004")})
	tr, err := TraceChain("c", []string{first.addr, third.addr})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(tr.MissingHops, []int{2}) {
		t.Fatalf("missing hops %v, want [2]", tr.MissingHops)
	}
	out, err := runCLI(t, "trace", "c", "--admin", first.addr, "--admin", third.addr)
	if err != nil || !regexpMatch(`(?m)^2 +\(not found on the admin APIs given\)`, out) {
		t.Fatalf("trace with hop 2 missing (%v):\n%s", err, out)
	}
}

func TestCLITraceFailsWhenNoHopHasTheChainOrAnAdminIsUnreachable(t *testing.T) {
	checkLeaks(t)
	admin := startFakeAdmin(t, []layer4chain.RecordInfo{record(1, "known", 1, "u")})
	if _, err := runCLI(t, "trace", "unknown", "--admin", admin.addr); !errors.Is(err, ErrChainNotFound) ||
		!strings.Contains(err.Error(), admin.addr) {
		t.Fatalf("trace of an unknown chain ID: %v, want ErrChainNotFound naming %s", err, admin.addr)
	}
	dead := chaintest.RefusedAddr(t)
	out, err := runCLI(t, "trace", "known", "--admin", admin.addr, "--admin", dead)
	if err == nil || !strings.Contains(err.Error(), "admin API "+dead) || strings.Contains(err.Error(), "admin API "+admin.addr) {
		t.Fatalf("trace with an unreachable admin API: %v, want an error naming %s only", err, dead)
	}
	// What the others found is still printed: in an incident it is the
	// lead, and the unreachable admin API has a row of its own.
	if !regexpMatch(`(?m)^1 +`+regexp.QuoteMeta(admin.addr), out) || !regexpMatch(`(?m)^\? +`+regexp.QuoteMeta(dead)+` +\(no answer\) +.*connection refused`, out) {
		t.Fatalf("trace with an unreachable admin API printed:\n%s", out)
	}
	out, err = runCLI(t, "trace", "known", "--json", "--admin", admin.addr, "--admin", dead)
	var tr ChainTrace
	if err == nil || json.Unmarshal([]byte(out), &tr) != nil || len(tr.Hops) != 1 || len(tr.Unreachable) != 1 || tr.Unreachable[0].Admin != dead {
		t.Fatalf("trace --json with an unreachable admin API (%v):\n%s", err, out)
	}
	// Found nowhere that answered: the error says so besides naming the
	// unreachable one, and --json still prints, for scripts.
	out, err = runCLI(t, "trace", "unknown", "--json", "--admin", admin.addr, "--admin", dead)
	tr = ChainTrace{}
	if !errors.Is(err, ErrChainNotFound) || !strings.Contains(err.Error(), "admin API "+dead) ||
		json.Unmarshal([]byte(out), &tr) != nil || len(tr.Hops) != 0 || len(tr.Unreachable) != 1 {
		t.Fatalf("trace --json of a chain found nowhere, one admin API unreachable (%v):\n%s", err, out)
	}
	for _, args := range [][]string{{"list"}, {"show", "1"}, {"kill", "1"}, {"stats"}, {"upstreams"}} {
		if _, err := runCLI(t, append(args, "--admin", dead)...); err == nil || !strings.Contains(err.Error(), dead) {
			t.Errorf("%v against an unreachable admin API: %v, want an error naming %s", args, err, dead)
		}
	}
}

func TestCLIShowKillStatsUpstreams(t *testing.T) {
	checkLeaks(t)
	admin := startFakeAdmin(t, []layer4chain.RecordInfo{record(7, "c7", 1, "127.0.0.1:9000")})
	out, err := runCLI(t, "show", "7", "--admin", admin.addr)
	if err != nil || !regexpMatch(`(?m)^chain_id +c7$`, out) || !regexpMatch(`(?m)^upstream +127\.0\.0\.1:9000$`, out) {
		t.Fatalf("show (%v):\n%s", err, out)
	}
	if _, err := runCLI(t, "show", "8", "--admin", admin.addr); err == nil || !strings.Contains(err.Error(), "no live connection with id 8") {
		t.Fatalf("show of an unknown ID: %v", err)
	}
	if _, err := runCLI(t, "show", "seven", "--admin", admin.addr); err == nil || !strings.Contains(err.Error(), `"seven"`) {
		t.Fatalf("show of a malformed ID: %v", err)
	}
	out, err = runCLI(t, "kill", "7", "--admin", admin.addr, "--json")
	var killed layer4chain.RecordInfo
	if err != nil || json.Unmarshal([]byte(out), &killed) != nil || killed.ID != 7 || !slices.Equal(admin.deleted, []string{"7"}) {
		t.Fatalf("kill (%v): %s; deleted %v", err, out, admin.deleted)
	}
	out, err = runCLI(t, "stats", "--admin", admin.addr)
	if err != nil || !regexpMatch(`(?m)^active_total +2$`, out) || !regexpMatch(`(?m)^closed +client_closed=7$`, out) ||
		!regexpMatch(`(?m)^active +connecting=0 established=2 half_closed=0 closing=0$`, out) {
		t.Fatalf("stats (%v):\n%s", err, out)
	}
	out, err = runCLI(t, "upstreams", "--admin", admin.addr)
	if err != nil || !regexpMatch(`(?m)^127\.0\.0\.1:9000 +healthy +2 +0 +-$`, out) {
		t.Fatalf("upstreams (%v):\n%s", err, out)
	}
}

func regexpMatch(pattern, s string) bool { return regexp.MustCompile(pattern).MatchString(s) }

// TestCLITraceOfSomeHopsNamesTheLastHopsUpstream: given only the first
// hop's admin API, trace does not call that hop's upstream (the next hop)
// the backend; an admin address given twice is asked once.
func TestCLITraceOfSomeHopsNamesTheLastHopsUpstream(t *testing.T) {
	checkLeaks(t)
	const id = "0123456789abcdef0000000000000001"
	outer := startFakeAdmin(t, []layer4chain.RecordInfo{record(9, id, 1, "127.0.0.1:8002")})
	out, err := runCLI(t, "trace", id, "--admin", outer.addr, "--admin", "http://"+outer.addr+"/")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(out, outer.addr) != 1 || len(outer.queries) != 1 {
		t.Errorf("an admin address given twice was asked %d times, printed %d times:\n%s", len(outer.queries), strings.Count(out, outer.addr), out)
	}
	if regexpMatch(`(?m)^backend`, out) || !regexpMatch(`(?m)^upstream of hop 1 +127\.0\.0\.1:8002 +the backend, if hop 1 is the last hop *$`, out) {
		t.Errorf("trace of the first hop only:\n%s", out)
	}
}

// TestCLIAdminAddresses: --admin takes host:port or an http:// URL; a
// comma-separated list, an https:// URL and a port range are refused with
// a message that says what to give.
func TestCLIAdminAddresses(t *testing.T) {
	checkLeaks(t)
	admin := startFakeAdmin(t, nil)
	for _, a := range []string{admin.addr, "http://" + admin.addr, "http://" + admin.addr + "/", "tcp/" + admin.addr} {
		if _, err := runCLI(t, "stats", "--admin", a); err != nil {
			t.Errorf("stats --admin %s: %v", a, err)
		}
	}
	for arg, mention := range map[string]string{
		admin.addr + "," + admin.addr:      "repeat --admin for each hop",
		"https://" + admin.addr:            "plain HTTP",
		"localhost:2019-2020":              "port range",
		"":                                 "empty",
		"127.0.0.1":                        "no port; Caddy's default admin address is localhost:2019",
		"http://" + admin.addr + "/config": "has no path (got /config)",
		"unix:///run/caddy/admin.sock":     "written as Caddy's admin option writes it: unix//run/caddy/admin.sock",
		"/run/caddy/admin.sock":            "unix//run/caddy/admin.sock",
	} {
		if _, err := runCLI(t, "stats", "--admin", arg); err == nil || !strings.Contains(err.Error(), mention) {
			t.Errorf("stats --admin %q: %v, want an error mentioning %q", arg, err, mention)
		}
	}
	// Connection IDs are one process's: kill must not act on whichever
	// --admin came last.
	if _, err := runCLI(t, "kill", "1", "--admin", "127.0.0.1:1", "--admin", admin.addr); err == nil ||
		!strings.Contains(err.Error(), "--admin given 2 times: kill asks one hop's admin API") || len(admin.deleted) != 0 {
		t.Errorf("kill with two --admin: %v (%d deleted)", err, len(admin.deleted))
	}
	if _, err := runCLI(t, "trace", "c", "--admin", admin.addr, "--admin", "a:1,b:2"); err == nil ||
		!strings.Contains(err.Error(), `"a:1,b:2"`) || len(admin.queries) != 0 {
		t.Errorf("trace with a comma-separated --admin: %v (%d queries sent)", err, len(admin.queries))
	}
}

// TestCLISaysWhenTheAddressIsNoAdminAPI: an address that answers HTTP but
// not as the layer4chain admin API (a proxy port, a Caddy without the
// module) gets a message that says so instead of a JSON decoding error.
func TestCLISaysWhenTheAddressIsNoAdminAPI(t *testing.T) {
	checkLeaks(t)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/layer4chain/stats" {
			fmt.Fprintln(w, "original client: 127.0.0.1:4444")
			return
		}
		http.NotFound(w, r)
	}))
	defer web.Close()
	addr := strings.TrimPrefix(web.URL, "http://")
	for _, args := range [][]string{{"stats"}, {"list"}, {"show", "1"}, {"trace", "c"}} {
		_, err := runCLI(t, append(args, "--admin", addr)...)
		if err == nil || !strings.Contains(err.Error(), addr+" did not answer as Caddy's admin API with the layer4chain module (is it Caddy's admin address?)") ||
			strings.Contains(err.Error(), "invalid character") {
			t.Errorf("%v against a web server: %v", args, err)
		}
	}
	// A proxy port in front of an echo server answers with the request
	// itself; one in front of something else, with a line that is no HTTP.
	for _, answer := range []func(c *net.TCPConn){
		chaintest.Echo,
		func(c *net.TCPConn) { io.WriteString(c, "bye\r\n") },
	} {
		proxyPort := chaintest.NewBackend(t, answer)
		if _, err := runCLI(t, "stats", "--admin", proxyPort.Addr); err == nil ||
			!strings.Contains(err.Error(), proxyPort.Addr+" did not answer as Caddy's admin API with the layer4chain module") {
			t.Errorf("stats against a port that is no HTTP server: %v", err)
		}
	}
}

// TestCLISaysHowToNameAnAdminThatRefusesTheHost: Caddy's admin server
// refuses a request for another host than its admin option names (":2019"
// for "localhost:2019"); the command says how to write --admin instead of
// passing on only the 403.
func TestCLISaysHowToNameAnAdminThatRefusesTheHost(t *testing.T) {
	checkLeaks(t)
	admin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprintf(w, `{"error":"host not allowed: %s"}`, r.Host) // Caddy's words
	}))
	defer admin.Close()
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(admin.URL, "http://"))
	_, err := runCLI(t, "stats", "--admin", ":"+port)
	if err == nil || !strings.Contains(err.Error(), "host not allowed: :"+port+"; give --admin as the admin option spells it") {
		t.Errorf("stats --admin :%s against an admin API that refuses the host: %v", port, err)
	}
}

// TestCLIGivesUpOnAnAdminThatNeverAnswers: an address that accepts but
// never answers fails after adminTimeout, naming the address.
func TestCLIGivesUpOnAnAdminThatNeverAnswers(t *testing.T) {
	checkLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if c, err := ln.Accept(); err == nil {
			accepted <- c // held open, never answered
		}
	}()
	defer func() {
		ln.Close()
		<-done
		select {
		case c := <-accepted:
			c.Close()
		default:
		}
	}()
	defer func(d time.Duration) { adminTimeout = d }(adminTimeout)
	adminTimeout = 200 * time.Millisecond
	start := time.Now()
	_, err = runCLI(t, "stats", "--admin", ln.Addr().String())
	if err == nil || !strings.Contains(err.Error(), "admin API "+ln.Addr().String()+": no answer") {
		t.Fatalf("stats against a silent address: %v", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("gave up after %v, want about %v", took, adminTimeout)
	}
}

// TestCLIArgumentErrors: a missing or malformed argument gets a message
// that says what the command needs.
func TestCLIArgumentErrors(t *testing.T) {
	checkLeaks(t)
	admin := startFakeAdmin(t, nil)
	for _, c := range []struct {
		args    []string
		mention string
	}{
		{[]string{"show"}, "show needs a connection ID (caddy layer4chain show ID"},
		{[]string{"kill"}, "kill needs a connection ID (caddy layer4chain kill ID"},
		{[]string{"trace"}, "trace needs a chain ID (caddy layer4chain trace CHAIN_ID"},
		{[]string{"show", "1", "2"}, "show takes one argument, a connection ID; got 2"},
		{[]string{"show", "-1"}, `connection ID "-1": want a positive integer`},
		{[]string{"kill", "-12"}, `connection ID "-12": want a positive integer`},
		{[]string{"show", "0"}, `connection ID "0": want a positive integer`},
		{[]string{"kill", "abc"}, `connection ID "abc": want a positive integer`},
	} {
		if _, err := runCLI(t, append(c.args, "--admin", admin.addr)...); err == nil || !strings.Contains(err.Error(), c.mention) {
			t.Errorf("%v: %v, want an error mentioning %q", c.args, err, c.mention)
		}
	}
	if len(admin.queries)+len(admin.deleted) != 0 {
		t.Errorf("bad arguments still sent requests")
	}
}

func TestCLITraceCountsAConnectionOnceWhateverTheAdminIsCalled(t *testing.T) {
	checkLeaks(t)
	const id = "0123456789abcdef0123456789abcdef"
	outer := startFakeAdmin(t, []layer4chain.RecordInfo{record(9, id, 1, "127.0.0.1:8002")})
	_, port, _ := net.SplitHostPort(outer.addr)
	out, err := runCLI(t, "trace", id, "--admin", outer.addr, "--admin", "localhost:"+port, "--json")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(out, `"admin":`); n != 1 {
		t.Fatalf("one connection asked through two names of its admin API listed %d times:\n%s", n, out)
	}
}

func TestCLIListStopsWhenPagesDoNotAdvance(t *testing.T) {
	checkLeaks(t)
	// Not Caddy: every page is the same full page, whatever after says.
	page := make([]layer4chain.RecordInfo, listPageSize)
	for i := range page {
		page[i] = record(uint64(i+1), "c", 1, "x")
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(page)
	}))
	t.Cleanup(srv.Close)
	_, err := runCLI(t, "list", "--admin", strings.TrimPrefix(srv.URL, "http://"))
	if err == nil || !strings.Contains(err.Error(), "did not answer as Caddy's admin API") {
		t.Fatalf("list against pages that never advance: %v", err)
	}
}

func TestCLIUnknownSubcommandFails(t *testing.T) {
	for _, args := range [][]string{{"bogus"}, {"upstream", "--admin", "127.0.0.1:1"}, {"lst", "--json"}} {
		if _, err := runCLI(t, args...); err == nil || !strings.Contains(err.Error(), `unknown subcommand "`+args[0]+`"`) {
			t.Errorf("caddy layer4chain %v: %v", args, err)
		}
	}
	if _, err := runCLI(t, "--bogus"); err == nil || !strings.Contains(err.Error(), `no subcommand in "--bogus"`) {
		t.Errorf("a flag and no subcommand: %v", err)
	}
	for _, help := range []string{"--help", "-h", "help"} {
		if out, err := runCLI(t, help); err != nil || !strings.Contains(out, "trace") {
			t.Errorf("%s: %v\n%s", help, err, out)
		}
	}
	// Flags may come before the subcommand, --json included.
	admin := startFakeAdmin(t, nil)
	for _, args := range [][]string{{"--json", "stats", "--admin", admin.addr}, {"--admin", admin.addr, "--json", "stats"}} {
		if out, err := runCLI(t, args...); err != nil || !strings.HasPrefix(out, "{") {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
	}
}

// A record's texts can carry what a client sent (a dial error repeats a
// client's SNI): the table escapes control bytes, so none reaches the
// operator's terminal as a command.
func TestCLITablesEscapeControlBytes(t *testing.T) {
	checkLeaks(t)
	r := record(1, "c1", 1, "{l4.tls.server_name}:443")
	r.FailedDials = []layer4chain.DialAttempt{{Upstream: r.Upstream, Reason: layer4chain.ReasonConnectFailed,
		Error: "address evil\x1b[2J\x1b]0;TITLE\x07x:443: unexpected '['"}}
	admin := startFakeAdmin(t, []layer4chain.RecordInfo{r})
	out, err := runCLI(t, "show", "1", "--admin", admin.addr)
	if err != nil {
		t.Fatal(err)
	}
	if strings.ContainsAny(out, "\x1b\x07") || !strings.Contains(out, `evil\x1b[2J\x1b]0;TITLE\x07x`) {
		t.Fatalf("show printed %q, want the control bytes escaped", out)
	}
}
