package admin

import (
	"encoding/json"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/store"
)

// The API's own JSON shapes, documented in openapi.json. They are kept apart from the gRPC
// messages so that the REST API stays stable when the protobuf grows, and speaks the words
// operators filter by (saga, tcc, 2pc, msg; the modes' own statuses) rather than enum names.

// Transaction is one transaction; Branches and Events are only filled in by the get route.
type Transaction struct {
	GID string `json:"gid"`
	// Mode is saga, tcc, 2pc or msg.
	Mode string `json:"mode"`
	// Status is the mode's own word (trying, cancelled, rolled_back, needs_operator, ...): what
	// the status filter and the statistics use.
	Status string `json:"status"`
	// State is the summary common to every mode: running, committing, compensating, succeeded,
	// compensated or needs_operator.
	State           string     `json:"state"`
	Paused          bool       `json:"paused"`
	Reason          string     `json:"reason,omitempty"`
	WorkflowName    string     `json:"workflow_name,omitempty"`
	WorkflowVersion int        `json:"workflow_version,omitempty"`
	CreatedAt       *time.Time `json:"created_at,omitempty"`
	UpdatedAt       *time.Time `json:"updated_at,omitempty"`
	Deadline        *time.Time `json:"deadline,omitempty"`
	NextAttemptAt   *time.Time `json:"next_attempt_at,omitempty"`
	LeaseOwner      string     `json:"lease_owner,omitempty"`
	LeaseExpiresAt  *time.Time `json:"lease_expires_at,omitempty"`
	Branches        []Branch   `json:"branches,omitempty"`
	Events          []Event    `json:"events,omitempty"`
	// Actions are the operator actions (retry, resume, rollback, pause, unpause) the
	// transaction's state machine allows now; only on the single-transaction routes. Resolve
	// is judged per branch when asked.
	Actions []string `json:"actions,omitempty"`
}

// Branch is one participant call of a transaction (a branch and an op).
type Branch struct {
	Name string `json:"name"`
	Op   string `json:"op"`
	// Status is pending, unknown, succeeded, failed or skipped.
	Status    string     `json:"status"`
	Attempts  int        `json:"attempts"`
	LastError string     `json:"last_error,omitempty"`
	UpdatedAt *time.Time `json:"updated_at,omitempty"`
	// NextAttemptAt and WaitingReason are set while the branch waits to be called again: when,
	// and why (its last failure, or calls held back by an open circuit breaker).
	NextAttemptAt *time.Time `json:"next_attempt_at,omitempty"`
	WaitingReason string     `json:"waiting_reason,omitempty"`
}

// Event is one entry of a transaction's history.
type Event struct {
	ID     int64      `json:"id"`
	At     *time.Time `json:"at,omitempty"`
	Kind   string     `json:"kind"`
	Branch string     `json:"branch,omitempty"`
	Op     string     `json:"op,omitempty"`
	Detail string     `json:"detail,omitempty"`
}

// TransactionList is one page of the list route.
type TransactionList struct {
	Transactions []Transaction `json:"transactions"`
	// NextCursor fetches the next page; empty on the last.
	NextCursor string `json:"next_cursor,omitempty"`
}

// Stats summarises every transaction.
type Stats struct {
	Counts []StatusCount  `json:"counts"`
	ByMode map[string]int `json:"by_mode"`
	Total  int            `json:"total"`
	// Finished is how many finished transactions are kept (an estimate on PostgreSQL); Counts
	// and ByMode hold the unfinished ones, exactly.
	Finished      int `json:"finished"`
	NeedsOperator int `json:"needs_operator"`
	Due           int `json:"due"`
	Overdue       int `json:"overdue"`
	// OldestDueSeconds is how long the oldest due transaction has waited for a replica.
	OldestDueSeconds float64 `json:"oldest_due_seconds"`
	// OldestRunningCreatedAt is when the oldest unfinished transaction was created.
	OldestRunningCreatedAt *time.Time `json:"oldest_running_created_at,omitempty"`
}

// StatusCount is the number of transactions of one mode in one status.
type StatusCount struct {
	Mode   string `json:"mode"`
	Status string `json:"status"`
	Count  int    `json:"count"`
}

// Workflow is one version of a registered workflow.
type Workflow struct {
	Name      string     `json:"name"`
	Version   int        `json:"version"`
	CreatedAt *time.Time `json:"created_at,omitempty"`
	// Definition is the saga spec in the protobuf JSON mapping of treaty.v1.SagaSpec.
	Definition json.RawMessage `json:"definition"`
}

// WorkflowList is the answer of the workflow routes.
type WorkflowList struct {
	Workflows []Workflow `json:"workflows"`
}

