package layer4chain

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// newAcceptingListener returns the address of a loopback listener that
// accepts every connection and holds it open until the test ends.
func newAcceptingListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	go func() {
		defer close(done)
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	return ln.Addr().String()
}

// newRefusedAddr returns a loopback address nobody listens on any more, so
// connects to it are refused with RST.
func newRefusedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	return addr
}

// recordFailures returns an OnFailure callback and the slice it fills. Dial
// calls OnFailure synchronously, so no locking is needed.
func recordFailures() (func(*DialError), *[]*DialError) {
	var got []*DialError
	return func(e *DialError) { got = append(got, e) }, &got
}

func TestDialRefusedFirstUpstreamFailsOverToSecond(t *testing.T) {
	t.Parallel()
	refused := NewUpstream(newRefusedAddr(t))
	good := NewUpstream(newAcceptingListener(t))
	onFailure, failures := recordFailures()
	d := &Dialer{ConnectTimeout: 2 * time.Second, OnFailure: onFailure}

	c, used, err := d.Dial(context.Background(), []*Upstream{refused, good})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if used != good {
		t.Fatalf("connected via %s, want %s", used.Addr, good.Addr)
	}
	if got := c.RemoteAddr().String(); got != good.Addr {
		t.Fatalf("connection goes to %s, want %s", got, good.Addr)
	}
	if len(*failures) != 1 {
		t.Fatalf("OnFailure called %d times, want 1: %v", len(*failures), *failures)
	}
	f := (*failures)[0]
	if f.Upstream != refused.Addr || f.Reason != ReasonConnectRefused || !errors.Is(f, syscall.ECONNREFUSED) {
		t.Fatalf("OnFailure got %v, want connect_refused for %s", f, refused.Addr)
	}
}

func TestDialHealthyUpstreamReturnsTCPConnThatCarriesBytes(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 1)
	go func() {
		s, err := ln.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer s.Close()
		b, _ := io.ReadAll(s)
		got <- string(b)
	}()
	up := NewUpstream(ln.Addr().String())
	// Both keepalive settings must produce a working socket.
	for _, ka := range []time.Duration{0, -1, time.Second} {
		d := &Dialer{KeepAlive: ka}
		c, used, err := d.Dial(context.Background(), []*Upstream{up})
		if err != nil {
			t.Fatalf("keepalive %v: dial: %v", ka, err)
		}
		if used != up {
			t.Fatalf("keepalive %v: used %v, want %v", ka, used, up)
		}
		if ka != 0 {
			c.Close()
			continue
		}
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		if s := <-got; s != "hello" {
			t.Fatalf("upstream read %q, want hello", s)
		}
		c.Close()
	}
}

func TestDialAllRefusedReturnsLastErrorAndReportsEveryAttempt(t *testing.T) {
	t.Parallel()
	order := []*Upstream{
		NewUpstream(newRefusedAddr(t)),
		NewUpstream(newRefusedAddr(t)),
		NewUpstream(newRefusedAddr(t)),
	}
	onFailure, failures := recordFailures()
	d := &Dialer{ConnectTimeout: 2 * time.Second, OnFailure: onFailure}

	c, used, err := d.Dial(context.Background(), order)
	if err == nil {
		c.Close()
		t.Fatalf("connected via %s to a closed port", used.Addr)
	}
	if c != nil || used != nil {
		t.Fatalf("failed dial returned conn %v, upstream %v", c, used)
	}
	var de *DialError
	if !errors.As(err, &de) {
		t.Fatalf("error %T %v is not a *DialError", err, err)
	}
	last := order[len(order)-1]
	if de.Upstream != last.Addr || de.Reason != ReasonConnectRefused {
		t.Fatalf("got %v, want connect_refused for the last upstream %s", de, last.Addr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("error %v does not unwrap to ECONNREFUSED", err)
	}
	want := fmt.Sprintf("dialing upstream %s: connect_refused: ", last.Addr)
	if !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("message %q, want prefix %q", err.Error(), want)
	}
	if len(*failures) != len(order) {
		t.Fatalf("OnFailure called %d times, want %d", len(*failures), len(order))
	}
	for i, f := range *failures {
		if f.Upstream != order[i].Addr || f.Reason != ReasonConnectRefused {
			t.Fatalf("failure %d: got %v, want connect_refused for %s", i, f, order[i].Addr)
		}
	}
}

