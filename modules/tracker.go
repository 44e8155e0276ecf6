package modules

import (
	"sync"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

var (
	trackerOnce sync.Once
	tracker     *layer4chain.Tracker
)

// processTracker returns the tracker shared by every handler of every
// config this process loads, so a reload keeps every live connection's
// record.
func processTracker() *layer4chain.Tracker {
	trackerOnce.Do(func() { tracker = layer4chain.NewTracker() })
	return tracker
}
