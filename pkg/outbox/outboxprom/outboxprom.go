// Package outboxprom reports an outbox relay's events as Prometheus metrics. It is kept apart
// from package outbox so that services that only enqueue do not link Prometheus.
package outboxprom

import (
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/treatyhq/treaty/pkg/outbox"
)

// Observer is an outbox.Observer that updates Prometheus metrics.
type Observer struct {
	published     *prometheus.CounterVec
	failed        *prometheus.CounterVec
	deadLettered  *prometheus.CounterVec
	batchSize     prometheus.Histogram
	batchDuration prometheus.Histogram
	latency       prometheus.Histogram
	backlog       prometheus.Gauge
	oldestAge     prometheus.Gauge
	slotsOwned    prometheus.Gauge
	slotsTotal    prometheus.Gauge
	liveRelays    prometheus.Gauge
}

var _ outbox.Observer = (*Observer)(nil)

// New registers the relay's metrics with reg (not the global registry, unless that is what
// the caller passes) and returns the Observer to put in RelayConfig.
func New(reg prometheus.Registerer) (*Observer, error) {
	const ns = "treaty_outbox"
	o := &Observer{
		published: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "published_total",
			Help: "Messages acknowledged by the broker (all in-sync replicas)."}, []string{"topic"}),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "publish_failures_total",
			Help: "Messages whose publish failed; kind is temporary (broker or network, retried without counting) or message (counts towards dead-lettering)."},
			[]string{"kind"}),
		deadLettered: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "dead_lettered_total",
			Help: "Messages moved to the dead-letter table after too many failed attempts."}, []string{"topic"}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "batch_size",
			Help: "Messages per acknowledged batch.", Buckets: prometheus.ExponentialBuckets(1, 4, 8)}),
		batchDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "batch_publish_seconds",
			Help: "Time to publish one batch until the broker acknowledged it.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "enqueue_to_ack_seconds",
			Help: "From the row's creation (database clock) to the broker's acknowledgement.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 18)}),
		backlog: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "backlog_messages",
			Help: "Unsent messages in the outbox table (all slots)."}),
		oldestAge: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "oldest_unsent_age_seconds",
			Help: "Age of the oldest unsent message: the reconciliation signal; alert when it keeps growing."}),
		slotsOwned: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "slots_owned",
			Help: "Key slots this relay holds a lease on."}),
		slotsTotal: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "slots_total",
			Help: "Key slots of the outbox table."}),
		liveRelays: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "live_relays",
			Help: "Relays with a live heartbeat on this outbox table."}),
	}
	for _, c := range []prometheus.Collector{o.published, o.failed, o.deadLettered, o.batchSize, o.batchDuration,
		o.latency, o.backlog, o.oldestAge, o.slotsOwned, o.slotsTotal, o.liveRelays} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return o, nil
}

// BatchPublished implements outbox.Observer.
func (o *Observer) BatchPublished(b outbox.PublishedBatch) {
	o.batchSize.Observe(float64(len(b.Messages)))
	o.batchDuration.Observe(b.Duration.Seconds())
	byTopic := map[string]int{}
	for _, m := range b.Messages {
		byTopic[m.Topic]++
		o.latency.Observe(max(b.AckedAt.Sub(m.CreatedAt), 0).Seconds())
	}
	for t, n := range byTopic {
		o.published.WithLabelValues(t).Add(float64(n))
	}
}

// PublishFailed implements outbox.Observer.
func (o *Observer) PublishFailed(_ string, n int, temporary bool, _ error) {
	kind := "message"
	if temporary {
		kind = "temporary"
	}
	o.failed.WithLabelValues(kind).Add(float64(n))
}

// DeadLettered implements outbox.Observer.
func (o *Observer) DeadLettered(topic string, _ uuid.UUID, _ string) {
	o.deadLettered.WithLabelValues(topic).Inc()
}

// Backlog implements outbox.Observer.
func (o *Observer) Backlog(n int64, oldest time.Duration) {
	o.backlog.Set(float64(n))
	o.oldestAge.Set(oldest.Seconds())
}

// Slots implements outbox.Observer.
func (o *Observer) Slots(owned, total, live int) {
	o.slotsOwned.Set(float64(owned))
	o.slotsTotal.Set(float64(total))
	o.liveRelays.Set(float64(live))
}
