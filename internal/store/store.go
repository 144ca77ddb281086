// Package store defines how the coordinator keeps its durable state. The engine talks to a
// Store; backends (store/postgres, later an embedded one) implement it and pass the one
// conformance suite in store/storetest. The store knows nothing of gRPC or of the engine's loop.
//
// Ownership: a replica owns a transaction while it holds its lease. The lease is computed from
// the database clock. Every write after a claim names the epoch it was claimed with; a write whose
// epoch no longer matches changes nothing and reports the ownership as lost.
package store

import (
	"context"
	"errors"
	"time"
)

// Errors callers check with errors.Is.
var (
	ErrNotFound = errors.New("transaction not found")
	// ErrLeased: another replica drives the transaction now.
	ErrLeased = errors.New("transaction is leased by another replica")
)

// Transaction is the row of one global transaction.
type Transaction struct {
	GID             string
	Mode            string
	Status          string
	Spec            []byte // the request spec as submitted (protobuf)
	SpecHash        []byte
	WorkflowName    string
	WorkflowVersion int
	Reason          string
	CreatedAt       time.Time
	UpdatedAt       time.Time
	Deadline        time.Time
	NextAttemptAt   time.Time // zero when terminal
	LeaseOwner      string
	LeaseExpiresAt  time.Time
	Epoch           int64
	// Paused: an operator stopped it; nobody drives it until unpaused.
	Paused bool
}

// Branch is the durable state of one op of one branch.
type Branch struct {
	Branch        string
	Op            string
	Position      int // order of the branch in the spec
	Status        string
	Attempts      int
	LastError     string
	NextAttemptAt time.Time
	// Uncertain: an earlier call may have taken effect without its outcome being known.
	Uncertain bool
	// Spec holds the branch's own endpoints and policy when it was registered separately (TCC);
	// nil when the transaction's spec has them. Written once, at creation or registration.
	Spec      []byte
	UpdatedAt time.Time
}

// Event is one entry of a transaction's history.
type Event struct {
	ID int64
	// At is when it happened; zero on a write means the time of the write.
	At     time.Time
	Kind   string
	Branch string
	Op     string
	Detail string
}

// CreateParams describes a new transaction, leased to Owner from the moment it exists.
type CreateParams struct {
	GID             string
	Mode            string
	Status          string
	Spec            []byte
	SpecHash        []byte
	WorkflowName    string
	WorkflowVersion int
	Timeout         time.Duration // deadline = database now + Timeout
	// Owner leases the new transaction to a replica that drives it at once. Empty: nobody
	// drives it yet (a TCC transaction waiting for its initiator); it becomes due at its deadline.
	Owner    string
	Lease    time.Duration
	Branches []Branch
	Events   []Event
}

// CreateResult says whether the transaction was created or already existed.
type CreateResult struct {
	Created     bool
	Transaction Transaction // the stored row (the existing one when Created is false)
}

// RecordParams is one fenced write to a transaction the caller owns.
type RecordParams struct {
	GID    string
	Epoch  int64
	Status string
	Reason string
	// Terminal ends ownership: the lease is cleared and nothing is due any more.
	Terminal bool
	// Paused marks the transaction paused (it must come with Terminal, which ends ownership
	// without finishing it); false unpauses.
	Paused bool
	// Lease extends the lease to database now + Lease (when not Terminal).
	Lease time.Duration
	// Branches are upserted (only those that changed need be given).
	Branches []Branch
	Events   []Event
	// WriteID, when not zero, makes the write idempotent: a write with the id of the last one
	// applied to the transaction (at the same epoch) changes nothing and reports Owned. A
	// writer that sends a write again after an error, not knowing whether it committed, gives
	// it the same id.
	WriteID int64
}

// RecordResult is the outcome of one RecordParams.
type RecordResult struct {
	// Owned is false when the epoch no longer matched: ownership was lost and nothing was written.
	Owned bool
	// LeaseExpiresAt is the new lease expiry (database clock) when Owned and not Terminal.
	LeaseExpiresAt time.Time
}

// ClaimParams asks for due transactions: live, not leased (or lease expired), next attempt due.
type ClaimParams struct {
	Owner string
	Lease time.Duration
	Limit int
}

// Claimed is a transaction the caller now owns, with its branches.
type Claimed struct {
	Transaction Transaction
	Branches    []Branch
}

// LeaseRef names an owned transaction.
type LeaseRef struct {
	GID   string
	Epoch int64
}

// RenewParams extends the leases of transactions the caller drives.
type RenewParams struct {
	Owner string
	Lease time.Duration
	Refs  []LeaseRef
}

// RenewResult lists which leases were extended.
type RenewResult struct {
	Renewed        map[string]bool
	LeaseExpiresAt time.Time
}

// Release hands a transaction back so that any replica may pick it up at NextAttemptAt.
type Release struct {
	GID           string
	Epoch         int64
	NextAttemptAt time.Time // zero = now
}

