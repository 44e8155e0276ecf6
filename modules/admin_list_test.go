package modules

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// dialFrom connects to addr from the loopback address local.
func dialFrom(t *testing.T, local, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}, Timeout: 2 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, local, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func listIDs(list []layer4chain.RecordInfo) []uint64 {
	out := []uint64{}
	for _, info := range list {
		out = append(out, info.ID)
	}
	return out
}

// TestConnectionListPagesAndFilters: paging with limit and after walks
// every record once in ID order; repeated values of one filter are
// alternatives and different filters must all match; client takes an IP,
// an IP:port or a CIDR.
func TestConnectionListPagesAndFilters(t *testing.T) {
	checkLeaks(t)
	backend := chaintest.NewEchoBackend(t)
	addr := chaintest.FreeAddr(t)
	admin := startCaddyWithAdmin(t, map[string]any{"hop": server(addr, map[string]any{"upstreams": upstreams(backend.Addr)})}, nil)

	locals := []string{"127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.1", "127.0.0.3", "127.0.0.2"}
	conns := make([]net.Conn, len(locals))
	for i, local := range locals {
		conns[i] = dialFrom(t, local, addr)
		roundTrip(t, conns[i], "listed")
	}
	all := admin.connections("")
	if len(all) != len(locals) || !slices.IsSorted(listIDs(all)) {
		t.Fatalf("unpaged list: %v, want %d records in ID order", listIDs(all), len(locals))
	}

	var paged []uint64
	pages := 0
	for after := uint64(0); ; pages++ {
		page := admin.connections(fmt.Sprintf("?limit=3&after=%d", after))
		if len(page) > 3 {
			t.Fatalf("a page of limit 3 has %d records", len(page))
		}
		paged = append(paged, listIDs(page)...)
		if len(page) < 3 {
			break
		}
		after = page[len(page)-1].ID
	}
	if !slices.Equal(paged, listIDs(all)) || pages != 2 {
		t.Fatalf("paging by 3 gave %v in %d pages, want %v in 3", paged, pages+1, listIDs(all))
	}
	if got := admin.connections(fmt.Sprintf("?after=%d", all[4].ID)); !slices.Equal(listIDs(got), listIDs(all[5:])) {
		t.Fatalf("after=%d: %v, want %v", all[4].ID, listIDs(got), listIDs(all[5:]))
	}

	if got := admin.connections("?after=18446744073709551615"); len(got) != 0 {
		t.Fatalf("after the largest id: %v, want none", listIDs(got))
	}

	count := func(query string) int { return len(admin.connections(query)) }
	for query, want := range map[string]int{
		"?state=established":                             7,
		"?state=connecting":                              0,
		"?state=connecting&state=established":            7,
		"?client=127.0.0.2":                              3,
		"?client=127.0.0.2&client=127.0.0.3":             5,
		"?client=127.0.0.2/31":                           5, // .2 and .3
		"?client=127.0.0.0/8":                            7,
		"?client=::ffff:127.0.0.3":                       2,
		"?client=" + conns[0].LocalAddr().String():       1,
		"?client=127.0.0.2&upstream=" + backend.Addr:     3,
		"?client=127.0.0.2&upstream=127.0.0.1:1":         0,
		"?upstream=127.0.0.1:1&upstream=" + backend.Addr: 7,
		"?upstream=tcp/" + backend.Addr:                  7, // as a config may spell it
		"?chain_id=" + all[0].ChainID + "&chain_id=" + all[6].ChainID + "&chain_id=" + all[0].ChainID: 2,
		"?chain_id=" + all[0].ChainID + "&client=127.0.0.2":                                           0,
		"?client=127.0.0.2&limit=2": 2,
	} {
		if got := count(query); got != want {
			t.Errorf("%s lists %d records, want %d", query, got, want)
		}
	}
	if got := admin.connections("?client=127.0.0.2&limit=2&after=" + fmt.Sprint(all[1].ID)); len(got) != 2 ||
		got[0].ID != all[2].ID || got[1].ID != all[6].ID {
		t.Errorf("filtered page after %d: %v, want [%d %d]", all[1].ID, listIDs(got), all[2].ID, all[6].ID)
	}

	for query, mention := range map[string]string{
		"?limit=0":                     "limit",
		"?limit=abc":                   "limit",
		"?limit=10001":                 "10000",
		"?after=-1":                    "after",
		"?client=10.0.0.0/33":          "client",
		"?state=connecting&state=open": "open",
		"?page=2":                      "page",
		"?limit=2&limit=3":             "limit: given 2 times",
		"?after=1&limit=2&after=5":     "after: given 2 times",
		"?chain_id=":                   "filter chain_id: empty value",
		"?upstream=":                   "filter upstream: empty value",
		"?client=&client=127.0.0.2":    "filter client: empty value",
		"?state=":                      "filter state: empty value",
		"?upstream=127.0.0.1":          "filter upstream: \"127.0.0.1\" is not host:port",
	} {
		status, body := admin.do(http.MethodGet, "/layer4chain/connections"+query)
		var e struct{ Error string }
		if err := json.Unmarshal(body, &e); err != nil || status != http.StatusBadRequest || !strings.Contains(e.Error, mention) {
			t.Errorf("%s: %d %s, want 400 and a JSON error mentioning %q", query, status, body, mention)
		}
	}
	for _, c := range conns {
		c.Close()
	}
	waitEmpty(t)
}
