package integration

import (
	"bufio"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// caddyCLI runs `caddy layer4chain args...` and returns its standard
// output and exit status.
func caddyCLI(t testing.TB, args ...string) (string, int) {
	t.Helper()
	out, _, code := caddyCLIErr(t, args...)
	return out, code
}

// caddyCLIErr is caddyCLI that returns the standard error too.
func caddyCLIErr(t testing.TB, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(caddyBinary(t), append([]string{"layer4chain"}, args...)...)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir())
	var errOut strings.Builder
	cmd.Stderr = &errOut
	out, err := cmd.Output()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return string(out), errOut.String(), exit.ExitCode()
	}
	if err != nil {
		t.Fatalf("caddy layer4chain %s: %v", strings.Join(args, " "), err)
	}
	return string(out), errOut.String(), 0
}

// TestCLIListAndTraceAcrossTheTwoProcessExample runs examples/outer and
// inner.caddyfile with a client held open, and follows that client's
// connection with `caddy layer4chain list` on the outer hop and `trace`
// across both: hop 1 on the outer admin API, hop 2 on the inner one, the
// inner hop's backend last, as a table and as JSON.
func TestCLIListAndTraceAcrossTheTwoProcessExample(t *testing.T) {
	ex := copyExamples(t, "inner.caddyfile", "outer.caddyfile")
	startCaddy(t, ex.addrs(t, "127.0.0.1:8002", "127.0.0.1:8003", "localhost:2020"), ex.args("inner.caddyfile")...)
	startCaddy(t, ex.addrs(t, "127.0.0.1:8001", "localhost:2019"), ex.args("outer.caddyfile")...)
	outerAdmin, innerAdmin := ex.addr(t, "localhost:2019"), ex.addr(t, "localhost:2020")
	backend := ex.addr(t, "127.0.0.1:8003")

	c, err := net.Dial("tcp", ex.addr(t, "127.0.0.1:8001"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	client := c.LocalAddr().String()
	if got := httpExchange(t, c, bufio.NewReader(c)); got != "original client: "+client {
		t.Fatalf("backend answered %q", got)
	}

	out, code := caddyCLI(t, "list", "--admin", outerAdmin, "--client", client, "--json")
	var listed []connInfo
	if err := json.Unmarshal([]byte(out), &listed); code != 0 || err != nil || len(listed) != 1 || listed[0].Hop != 1 {
		t.Fatalf("list --client %s --json: exit %d, %v:\n%s", client, code, err, out)
	}
	chainID := listed[0].ChainID

	out, code = caddyCLI(t, "list", "--admin", outerAdmin, "--state", "established", "--state", "half_closed")
	if code != 0 || !regexp.MustCompile(`(?m)^ID +CHAIN_ID +HOP +STATE`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^[0-9]+ +`+chainID+` +1 +established +\S+ +`+regexp.QuoteMeta(client)+` `).MatchString(out) {
		t.Fatalf("list: exit %d:\n%s", code, out)
	}

	// The inner hop's admin first: the trace orders by hop, not by flag.
	out, code = caddyCLI(t, "trace", chainID, "--admin", innerAdmin, "--admin", outerAdmin)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	want := []string{
		`^chain ` + chainID + `$`,
		`^HOP +ADMIN +SERVER +ID +STATE +UP +DOWN +AGE +UPSTREAM +CLOSE$`,
		`^client +` + regexp.QuoteMeta(client) + `$`,
		`^1 +` + regexp.QuoteMeta(outerAdmin) + ` +\S+ +[0-9]+ +established +[0-9]+ +[0-9]+ +\S+ +` + regexp.QuoteMeta(ex.addr(t, "127.0.0.1:8002")) + ` +-$`,
		`^2 +` + regexp.QuoteMeta(innerAdmin) + ` +\S+ +[0-9]+ +established +[0-9]+ +[0-9]+ +\S+ +` + regexp.QuoteMeta(backend) + ` +-$`,
		`^upstream of hop 2 +` + regexp.QuoteMeta(backend) + ` +the backend, if hop 2 is the last hop$`,
	}
	if code != 0 || len(lines) != len(want) {
		t.Fatalf("trace: exit %d:\n%s", code, out)
	}
	for i, w := range want {
		if !regexp.MustCompile(w).MatchString(strings.TrimRight(lines[i], " ")) {
			t.Errorf("trace line %d %q does not match %s", i, lines[i], w)
		}
	}

	out, code = caddyCLI(t, "trace", chainID, "--admin", outerAdmin, "--admin", innerAdmin, "--json")
	var tr struct {
		ChainID string `json:"chain_id"`
		Client  string `json:"client"`
		Backend string `json:"backend"`
		Hops    []struct {
			Admin     string `json:"admin"`
			Hop       int    `json:"hop"`
			State     string `json:"state"`
			Upstream  string `json:"upstream"`
			BytesDown int64  `json:"bytes_down"`
		} `json:"hops"`
	}
	if err := json.Unmarshal([]byte(out), &tr); code != 0 || err != nil {
		t.Fatalf("trace --json: exit %d, %v:\n%s", code, err, out)
	}
	if tr.ChainID != chainID || tr.Client != client || tr.Backend != backend || len(tr.Hops) != 2 ||
		tr.Hops[0].Admin != outerAdmin || tr.Hops[1].Admin != innerAdmin || tr.Hops[1].Hop != 2 ||
		tr.Hops[0].State != "established" || tr.Hops[1].BytesDown == 0 {
		t.Fatalf("trace --json: %+v", tr)
	}

	// The outer hop's admin API alone: its upstream is the inner hop, not
	// the backend, and the table says so.
	out, code = caddyCLI(t, "trace", chainID, "--admin", "http://"+outerAdmin+"/", "--admin", outerAdmin)
	if code != 0 || strings.Count(out, outerAdmin) != 1 || regexp.MustCompile(`(?m)^backend`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^upstream of hop 1 +`+regexp.QuoteMeta(ex.addr(t, "127.0.0.1:8002"))+` +the backend, if hop 1 is the last hop *$`).MatchString(out) {
		t.Fatalf("trace of the outer hop only: exit %d:\n%s", code, out)
	}
	// --admin at the proxy's port: the backend answers HTTP, not the admin API.
	proxy := ex.addr(t, "127.0.0.1:8001")
	if _, stderr, code := caddyCLIErr(t, "stats", "--admin", proxy); code != 1 ||
		!strings.Contains(stderr, proxy+" did not answer as Caddy's admin API with the layer4chain module (is it Caddy's admin address?)") {
		t.Fatalf("stats --admin at the proxy port %s: exit %d, %s", proxy, code, stderr)
	}

	if _, code := caddyCLI(t, "trace", "00000000000000000000000000000000", "--admin", outerAdmin, "--admin", innerAdmin); code != 1 {
		t.Fatalf("trace of a chain ID no hop has: exit %d, want 1", code)
	}
	dead := freeAddr(t)
	if _, stderr, code := caddyCLIErr(t, "trace", chainID, "--admin", outerAdmin, "--admin", dead); code == 0 ||
		!strings.Contains(stderr, "admin API "+dead) {
		t.Fatalf("trace with an unreachable admin API %s: exit %d, %s", dead, code, stderr)
	}
}