// JobList is the reconciliation jobs' status as the answering replica saw its last runs.
type JobList struct {
	// Replica is the answering replica's owner id; every replica runs the jobs on its own.
	Replica string `json:"replica"`
	Jobs    []Job  `json:"jobs"`
}

// Job is the last run of one reconciliation job.
type Job struct {
	Name string `json:"name"`
	// LastRun is absent until the job has run on this replica.
	LastRun         *time.Time `json:"last_run,omitempty"`
	DurationSeconds float64    `json:"duration_seconds"`
	// Findings counts what needs attention (stuck, expired, in doubt) or, for retention, what
	// was deleted.
	Findings int `json:"findings"`
	// Sample lists some of the gids concerned.
	Sample []string `json:"sample,omitempty"`
	Detail string   `json:"detail,omitempty"`
	Error  string   `json:"error,omitempty"`
}

// Whoami says who the caller is to the coordinator.
type Whoami struct {
	Role  Role   `json:"role"`
	Actor string `json:"actor"`
	// Open is true when the admin API needs no token (dev mode).
	Open bool `json:"open"`
}

// ActionRequest is the body of an action.
type ActionRequest struct {
	// Reason is required; it goes into the history with the actor.
	Reason string `json:"reason"`
	// Branch and Op name the branch to resolve (only for resolve).
	Branch string `json:"branch,omitempty"`
	Op     string `json:"op,omitempty"`
}

var modeWords = map[treatyv1.Mode]string{
	treatyv1.Mode_MODE_SAGA:      "saga",
	treatyv1.Mode_MODE_TCC:       "tcc",
	treatyv1.Mode_MODE_TWO_PHASE: "2pc",
	treatyv1.Mode_MODE_MESSAGE:   "msg",
}

func enumWord(s, prefix string) string { return strings.ToLower(strings.TrimPrefix(s, prefix)) }

func timeOf(t *timestamppb.Timestamp) *time.Time {
	if t == nil {
		return nil
	}
	v := t.AsTime()
	return &v
}

func transactionJSON(t *treatyv1.Transaction) Transaction {
	out := Transaction{
		GID: t.Gid, Mode: modeWords[t.Mode], Status: t.Phase, State: enumWord(t.Status.String(), "STATUS_"),
		Paused: t.Paused, Reason: t.Reason, WorkflowName: t.WorkflowName, WorkflowVersion: int(t.WorkflowVersion),
		CreatedAt: timeOf(t.CreatedAt), UpdatedAt: timeOf(t.UpdatedAt), Deadline: timeOf(t.Deadline),
		NextAttemptAt: timeOf(t.NextAttemptAt), LeaseOwner: t.LeaseOwner, LeaseExpiresAt: timeOf(t.LeaseExpiresAt),
	}
	for _, b := range t.Branches {
		out.Branches = append(out.Branches, Branch{
			Name: b.Name, Op: b.Op, Status: enumWord(b.Status.String(), "BRANCH_STATUS_"),
			Attempts: int(b.Attempts), LastError: b.LastError, UpdatedAt: timeOf(b.UpdatedAt),
			NextAttemptAt: timeOf(b.NextAttemptAt), WaitingReason: b.WaitingReason,
		})
	}
	for _, e := range t.Events {
		out.Events = append(out.Events, Event{ID: e.Id, At: timeOf(e.At), Kind: e.Kind, Branch: e.Branch, Op: e.Op, Detail: e.Detail})
	}
	return out
}

func statsJSON(s store.Stats) Stats {
	out := Stats{
		Counts: []StatusCount{}, ByMode: map[string]int{},
		NeedsOperator: s.NeedsOperator, Due: s.Due, Overdue: s.Overdue, OldestDueSeconds: s.OldestDue.Seconds(),
		Finished: s.Finished, Total: s.Finished,
	}
	for _, c := range s.ByStatus {
		out.Counts = append(out.Counts, StatusCount{Mode: c.Mode, Status: c.Status, Count: c.Count})
		out.ByMode[c.Mode] += c.Count
		out.Total += c.Count
	}
	if !s.OldestRunning.IsZero() {
		t := s.OldestRunning
		out.OldestRunningCreatedAt = &t
	}
	return out
}

func jobJSON(j engine.JobStatus) Job {
	out := Job{Name: j.Name, DurationSeconds: j.Duration.Seconds(), Findings: j.Findings, Sample: j.Sample, Detail: j.Detail, Error: j.Err}
	if !j.LastRun.IsZero() {
		t := j.LastRun
		out.LastRun = &t
	}
	return out
}

func workflowJSON(w *treatyv1.Workflow) (Workflow, error) {
	def, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(w.Saga)
	if err != nil {
		return Workflow{}, err
	}
	return Workflow{Name: w.Name, Version: int(w.Version), CreatedAt: timeOf(w.CreatedAt), Definition: def}, nil
}
