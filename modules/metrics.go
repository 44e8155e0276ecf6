package modules

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/layer4chain/caddy-layer4chain/layer4chain"
)

const namespace = "caddy_layer4chain"

// The process's metrics. They are created once and registered into every
// config's registry (Caddy makes a new one per load), so reloads neither
// panic on duplicate registration nor reset counters.
var metrics = struct {
	dialDuration       *prometheus.HistogramVec
	connectionDuration prometheus.Histogram
	sweepDuration      prometheus.Histogram
	circuitTransitions *prometheus.CounterVec
}{
	dialDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    namespace + "_dial_duration_seconds",
		Help:    "Time taken by each upstream dial attempt, by outcome: ok (connected) or failed.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"outcome"}),
	circuitTransitions: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: namespace + "_circuit_transitions_total",
		Help: "Changes of an upstream's health, by upstream and the health it changed to: healthy, open, half_open or unhealthy.",
	}, []string{"upstream", "to"}),
	connectionDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    namespace + "_connection_duration_seconds",
		Help:    "Lifetime of closed connections, from admission to removal.",
		Buckets: []float64{.001, .01, .1, 1, 10, 60, 300, 1800, 3600, 14400, 86400},
	}),
	sweepDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    namespace + "_sweep_duration_seconds",
		Help:    "Time taken by each sweep of the connection records.",
		Buckets: []float64{.0001, .0005, .001, .005, .01, .025, .05, .1, .5},
	}),
}

// trackerCollector reports the tracker's own counts at scrape time, so the
// numbers on /metrics are the tracker's truth rather than a second copy.
type trackerCollector struct{}

var (
	descActive = prometheus.NewDesc(namespace+"_connections_active",
		"Live connections by state.", []string{"state"}, nil)
	descTotal = prometheus.NewDesc(namespace+"_connections_total",
		"Connections since the process started, refused ones included: always the sum of connections_active and connections_closed_total.", nil, nil)
	descClosed = prometheus.NewDesc(namespace+"_connections_closed_total",
		"Closed connections by close reason.", []string{"reason"}, nil)
	descDialFailures = prometheus.NewDesc(namespace+"_dial_failures_total",
		"Failed upstream dial attempts by reason and upstream.", []string{"reason", "upstream"}, nil)
	descBytes = prometheus.NewDesc(namespace+"_bytes_total",
		"Bytes proxied, by direction: up is client to upstream, down is upstream to client.", []string{"direction"}, nil)
	descRejected = prometheus.NewDesc(namespace+"_proxy_protocol_rejected_total",
		"Incoming PROXY headers refused, by reason.", []string{"reason"}, nil)
	descSweeps = prometheus.NewDesc(namespace+"_sweeps_total",
		"Sweeps of the connection records.", nil, nil)
	descZombies = prometheus.NewDesc(namespace+"_zombies_reaped_total",
		"Records reaped by a sweep after both their sockets had closed; anything but 0 is a bug.", nil, nil)
	descUpstreamHealthy = prometheus.NewDesc(namespace+"_upstream_healthy",
		"1 when the upstream is healthy (circuit closed, active checks passing), else 0, for every upstream a loaded config lists.", []string{"upstream"}, nil)
	descUpstreamActive = prometheus.NewDesc(namespace+"_upstream_active_connections",
		"Connections being dialed or established through the upstream now, for every upstream a loaded config lists.", []string{"upstream"}, nil)
	descLimit = prometheus.NewDesc(namespace+"_connection_limit",
		"The process's limit on live connections (app max_connections, by default derived from RLIMIT_NOFILE); +Inf when there is none.", nil, nil)
)

// Describe sends the descriptors of every metric Collect emits.
func (trackerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descActive, descTotal, descClosed, descDialFailures, descBytes, descRejected, descSweeps, descZombies, descLimit, descUpstreamHealthy, descUpstreamActive} {
		ch <- d
	}
}

// Collect reads the tracker.
func (trackerCollector) Collect(ch chan<- prometheus.Metric) {
	st := processTracker().Stats()
	for _, s := range layer4chain.States {
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(st.Active[s]), s.String())
	}
	ch <- prometheus.MustNewConstMetric(descTotal, prometheus.CounterValue, float64(st.ConnectionsTotal))
	for _, r := range layer4chain.CloseReasons {
		ch <- prometheus.MustNewConstMetric(descClosed, prometheus.CounterValue, float64(st.Closed[r]), string(r))
	}
	upstreams := pooledUpstreams()
	failures := processTracker().DialFailuresByUpstream()
	for _, u := range upstreams {
		for _, r := range layer4chain.DialFailureReasons {
			// A zero for every reason of every listed upstream, so that
			// rate() and alerts see the series before its first failure.
			k := layer4chain.DialFailureKey{Reason: r, Upstream: u.Addr}
			if _, ok := failures[k]; !ok {
				failures[k] = 0
			}
		}
	}
	for k, n := range failures {
		ch <- prometheus.MustNewConstMetric(descDialFailures, prometheus.CounterValue, float64(n), string(k.Reason), k.Upstream)
	}
	ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(st.BytesUp), "up")
	ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(st.BytesDown), "down")
	for r, n := range st.ProxyProtocolRejected {
		ch <- prometheus.MustNewConstMetric(descRejected, prometheus.CounterValue, float64(n), string(r))
	}
	ch <- prometheus.MustNewConstMetric(descSweeps, prometheus.CounterValue, float64(st.Sweeps))
	ch <- prometheus.MustNewConstMetric(descZombies, prometheus.CounterValue, float64(st.ZombiesReaped))
	ch <- prometheus.MustNewConstMetric(descLimit, prometheus.GaugeValue, connectionLimitMetric(processTracker().MaxConnections.Load()))
	for _, u := range upstreams {
		healthy := 0.0
		if u.Health() == layer4chain.HealthHealthy {
			healthy = 1
		}
		ch <- prometheus.MustNewConstMetric(descUpstreamHealthy, prometheus.GaugeValue, healthy, u.Addr)
		ch <- prometheus.MustNewConstMetric(descUpstreamActive, prometheus.GaugeValue, float64(u.Active()), u.Addr)
	}
}

var registerMu sync.Mutex

// registerMetrics adds the process's collectors to a config's registry. A
// registry that already has them (a second handler of the same config) is
// left as it is.
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	registerMu.Lock()
	defer registerMu.Unlock()
	for _, c := range []prometheus.Collector{trackerCollector{}, metrics.dialDuration, metrics.connectionDuration, metrics.sweepDuration, metrics.circuitTransitions} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}
