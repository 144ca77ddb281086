// Package metrics exposes the coordinator's Prometheus metrics. The engine reports through the
// small engine.Observer interface; this package is the only one that knows Prometheus, and it
// registers on a registry it is given, never the global default one.
package metrics

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/treatyhq/treaty/internal/store"
)

// Metrics implements engine.Observer with Prometheus collectors.
type Metrics struct {
	started     *prometheus.CounterVec
	finished    *prometheus.CounterVec
	calls       *prometheus.HistogramVec
	retries     *prometheus.CounterVec
	claims      prometheus.Counter
	lost        prometheus.Counter
	commitBatch prometheus.Histogram
	jobRuns     *prometheus.CounterVec
	jobFindings *prometheus.GaugeVec
	targets     *targetLabels
	clockOffset prometheus.Gauge
}

// BreakerStates reports each participant endpoint's circuit breaker state.
type BreakerStates func() map[string]string

// New registers the coordinator's metrics on reg. stats is read at scrape time for the backlog
// and needs-operator gauges; breakers for the circuit breaker gauge.
func New(reg prometheus.Registerer, st store.Store, breakers BreakerStates, log *slog.Logger) *Metrics {
	targets := newTargetLabels(MaxTargetLabels)
	m := &Metrics{
		targets: targets,
		started: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "treaty_transactions_started_total", Help: "Transactions accepted, by mode.",
		}, []string{"mode"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "treaty_transactions_finished_total", Help: "Transactions that reached a terminal status on this replica, by mode and outcome (succeeded, compensated, needs_operator).",
		}, []string{"mode", "outcome"}),
		calls: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "treaty_branch_call_duration_seconds", Help: "Participant call latency by target endpoint (host:port; the first 100 endpoints, later ones \"other\"), op and outcome (ok, aborted, transient, not_sent).",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"target", "op", "outcome"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "treaty_branch_retries_total", Help: "Participant calls that failed transiently and will be retried, by op.",
		}, []string{"op"}),
		claims: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "treaty_lease_claims_total", Help: "Transactions claimed by this replica's recovery loop (expired leases, handed-back or due work).",
		}),
		lost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "treaty_leases_lost_total", Help: "Transactions this replica stopped driving because another replica took them over.",
		}),
		commitBatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "treaty_group_commit_size", Help: "Records written per database commit by the group committer.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256},
		}),
		jobRuns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "treaty_reconcile_runs_total", Help: "Reconciliation job runs by job and result (ok, failed).",
		}, []string{"job", "result"}),
		jobFindings: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "treaty_reconcile_findings", Help: "What the last run of each reconciliation job found (for retention: transactions deleted).",
		}, []string{"job"}),
		clockOffset: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "treaty_clock_offset_seconds", Help: "Database clock minus this replica's clock, as last measured; persisted times are corrected by it (a warning is logged above 1s).",
		}),
	}
	reg.MustRegister(m.started, m.finished, m.calls, m.retries, m.claims, m.lost, m.commitBatch, m.jobRuns, m.jobFindings, m.clockOffset,
		&stateCollector{st: st, breakers: breakers, log: log, targets: targets})
	return m
}

// TransactionStarted implements engine.Observer.
func (m *Metrics) TransactionStarted(mode string) { m.started.WithLabelValues(mode).Inc() }

// TransactionFinished implements engine.Observer.
func (m *Metrics) TransactionFinished(mode, outcome string) {
	m.finished.WithLabelValues(mode, outcome).Inc()
}

// BranchCall implements engine.Observer.
func (m *Metrics) BranchCall(target, op, outcome string, d time.Duration) {
	m.calls.WithLabelValues(m.targets.label(target), op, outcome).Observe(d.Seconds())
	if outcome == "transient" || outcome == "not_sent" {
		m.retries.WithLabelValues(op).Inc()
	}
}

// LeasesClaimed implements engine.Observer.
func (m *Metrics) LeasesClaimed(n int) { m.claims.Add(float64(n)) }

// LeaseLost implements engine.Observer.
func (m *Metrics) LeaseLost() { m.lost.Inc() }

// ClockOffset implements engine.ClockObserver.
func (m *Metrics) ClockOffset(d time.Duration) { m.clockOffset.Set(d.Seconds()) }

// GroupCommit implements engine.Observer.
func (m *Metrics) GroupCommit(records int) { m.commitBatch.Observe(float64(records)) }

// JobRan implements engine.Observer.
func (m *Metrics) JobRan(job string, findings int, failed bool) {
	result := "ok"
	if failed {
		result = "failed"
	}
	m.jobRuns.WithLabelValues(job, result).Inc()
	m.jobFindings.WithLabelValues(job).Set(float64(findings))
}

// stateCollector reads the backlog from the database at scrape time, so every replica reports
// the same cluster-wide figures.
type stateCollector struct {
	st       store.Store
	breakers BreakerStates
	log      *slog.Logger
	targets  *targetLabels
}

var (
	backlogDesc = prometheus.NewDesc("treaty_recovery_backlog", "Live transactions whose next attempt is due (due) or more than a lease overdue (overdue).", []string{"kind"}, nil)
	oldestDesc  = prometheus.NewDesc("treaty_recovery_oldest_due_seconds", "Age of the oldest due transaction's next attempt.", nil, nil)
	operDesc    = prometheus.NewDesc("treaty_needs_operator", "Transactions waiting for an operator.", nil, nil)
	statusDesc  = prometheus.NewDesc("treaty_transactions", "Unfinished transactions by mode and status (finished ones: treaty_transactions_finished_total).", []string{"mode", "status"}, nil)
	storedDesc  = prometheus.NewDesc("treaty_transactions_finished_stored", "Finished transactions kept until retention deletes them (PostgreSQL: estimated from the planner's statistics).", nil, nil)
	breakerDesc = prometheus.NewDesc("treaty_circuit_breaker_open", "Circuit breaker state per participant endpoint: 0 closed, 0.5 half-open, 1 open.", []string{"target"}, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{backlogDesc, oldestDesc, operDesc, statusDesc, storedDesc, breakerDesc} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	if c.breakers != nil {
		// Endpoints share the capped label set of the call metrics; those past the cap are
		// reported together under OverflowTarget with the worst state among them.
		byLabel := map[string]float64{}
		for target, state := range c.breakers() {
			v := 0.0
			switch state {
			case "open":
				v = 1
			case "half-open":
				v = 0.5
			}
			l := c.targets.label(target)
			if old, ok := byLabel[l]; !ok || v > old {
				byLabel[l] = v
			}
		}
		for l, v := range byLabel {
			ch <- prometheus.MustNewConstMetric(breakerDesc, prometheus.GaugeValue, v, l)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := c.st.Stats(ctx)
	if err != nil {
		c.log.Warn("metrics: reading transaction statistics failed", "err", err)
		return
	}
	ch <- prometheus.MustNewConstMetric(backlogDesc, prometheus.GaugeValue, float64(s.Due), "due")
	ch <- prometheus.MustNewConstMetric(backlogDesc, prometheus.GaugeValue, float64(s.Overdue), "overdue")
	ch <- prometheus.MustNewConstMetric(oldestDesc, prometheus.GaugeValue, s.OldestDue.Seconds())
	ch <- prometheus.MustNewConstMetric(operDesc, prometheus.GaugeValue, float64(s.NeedsOperator))
	ch <- prometheus.MustNewConstMetric(storedDesc, prometheus.GaugeValue, float64(s.Finished))
	for _, k := range s.ByStatus {
		ch <- prometheus.MustNewConstMetric(statusDesc, prometheus.GaugeValue, float64(k.Count), k.Mode, k.Status)
	}
}