func TestDialCancelledContextStopsBeforeAnyAttempt(t *testing.T) {
	t.Parallel()
	good := NewUpstream(newAcceptingListener(t))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	onFailure, failures := recordFailures()
	d := &Dialer{OnFailure: onFailure}

	c, _, err := d.Dial(ctx, []*Upstream{good, good})
	if err == nil {
		c.Close()
		t.Fatal("dial with a cancelled context connected")
	}
	var de *DialError
	if !errors.As(err, &de) || de.Reason != ReasonConnectFailed || !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want connect_failed wrapping context.Canceled", err)
	}
	if len(*failures) != 0 {
		t.Fatalf("OnFailure called for attempts never made: %v", *failures)
	}
}

func TestDialWithNothingToDialFailsWithoutPanicking(t *testing.T) {
	t.Parallel()
	d := &Dialer{}
	for name, order := range map[string][]*Upstream{
		"nil":          nil,
		"empty":        {},
		"nil upstream": {nil},
		"bad address":  {NewUpstream("127.0.0.1:notaport")},
	} {
		c, used, err := d.Dial(context.Background(), order)
		var de *DialError
		if c != nil || used != nil || !errors.As(err, &de) || de.Reason != ReasonConnectFailed {
			t.Errorf("%s: got (%v, %v, %v), want a connect_failed DialError", name, c, used, err)
		}
	}
}

// timeoutErr is a net.Error that claims to be a timeout without wrapping any
// of the well-known sentinel errors.
type timeoutErr struct{}

func (timeoutErr) Error() string   { return "custom timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return false }

func TestClassifyDialErrorMapsEachFailureToItsReason(t *testing.T) {
	t.Parallel()
	opErr := func(err error) error {
		return &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", err)}
	}
	tests := []struct {
		name string
		err  error
		want CloseReason
	}{
		{"nil", nil, ReasonNone},
		{"refused", opErr(syscall.ECONNREFUSED), ReasonConnectRefused},
		{"bare refused", syscall.ECONNREFUSED, ReasonConnectRefused},
		{"wrapped refused", fmt.Errorf("outer: %w", opErr(syscall.ECONNREFUSED)), ReasonConnectRefused},
		{"etimedout", opErr(syscall.ETIMEDOUT), ReasonConnectTimeout},
		{"context deadline", context.DeadlineExceeded, ReasonConnectTimeout},
		{"os deadline", os.ErrDeadlineExceeded, ReasonConnectTimeout},
		{"net.Error timeout", &net.OpError{Op: "dial", Net: "tcp", Err: timeoutErr{}}, ReasonConnectTimeout},
		{"host unreachable", opErr(syscall.EHOSTUNREACH), ReasonConnectFailed},
		{"network unreachable", opErr(syscall.ENETUNREACH), ReasonConnectFailed},
		{"port exhaustion", opErr(syscall.EAGAIN), ReasonConnectFailed},
		{"address error", &net.OpError{Op: "dial", Net: "tcp", Err: &net.AddrError{Err: "missing port in address", Addr: "x"}}, ReasonConnectFailed},
		{"dns error", &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: "x.invalid", IsNotFound: true}}, ReasonConnectFailed},
		{"context canceled", context.Canceled, ReasonConnectFailed},
		{"other", errors.New("something odd"), ReasonConnectFailed},
	}
	for _, tt := range tests {
		if got := ClassifyDialError(tt.err); got != tt.want {
			t.Errorf("%s: ClassifyDialError(%v) = %q, want %q", tt.name, tt.err, got, tt.want)
		}
	}
}

func TestClassifyDialErrorOnRealCancelledDialIsConnectFailed(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var nd net.Dialer
	_, err := nd.DialContext(ctx, "tcp", newAcceptingListener(t))
	if err == nil {
		t.Fatal("dial with a cancelled context succeeded")
	}
	if got := ClassifyDialError(err); got != ReasonConnectFailed {
		t.Fatalf("ClassifyDialError(%v) = %q, want connect_failed", err, got)
	}
}

