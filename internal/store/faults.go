package store

import (
	"context"
	"time"
)

// Fault is one stored fault-injection rule (game days). The rule itself is opaque here (the JSON
// of pkg/fault's Rule); the store keeps what every replica must agree on: whether the rule is
// live (not deleted, not expired by the database clock) and how often it fired in all, so that
// MaxCount holds across replicas.
type Fault struct {
	ID        int64
	Rule      []byte // JSON of the rule
	MaxCount  int    // 0 = no bound
	Fired     int64
	Reason    string
	CreatedBy string
	CreatedAt time.Time
	ExpiresAt time.Time
	// DeletedBy and DeletedAt are set once an operator deleted the rule; the row is kept as the
	// audit record of what was injected, by whom and why.
	DeletedBy string
	DeletedAt time.Time
}

// CreateFaultParams describes a new rule; it expires at database now + ExpiresIn.
type CreateFaultParams struct {
	Rule      []byte
	MaxCount  int
	Reason    string
	CreatedBy string
	ExpiresIn time.Duration
}

// FaultStore keeps fault-injection rules. Every replica reads the live rules and takes a firing
// from the store, so rules apply cluster-wide and a rule's MaxCount is not exceeded.
type FaultStore interface {
	// CreateFault stores a rule and returns its row.
	CreateFault(ctx context.Context, p CreateFaultParams) (Fault, error)
	// ListFaults returns the live rules (not deleted, not expired), oldest first; with
	// all, also deleted and expired ones (newest first, at most limit; limit <= 0 = 100).
	ListFaults(ctx context.Context, all bool, limit int) ([]Fault, error)
	// DeleteFault marks a rule deleted by actor; ErrNotFound when there is no such rule or it
	// was deleted already. The row stays, for the audit trail.
	DeleteFault(ctx context.Context, id int64, actor string) (Fault, error)
	// FireFault takes one firing of a rule: true when the rule is live and had firings left
	// (its count is then incremented), false otherwise. Concurrent callers never exceed MaxCount.
	FireFault(ctx context.Context, id int64) (bool, error)
}
