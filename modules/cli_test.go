package modules

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	if len(lines) != len(records)+1 || !strings.HasPrefix(lines[0], "ID ") ||
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
		`^backend +127\.0\.0\.1:8003$`,
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
		ChainID string `json:"chain_id"`
		Client  string `json:"client"`
		Backend string `json:"backend"`
		Hops    []struct {
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
	_, err := runCLI(t, "trace", "known", "--admin", admin.addr, "--admin", dead)
	if err == nil || !strings.Contains(err.Error(), "admin API "+dead) || strings.Contains(err.Error(), "admin API "+admin.addr) {
		t.Fatalf("trace with an unreachable admin API: %v, want an error naming %s only", err, dead)
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