func TestDialErrorMessageNamesUpstreamAndReason(t *testing.T) {
	t.Parallel()
	inner := errors.New("boom")
	e := &DialError{Upstream: "127.0.0.1:9", Reason: ReasonConnectRefused, Err: inner}
	if got, want := e.Error(), "dialing upstream 127.0.0.1:9: connect_refused: boom"; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(e, inner) {
		t.Fatal("DialError does not unwrap to its cause")
	}
}

func TestValidateUpstreamAddrAcceptsHostPortAndExplainsRejections(t *testing.T) {
	t.Parallel()
	tests := []struct {
		addr    string
		wantErr string // empty: valid
	}{
		{"127.0.0.1:8080", ""},
		{"backend.internal:443", ""},
		{"[::1]:22", ""},
		{"[fe80::1%eth0]:22", ""},
		{"localhost:1", ""},
		{"localhost:65535", ""},
		{"", "empty"},
		{"127.0.0.1", "not host:port"},
		{":8080", "no host"},
		{"127.0.0.1:", "no port"},
		{"127.0.0.1:http", "non-numeric port"},
		{"127.0.0.1:-1", "non-numeric port"},
		{"127.0.0.1:0", "outside 1..65535"},
		{"127.0.0.1:65536", "outside 1..65535"},
		{"127.0.0.1:99999999999999999999", "outside 1..65535"},
		{"bad host:80", "invalid host"},
		{"::1:80", "not host:port"},
		{"tcp/127.0.0.1:80", ""},
		{"tcp4/localhost:80", ""},
		{"tcp6/[::1]:80", ""},
		{"udp/127.0.0.1:53", "chain proxies TCP"},
		{"unix//run/backend.sock", "chain proxies TCP"},
		{"tcp4/127.0.0.1", "not host:port"},
		{"tcp6/tcp6/[::1]:80", "not host:port"},
	}
	for _, tt := range tests {
		err := ValidateUpstreamAddr(tt.addr)
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("ValidateUpstreamAddr(%q) = %v, want nil", tt.addr, err)
		case tt.wantErr != "" && err == nil:
			t.Errorf("ValidateUpstreamAddr(%q) = nil, want an error about %q", tt.addr, tt.wantErr)
		case tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr):
			t.Errorf("ValidateUpstreamAddr(%q) = %v, want it to mention %q", tt.addr, err, tt.wantErr)
		}
	}
}

// TestDialHonoursTheUpstreamsIPFamily shows that "tcp4/" and "tcp6/" are
// dialed on that family only: an operator who pins an upstream to IPv4
// must not reach it, or fail, over IPv6.
func TestDialHonoursTheUpstreamsIPFamily(t *testing.T) {
	t.Parallel()
	_, port, err := net.SplitHostPort(newAcceptingListener(t))
	if err != nil {
		t.Fatal(err)
	}
	d := &Dialer{ConnectTimeout: time.Second}
	for _, tt := range []struct {
		addr    string
		connect bool
	}{
		{"127.0.0.1:" + port, true},
		{"tcp/127.0.0.1:" + port, true},
		{"tcp4/127.0.0.1:" + port, true},
		// An IPv4 address is not an address of the tcp6 network: Go
		// refuses to dial it instead of mapping it.
		{"tcp6/127.0.0.1:" + port, false},
	} {
		c, up, err := d.Dial(context.Background(), []*Upstream{NewUpstream(tt.addr)})
		if tt.connect != (err == nil) {
			t.Errorf("Dial(%s): connected %v (err %v), want connected %v", tt.addr, err == nil, err, tt.connect)
		}
		if err == nil {
			if up.Addr != tt.addr {
				t.Errorf("Dial(%s) reports upstream %q", tt.addr, up.Addr)
			}
			c.Close()
		}
	}
}

