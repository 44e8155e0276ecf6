package layer4chain

import "fmt"

// State is where a proxied connection is in its life. Every record is in
// exactly one state at a time and only moves forward.
type State uint32

// The states of a connection, in the order a connection passes through them.
const (
	// StateConnecting: admitted; reading a PROXY header or dialing upstream.
	StateConnecting State = iota
	// StateEstablished: both directions flow.
	StateEstablished
	// StateHalfClosed: one direction has ended; the other still flows.
	StateHalfClosed
	// StateClosing: both sockets are being closed and the record removed.
	StateClosing
)

// States lists every state in order, for stats and metrics.
var States = []State{StateConnecting, StateEstablished, StateHalfClosed, StateClosing}

var stateNames = [...]string{"connecting", "established", "half_closed", "closing"}

// String returns the state's name as used by the admin API and metrics.
func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", uint32(s))
}

// MarshalText makes a State encode as its name in JSON.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a State from its name.
func (s *State) UnmarshalText(b []byte) error {
	v, err := ParseState(string(b))
	if err == nil {
		*s = v
	}
	return err
}

// ParseState returns the State with the given name.
func ParseState(name string) (State, error) {
	for i, n := range stateNames {
		if n == name {
			return State(i), nil
		}
	}
	return 0, fmt.Errorf("unknown state %q (want one of connecting, established, half_closed, closing)", name)
}
