package modules

import (
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

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
	trackerOnce.Do(func() {
		tracker = layer4chain.NewTracker()
		tracker.OnClose = logClosed
	})
	return tracker
}

// logClosed writes the access-log line of a closed connection. It asks for
// Caddy's current logger each time, so the line follows the logging config
// of the latest reload even for a connection an older config accepted.
func logClosed(r *layer4chain.Record) {
	ce := caddy.Log().Named("layer4chain").Check(zap.InfoLevel, "connection closed")
	if ce == nil {
		return
	}
	info := r.Info()
	ce.Write(
		zap.Uint64("id", info.ID),
		zap.String("chain_id", info.ChainID),
		zap.Int("hop", info.Hop),
		zap.String("server", info.Server),
		zap.String("client", info.Client),
		zap.String("original_client", info.OriginalClient),
		zap.String("upstream", info.Upstream),
		zap.Duration("duration", time.Since(info.Started)),
		zap.Int64("bytes_up", info.BytesUp),
		zap.Int64("bytes_down", info.BytesDown),
		zap.String("reason", string(info.Reason)),
	)
}
