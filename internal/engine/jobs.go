package engine

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

// JobsConfig tunes the reconciliation jobs. Zero values mean the defaults.
type JobsConfig struct {
	// Interval between passes; default 1m. Negative disables the jobs.
	Interval time.Duration
	// StuckAfter: a live transaction with no progress and nothing scheduled for this long is
	// re-driven (taken from its owner, due now); default 10m, above the longest call timeout.
	StuckAfter time.Duration
	// Retention: finished transactions (not those waiting for an operator) are deleted this long
	// after they finished; default 7 days. Negative keeps them forever.
	Retention time.Duration
	// DeleteBatch bounds one delete statement, so no lock is held long; default 500.
	DeleteBatch int
}

func (c *JobsConfig) setDefaults() {
	if c.Interval == 0 {
		c.Interval = time.Minute
	}
	if c.StuckAfter <= 0 {
		c.StuckAfter = 10 * time.Minute
	}
	if c.Retention == 0 {
		c.Retention = 7 * 24 * time.Hour
	}
	if c.DeleteBatch <= 0 {
		c.DeleteBatch = 500
	}
}

// JobStatus is what the last run of a reconciliation job did.
type JobStatus struct {
	Name     string
	LastRun  time.Time
	Duration time.Duration
	// Findings counts what needs attention (stuck, expired, in doubt) or, for retention, what
	// was deleted.
	Findings int
	// Sample lists some of the gids concerned.
	Sample []string
	Detail string
	Err    string
}

// Job names.
const (
	JobStuck      = "stuck_transactions"
	JobExpiredTCC = "expired_tcc"
	JobInDoubt2PC = "in_doubt_2pc"
	JobRetention  = "retention"
)

type jobs struct {
	mu     sync.Mutex
	status map[string]JobStatus
}

// Jobs returns the status of every reconciliation job, in a fixed order.
func (e *Engine) Jobs() []JobStatus {
	e.jobs.mu.Lock()
	defer e.jobs.mu.Unlock()
	var out []JobStatus
	for _, n := range []string{JobStuck, JobExpiredTCC, JobInDoubt2PC, JobRetention} {
		if s, ok := e.jobs.status[n]; ok {
			out = append(out, s)
		} else {
			out = append(out, JobStatus{Name: n})
		}
	}
	return out
}

func (e *Engine) setJob(s JobStatus) {
	e.jobs.mu.Lock()
	defer e.jobs.mu.Unlock()
	if e.jobs.status == nil {
		e.jobs.status = map[string]JobStatus{}
	}
	e.jobs.status[s.Name] = s
	e.cfg.Observer.JobRan(s.Name, s.Findings, s.Err != "")
}

func (e *Engine) jobsLoop(ctx context.Context) {
	if e.cfg.Jobs.Interval < 0 {
		return
	}
	t := time.NewTimer(e.cfg.Jobs.Interval / 4) // first pass soon after start
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		e.RunJobs(ctx)
		t.Reset(time.Duration(float64(e.cfg.Jobs.Interval) * (0.9 + 0.2*e.cfg.Rand())))
	}
}

// RunJobs runs one pass of every reconciliation job now. Several replicas may run them at once:
// each step is idempotent and skips rows another holds.
func (e *Engine) RunJobs(ctx context.Context) {
	c := e.cfg.Jobs
	start := time.Now()
	r, err := e.cfg.Store.Reconcile(ctx, store.ReconcileParams{StuckAfter: c.StuckAfter, Grace: time.Minute, Limit: 100, HandOver: e.cfg.Lease})
	took := time.Since(start)
	if err != nil {
		for _, n := range []string{JobStuck, JobExpiredTCC, JobInDoubt2PC} {
			e.setJob(JobStatus{Name: n, LastRun: start, Duration: took, Err: err.Error()})
		}
		e.log.Warn("reconciliation failed", "err", err)
	} else {
		e.setJob(JobStatus{Name: JobStuck, LastRun: start, Duration: took, Findings: r.StuckCount, Sample: r.Stuck,
			Detail: fmt.Sprintf("%d live transactions made no progress for %s with nothing scheduled; %d re-driven", r.StuckCount, c.StuckAfter, len(r.Stuck))})
		e.setJob(JobStatus{Name: JobExpiredTCC, LastRun: start, Duration: took, Findings: r.ExpiredCount, Sample: r.ExpiredTCC,
			Detail: fmt.Sprintf("%d TCC transactions still trying more than a minute past their deadline", r.ExpiredCount)})
		e.setJob(JobStatus{Name: JobInDoubt2PC, LastRun: start, Duration: took, Findings: r.InDoubtCount, Sample: r.InDoubt2PC,
			Detail: fmt.Sprintf("%d 2PC transactions still preparing more than a minute past their deadline", r.InDoubtCount)})
		for _, g := range r.Stuck {
			e.log.Warn("reconciliation: re-driving a stuck transaction", "gid", g, "stuck_after", c.StuckAfter)
		}
	}
	if c.Retention < 0 {
		e.setJob(JobStatus{Name: JobRetention, LastRun: start, Detail: "retention disabled: finished transactions are kept"})
		return
	}
	start = time.Now()
	deleted := 0
	var derr error
	for ctx.Err() == nil {
		n, err := e.cfg.Store.DeleteFinished(ctx, c.Retention, c.DeleteBatch)
		deleted += n
		if err != nil {
			derr = err
			break
		}
		if n < c.DeleteBatch {
			break
		}
	}
	s := JobStatus{Name: JobRetention, LastRun: start, Duration: time.Since(start), Findings: deleted,
		Detail: fmt.Sprintf("deleted %d transactions finished more than %s ago, in batches of %d", deleted, c.Retention, c.DeleteBatch)}
	if derr != nil {
		s.Err = derr.Error()
	}
	e.setJob(s)
}
