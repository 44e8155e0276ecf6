package layer4chain

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/layer4chain/caddy-layer4chain/layer4chain/chaintest"
)

// parkedCount is how many directions wait in the parker.
func parkedCount() int {
	pk := getParker()
	pk.mu.Lock()
	defer pk.mu.Unlock()
	return len(pk.parked)
}

// waitParked waits until n directions are parked. Parking has no event to
// await: it is the absence of traffic for parkAfter.
func waitParked(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for parkedCount() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d directions parked, want %d", parkedCount(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// parkingHop is a detached hop in front of a backend whose accepted
// connections the test drives; its connections park after 20 ms of quiet.
func parkingHop(t *testing.T, timeouts Timeouts) (*hop, <-chan *net.TCPConn) {
	t.Helper()
	accepted := make(chan *net.TCPConn, 4)
	release := make(chan struct{})
	backend := chaintest.NewBackend(t, func(c *net.TCPConn) {
		accepted <- c
		<-release
	})
	h := startDetachedHop(t, &Proxy{Balancer: balancerFor(t, backend.Addr), Timeouts: timeouts, parkAfter: 20 * time.Millisecond})
	t.Cleanup(func() { close(release) }) // before the hop waits for its connections to end
	return h, accepted
}

// parkedConnection opens a connection through h, moves first from the
// client to the upstream, and waits until both directions have parked.
func parkedConnection(t *testing.T, h *hop, accepted <-chan *net.TCPConn, first string) (client, up *net.TCPConn) {
	t.Helper()
	client = chaintest.Dial(t, h.Addr)
	mustWrite(t, client, first)
	up = <-accepted
	mustRead(t, up, first)
	waitParked(t, 2) // both directions: no goroutine holds the connection
	return client, up
}

// wantEnded waits until h has no connection left, checks how many ended
// with reason, and that nothing stays parked.
func wantEnded(t *testing.T, h *hop, reason CloseReason, n int64) {
	t.Helper()
	<-h.Tracker.Empty()
	if got := h.Tracker.Closed(reason); got != n {
		t.Fatalf("%s: %d, want %d", reason, got, n)
	}
	waitParked(t, 0)
}

func mustRead(t *testing.T, c net.Conn, want string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		t.Fatalf("read %q, %v; want %q", got, err, want)
	}
}

func mustWrite(t *testing.T, c net.Conn, s string) {
	t.Helper()
	if _, err := c.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
}

func TestQuietConnectionParksAndWakesWhenTheUpstreamSends(t *testing.T) {
	checkEngineLeaks(t)
	h, accepted := parkingHop(t, Timeouts{})
	client, up := parkedConnection(t, h, accepted, "hello")

	for _, msg := range []string{"first", "second"} {
		mustWrite(t, up, msg)
		mustRead(t, client, msg)
		waitParked(t, 2) // parked again after each burst
	}
	mustWrite(t, client, "wake")
	mustRead(t, up, "wake")
	waitParked(t, 2)
	mustWrite(t, client, "bye")
	mustRead(t, up, "bye")

	client.Close()
	if _, _, err := chaintest.ReadUntilClosed(up, 3*time.Second); err != nil {
		t.Fatalf("upstream: %v", err)
	}
	up.Close()
	wantEnded(t, h, ReasonClientClosed, 1)
}

func TestParkedDirectionIsCarriedOnAfterTheClientHalfCloses(t *testing.T) {
	checkEngineLeaks(t)
	h, accepted := parkingHop(t, Timeouts{HalfClose: time.Minute})
	client, up := parkedConnection(t, h, accepted, "request")

	client.CloseWrite()
	if _, _, err := chaintest.ReadUntilClosed(up, 3*time.Second); err != nil {
		t.Fatalf("upstream did not see the client's FIN: %v", err)
	}
	waitParked(t, 0) // the client → upstream goroutine carries the other direction on
	mustWrite(t, up, "response")
	up.CloseWrite()
	got, _, err := chaintest.ReadUntilClosed(client, 3*time.Second)
	if err != nil || string(got) != "response" {
		t.Fatalf("client read %q, %v; want the response then EOF", got, err)
	}
	up.Close()
	wantEnded(t, h, ReasonClientClosed, 1)
}

func TestParkedDirectionWakesWhenTheUpstreamCloses(t *testing.T) {
	checkEngineLeaks(t)
	h, accepted := parkingHop(t, Timeouts{HalfClose: time.Minute})
	client, up := parkedConnection(t, h, accepted, "request")

	mustWrite(t, up, "last words")
	up.CloseWrite()
	got, _, err := chaintest.ReadUntilClosed(client, 3*time.Second)
	if err != nil || string(got) != "last words" {
		t.Fatalf("client read %q, %v; want the upstream's bytes then EOF", got, err)
	}
	mustWrite(t, client, "still here") // half-closed: the client may still send
	mustRead(t, up, "still here")
	client.Close()
	up.Close()
	wantEnded(t, h, ReasonUpstreamClosed, 1)
}

func TestParkedConnectionStillEndsAtItsIdleTimeout(t *testing.T) {
	checkEngineLeaks(t)
	h, accepted := parkingHop(t, Timeouts{Idle: 300 * time.Millisecond})
	// Parked, the limit's timer stands in for the read deadline.
	client, _ := parkedConnection(t, h, accepted, "x")
	if _, elapsed, _ := chaintest.ReadUntilClosed(client, 3*time.Second); elapsed > 2*time.Second {
		t.Fatalf("closed after %v, want about the 300ms idle timeout", elapsed)
	}
	wantEnded(t, h, ReasonIdleTimeout, 1)
}

func TestParkedConnectionClosedFromOutsideLeavesNothing(t *testing.T) {
	checkEngineLeaks(t)
	h, accepted := parkingHop(t, Timeouts{})
	const n = 20
	clients := make([]net.Conn, n)
	for i := range clients {
		clients[i] = chaintest.Dial(t, h.Addr)
		mustWrite(t, clients[i], "x")
		mustRead(t, <-accepted, "x")
	}
	waitParked(t, 2*n)
	for _, r := range h.Tracker.Records() {
		r.Close(ReasonAdmin)
	}
	for _, c := range clients {
		if _, elapsed, _ := chaintest.ReadUntilClosed(c, 3*time.Second); elapsed > 2*time.Second {
			t.Fatalf("closed after %v", elapsed)
		}
	}
	wantEnded(t, h, ReasonAdmin, n)
}

func TestHalfCloseLimitCountsFromTheHalfCloseNotTheLastByte(t *testing.T) {
	checkEngineLeaks(t)
	// Quiet for longer than the half-close limit before the client
	// half-closes: the limit must still give the upstream its full time
	// to answer after the FIN.
	const limit = 300 * time.Millisecond
	h, accepted := parkingHop(t, Timeouts{HalfClose: limit})
	client, up := parkedConnection(t, h, accepted, "request")
	time.Sleep(2 * limit) // the idle period itself is what is tested

	client.CloseWrite()
	if _, _, err := chaintest.ReadUntilClosed(up, 3*time.Second); err != nil {
		t.Fatalf("upstream did not see the client's FIN: %v", err)
	}
	time.Sleep(limit / 3) // an upstream that takes a moment to answer
	mustWrite(t, up, "answer")
	got, _, err := chaintest.ReadUntilClosed(client, 3*time.Second)
	if string(got) != "answer" {
		t.Fatalf("client read %q, %v; want the answer sent within the half-close limit", got, err)
	}
	up.Close()
	wantEnded(t, h, ReasonHalfCloseTimeout, 1)
}