// An upstream whose address has placeholders is dialed at what each
// connection's Resolve makes of it, which the record names, while its
// health and metrics stay the template's; a template that makes no address fails that dial
// (connect_failed, naming the template) and the next upstream is tried.
func TestTemplateUpstreamIsResolvedPerConnection(t *testing.T) {
	checkEngineLeaks(t)
	a, b := chaintest.NewEchoBackend(t), chaintest.NewEchoBackend(t)
	_, portA, _ := net.SplitHostPort(a.Addr)
	_, portB, _ := net.SplitHostPort(b.Addr)
	template := NewUpstream("127.0.0.1:{port}")
	if !template.Template() || NewUpstream(a.Addr).Template() {
		t.Fatal("Template() does not tell a template from an address")
	}
	fallback := NewUpstream(b.Addr)
	bal, err := NewBalancer("first", []*Upstream{template, fallback}, 0)
	if err != nil {
		t.Fatal(err)
	}
	tr := NewTracker()
	closed := closedRecords{make(chan RecordInfo, 4)}
	tr.Observer = closed
	p := &Proxy{Tracker: tr, Balancer: bal}
	ports := make(chan string, 4)
	h := startHopServing(t, p, func(h *hop, c net.Conn) (CloseReason, bool) {
		port := <-ports
		return p.Serve(c, nil, ClientMeta{Server: h.Addr, Resolve: func(s, _ string) string {
			return strings.ReplaceAll(s, "{port}", port)
		}}), true
	})
	for _, tc := range []struct{ port, want string }{{portA, a.Addr}, {portB, b.Addr}, {"", b.Addr}} {
		ports <- tc.port
		c := chaintest.Dial(t, h.Addr)
		c.Write([]byte("x"))
		c.CloseWrite()
		if got, _, _ := chaintest.ReadUntilClosed(c, 5*time.Second); string(got) != "x" {
			t.Fatalf("port %q: echo %q", tc.port, got)
		}
		// The record names the address dialed, not the template.
		info := closedInfo(t, closed)
		if info.Upstream != tc.want {
			t.Fatalf("port %q: record's upstream %q, want %q", tc.port, info.Upstream, tc.want)
		}
		if tc.port == "" {
			// No port: the template fails, the fallback serves.
			if len(info.FailedDials) != 1 || info.FailedDials[0].Upstream != template.Addr ||
				info.FailedDials[0].Reason != ReasonConnectFailed || !strings.Contains(info.FailedDials[0].Error, "127.0.0.1:{port}") {
				t.Fatalf("failed dials %+v, want one connect_failed of the template", info.FailedDials)
			}
		}
	}
	if n := a.AcceptedCount() + b.AcceptedCount(); n != 3 {
		t.Fatalf("backends accepted %d connections, want 3", n)
	}
}

// A client picks where a template upstream dials (its SNI, say), so the
// failures of a template never open the circuit that every client shares:
// one client naming a dead address must not cut the others off.
func TestATemplatesFailuresDoNotOpenItsCircuit(t *testing.T) {
	checkEngineLeaks(t)
	live := chaintest.NewEchoBackend(t)
	_, dead, _ := net.SplitHostPort(chaintest.RefusedAddr(t))
	_, port, _ := net.SplitHostPort(live.Addr)
	template := NewUpstream("127.0.0.1:{port}")
	d := &Dialer{ConnectTimeout: time.Second, Passive: &PassiveHealth{FailDuration: time.Minute, MaxFails: 1}}
	fill := func(p string) func(string) string {
		return func(s string) string { return strings.ReplaceAll(s, "{port}", p) }
	}
	for range 3 {
		if _, _, err := d.dial(context.Background(), []*Upstream{template}, nil, fill(dead)); err == nil {
			t.Fatal("the dead port answered")
		}
	}
	if h := template.Health(); h != HealthHealthy {
		t.Fatalf("after three refused dials of a client's choice the template is %s, want healthy", h)
	}
	c, _, err := d.dial(context.Background(), []*Upstream{template}, nil, fill(port))
	if err != nil {
		t.Fatalf("the next client, to a live port: %v", err)
	}
	c.Close()
}

// What a connection fills into a template can be anything its client sent:
// characters no address has fail the attempt before any resolver sees
// them, and the message quotes them escaped.
func TestATemplateFilledWithControlBytesIsQuotedNotDialed(t *testing.T) {
	template := NewUpstream("{host}:443")
	d := &Dialer{ConnectTimeout: time.Second}
	_, _, err := d.dial(context.Background(), []*Upstream{template}, nil, func(s string) string {
		return strings.ReplaceAll(s, "{host}", "evil\x1b[2J")
	})
	if err == nil || strings.ContainsRune(err.Error(), '\x1b') || !strings.Contains(err.Error(), `evil\x1b[2J:443`) {
		t.Fatalf("error %q, want the filled address quoted with its escape escaped", err)
	}
}
