package bench

import (
	"context"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// StatementTime is one SQL statement's share of the measured phase, timed from the Go side
// (pg_stat_statements needs shared_preload_libraries, i.e. a server restart): calls and the wall
// time from sending it to its result being read, round trip and waits included, so it says
// where a saga waits on the database more than what the server's CPU does.
type StatementTime struct {
	SQL     string  `json:"sql"` // the statement's first 80 bytes, whitespace folded
	Calls   int64   `json:"calls"`
	TotalMs float64 `json:"total_ms"`
	MeanMs  float64 `json:"mean_ms"`
	// PerSaga is Calls divided by the sagas of the phase.
	PerSaga float64 `json:"per_saga"`
	// Batches counts the pipelined batches the statement rode in (group commits); 0 for
	// statements sent alone.
	Batches int64 `json:"batches,omitempty"`
}

// stmtTracer is a pgx QueryTracer and BatchTracer that sums time per statement while on.
type stmtTracer struct {
	on atomic.Bool
	mu sync.Mutex
	by map[string]*stmtAcc
}

type stmtAcc struct {
	calls, batches int64
	total          time.Duration
}

type stmtStartKey struct{}

type stmtStart struct {
	sql string
	at  time.Time
}

func newStmtTracer() *stmtTracer { return &stmtTracer{by: map[string]*stmtAcc{}} }

func (t *stmtTracer) add(sql string, d time.Duration, batch bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	a := t.by[sql]
	if a == nil {
		a = &stmtAcc{}
		t.by[sql] = a
	}
	a.calls++
	a.total += d
	if batch {
		a.batches++
	}
}

func (t *stmtTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	if !t.on.Load() {
		return ctx
	}
	return context.WithValue(ctx, stmtStartKey{}, stmtStart{sql: data.SQL, at: time.Now()})
}

func (t *stmtTracer) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryEndData) {
	if s, ok := ctx.Value(stmtStartKey{}).(stmtStart); ok {
		t.add(s.sql, time.Since(s.at), false)
	}
}

func (t *stmtTracer) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	if !t.on.Load() {
		return ctx
	}
	return context.WithValue(ctx, stmtStartKey{}, stmtStart{sql: "batch", at: time.Now()})
}

// TraceBatchQuery times each statement of a batch from when pgx asked for its result: the first
// one carries the batch's round trip, the rest mostly their own execution.
func (t *stmtTracer) TraceBatchQuery(ctx context.Context, _ *pgx.Conn, data pgx.TraceBatchQueryData) {
	if _, ok := ctx.Value(stmtStartKey{}).(stmtStart); !ok || data.ReadStartTime.IsZero() {
		return
	}
	t.add(data.SQL, time.Since(data.ReadStartTime), true)
}

func (t *stmtTracer) TraceBatchEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchEndData) {
	if s, ok := ctx.Value(stmtStartKey{}).(stmtStart); ok {
		t.add("(pipelined batch, whole)", time.Since(s.at), false)
	}
}

// results returns the statements by total time, most first.
func (t *stmtTracer) results(sagas int64) []StatementTime {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]StatementTime, 0, len(t.by))
	for sql, a := range t.by {
		st := StatementTime{SQL: foldSQL(sql), Calls: a.calls, TotalMs: Millis(a.total),
			MeanMs: Millis(a.total / time.Duration(max(a.calls, 1))), Batches: a.batches}
		if sagas > 0 {
			st.PerSaga = Round3(float64(a.calls) / float64(sagas))
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b StatementTime) int {
		switch {
		case a.TotalMs > b.TotalMs:
			return -1
		case a.TotalMs < b.TotalMs:
			return 1
		}
		return strings.Compare(a.SQL, b.SQL)
	})
	return out
}

// foldSQL folds whitespace and keeps the first 80 bytes, enough to tell the store's statements
// apart.
func foldSQL(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 80 {
		s = s[:80]
	}
	return s
}