// RegisterParams adds branches to a transaction still open for registration.
type RegisterParams struct {
	GID string
	// Statuses the transaction must be in; it must also be unleased and before its deadline.
	Statuses []string
	// Branches to add; their Position is relative (0 for the first new branch) and is offset
	// by the branches already registered.
	Branches []Branch
	Events   []Event
	// MaxRows bounds the transaction's branch rows: when the rows already there plus Branches
	// would be more, nothing is added (RegisterResult.Full). 0 = no bound.
	MaxRows int
}

// RegisterResult says whether the transaction was open and which branches already existed.
type RegisterResult struct {
	// Open is false when the transaction was not in Statuses, was leased, or past its deadline;
	// nothing was written then, and Transaction tells why.
	Open        bool
	Transaction Transaction
	// Existing holds the stored spec of each given branch (by name) that was registered before
	// this call; those rows were left unchanged.
	Existing map[string][]byte
	// Full: MaxRows would have been passed, so no branch and no event was added.
	Full bool
}

// TransitionParams moves an unleased transaction to a new status and leases it to Owner.
type TransitionParams struct {
	GID    string
	From   []string
	To     string
	Reason string
	Owner  string
	Lease  time.Duration
	Events []Event
	// BeforeDeadline refuses the move once the transaction's deadline has passed on the
	// database clock, decided in the same statement (a TCC commit after its timeout).
	BeforeDeadline bool
}

// TransitionResult is the outcome of a Transition.
type TransitionResult struct {
	// Done is true when the transaction moved; Claimed then holds it, owned by Owner.
	Done    bool
	Claimed Claimed
	// Current is the stored row when Done is false (so the caller can say why).
	Current Transaction
}

// Workflow is one version of a registered workflow definition.
type Workflow struct {
	Name      string
	Version   int
	Spec      []byte
	SpecHash  []byte
	CreatedAt time.Time
}

// Stats summarises the transactions for metrics and the admin API. Every scrape of /metrics
// reads it on every replica, so it must stay cheap however many finished transactions the
// retention keeps: unfinished ones are counted exactly (from a small index), finished ones are
// one total from a cheap source.
type Stats struct {
	// ByStatus counts the unfinished transactions (every status outside FinishedStatuses) by
	// mode and status, exactly.
	ByStatus []StatusCount
	// Finished is how many finished transactions (FinishedStatuses) are kept: on PostgreSQL an
	// estimate from the planner's statistics (as fresh as autovacuum's last analyze), exact on
	// SQLite. How many finished, by mode and outcome, is a counter of the metrics.
	Finished      int
	Due           int           // live, next attempt due now
	Overdue       int           // due for longer than OverdueAfter
	OldestDue     time.Duration // how long the oldest due transaction has been due
	NeedsOperator int
	OldestRunning time.Time // creation time of the oldest live transaction (zero: none)
}

// StatusCount is the number of transactions in one mode and status.
type StatusCount struct {
	Mode, Status string
	Count        int
}

// OverdueAfter is how long a transaction may be due before it counts as overdue: longer than
// a healthy recovery loop ever lets it wait.
const OverdueAfter = 30 * time.Second

// ListFilter selects transactions for the admin list. Zero fields do not filter.
type ListFilter struct {
	Statuses      []string
	Modes         []string
	Workflow      string
	GIDPrefix     string
	CreatedAfter  time.Time
	CreatedBefore time.Time
	UpdatedAfter  time.Time
	UpdatedBefore time.Time
	// After is the cursor: list transactions created before this one (newest first).
	AfterCreated time.Time
	AfterGID     string
	Limit        int
}

// FinishedStatuses are the terminal statuses of every mode that need nothing more, not even an
// operator: what retention may delete.
var FinishedStatuses = []string{"succeeded", "compensated", "confirmed", "cancelled", "committed", "rolled_back", "aborted"}

// ReconcileParams tunes a reconciliation pass.
type ReconcileParams struct {
	// StuckAfter: a live, unpaused transaction not updated for this long is stuck.
	StuckAfter time.Duration
	// Grace: how long past its deadline an undecided TCC or an unfinished 2PC prepare phase may
	// stay before it counts as a finding (recovery should have acted by then).
	Grace time.Duration
	// Limit bounds how many gids each finding lists.
	Limit int
	// HandOver bounds how long the old owner of a re-driven transaction keeps its lease: enough
	// for it to notice (its next renewal fails on the new epoch) and stop calling participants
	// before recovery claims the transaction. The engine passes its lease.
	HandOver time.Duration
}

// ReconcileReport is what a pass found. Stuck transactions it also re-drove: made due now, so
// recovery claims them at once.
type ReconcileReport struct {
	Stuck        []string // live, not updated for StuckAfter; re-driven
	ExpiredTCC   []string // TCC still trying past deadline + grace
	InDoubt2PC   []string // 2PC still preparing past deadline + grace
	StuckCount   int
	ExpiredCount int
	InDoubtCount int
}

// Store is the coordinator's durable state.
type Store interface {
	// CreateTransaction inserts a transaction with its branches and events in one commit, or
	// returns the existing one (Created=false) when the gid is taken; nothing is written then.
	CreateTransaction(ctx context.Context, p CreateParams) (CreateResult, error)
	// RegisterBranches adds branches to an open transaction in one commit, atomically with the
	// check that it is still open (a concurrent Transition or claim waits or wins).
	RegisterBranches(ctx context.Context, p RegisterParams) (RegisterResult, error)
	// Transition moves an unleased transaction in one of From to To, leased to Owner at a new
	// epoch, with its events, in one commit.
	Transition(ctx context.Context, p TransitionParams) (TransitionResult, error)
	// Record applies fenced writes, all in one commit.
	Record(ctx context.Context, ps []RecordParams) ([]RecordResult, error)
	// Commit creates transactions (as CreateTransaction does, each result in the order of cs)
	// and applies fenced writes (as Record), all in one commit: the group commit.
	Commit(ctx context.Context, cs []CreateParams, ps []RecordParams) ([]CreateResult, []RecordResult, error)
	// GetTransaction returns a transaction and its branches (ordered by position, op), or
	// ErrNotFound.
	GetTransaction(ctx context.Context, gid string) (Transaction, []Branch, error)
	// GetView returns a transaction with its branches and history, read together (one round
	// trip where the backend allows).
	GetView(ctx context.Context, gid string) (Transaction, []Branch, []Event, error)
	// ListEvents returns a transaction's history in order.
	ListEvents(ctx context.Context, gid string) ([]Event, error)
	// ClaimDue claims up to Limit due transactions for Owner, incrementing their epochs.
	ClaimDue(ctx context.Context, p ClaimParams) ([]Claimed, error)
	// RenewLeases extends leases still held by Owner at the given epochs.
	RenewLeases(ctx context.Context, p RenewParams) (RenewResult, error)
	// ReleaseLeases hands transactions back (graceful shutdown).
	ReleaseLeases(ctx context.Context, owner string, rs []Release) error
	// RegisterWorkflow stores a definition as a new version of name, unless the newest version
	// has the same SpecHash (then it returns that one, Created=false).
	RegisterWorkflow(ctx context.Context, name string, spec, hash []byte) (w Workflow, created bool, err error)
	// GetWorkflow returns one version (0 = the newest), or ErrNotFound.
	GetWorkflow(ctx context.Context, name string, version int) (Workflow, error)
	// ListWorkflows returns every version of every workflow (or of name, if given), by name
	// then version.
	ListWorkflows(ctx context.Context, name string) ([]Workflow, error)
	// ListTransactions returns transactions matching f, newest first (created_at, gid
	// descending), at most f.Limit, without branches.
	ListTransactions(ctx context.Context, f ListFilter) ([]Transaction, error)
	// Stats summarises the transactions.
	Stats(ctx context.Context) (Stats, error)
	// ClaimForOperator claims a transaction in any status for an operator action, at a new epoch,
	// when it is unleased or its lease expired; otherwise it returns ErrLeased (wrapped, naming
	// the owner), or ErrNotFound.
	ClaimForOperator(ctx context.Context, gid, owner string, lease time.Duration) (Claimed, error)
	// Reconcile finds transactions that recovery should have moved on and re-drives stuck ones.
	Reconcile(ctx context.Context, p ReconcileParams) (ReconcileReport, error)
	// DeleteFinished deletes up to batch transactions (with branches and events) in
	// FinishedStatuses not updated for olderThan; it returns how many.
	DeleteFinished(ctx context.Context, olderThan time.Duration, batch int) (int, error)
	// QueueOperation stores an operator action for the replica that drives gid to apply; it
	// returns the queued row (with its id), or ErrNotFound.
	QueueOperation(ctx context.Context, q QueuedOperation) (QueuedOperation, error)
	// QueuedOperations returns up to limit queued actions that owner can apply now, oldest
	// first: those on transactions owner leases, unleased ones, or ones whose lease expired.
	// Actions another replica is to apply are not returned, so they cannot crowd owner's out.
	QueuedOperations(ctx context.Context, owner string, limit int) ([]QueuedOperation, error)
	// DeleteQueuedOperation removes a queued action once it was applied or refused.
	DeleteQueuedOperation(ctx context.Context, id int64) error
	// Now returns the database clock.
	Now(ctx context.Context) (time.Time, error)
	// Ping checks that the database answers and the schema is current.
	Ping(ctx context.Context) error
	Close()
	// FaultStore keeps the fault-injection rules of game days.
	FaultStore
}

// QueuedOperation is an operator action waiting for the replica that drives its transaction.
type QueuedOperation struct {
	ID                      int64
	GID, Action, Branch, Op string
	Actor, Reason           string
	QueuedAt                time.Time
}
