// Package storetest is the conformance suite every store.Store backend must pass. A backend's
// own test calls Run with a function that makes a fresh, empty, migrated store:
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) store.Store { return newTestStore(t) })
//	}
//
// The suite checks what the engine relies on: creation is idempotent per gid even under
// concurrency, leases come from the database clock, every write after a claim is fenced by
// epoch, claiming never hands one transaction to two owners, branch and event data round-trip,
// a transaction waiting for its initiator (unleased) takes branches only while open and is
// moved on by a Transition that a concurrent registration cannot slip past, and registered
// workflows are versioned per name. Timing checks compare against the store's own Now, so they hold for any backend
// whose leases use the same clock that Now reads.
package storetest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

// Timing used throughout. Short leases keep the suite fast; long ones mark transactions that
// must stay owned for the whole test even on a loaded machine.
const (
	shortLease = 200 * time.Millisecond
	longLease  = time.Minute
	// waitFor bounds every poll: far above shortLease so a slow CI machine does not flake, far
	// below the test timeout so a real hang fails with a message.
	waitFor      = 15 * time.Second
	pollInterval = 10 * time.Millisecond
)

// Run runs every conformance subtest, in parallel, each against its own store.
//
// newStore must return a store that is empty, migrated and isolated from every other call
// (subtests run concurrently), and must arrange with t.Cleanup to close it.
func Run(t *testing.T, newStore func(t *testing.T) store.Store) {
	t.Helper()
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"Create/NewIsLeasedToOwner", testCreateNew},
		{"Create/BranchesAndEventsRoundTrip", testCreateRoundTrip},
		{"Create/ExistingGIDWritesNothing", testCreateExisting},
		{"Create/ConcurrentSameGIDCreatesOnce", testCreateConcurrent},
		{"Create/UnleasedIsDueAtDeadline", testCreateUnleased},
		{"Record/UpdatesAndExtendsLease", testRecordUpdates},
		{"Record/UpsertsChangedBranches", testRecordUpsertBranches},
		{"Record/StaleEpochWritesNothing", testRecordStale},
		{"Record/UnknownGIDIsNotOwned", testRecordUnknown},
		{"Record/BatchAppliesAllButStale", testRecordBatch},
		{"Record/EmptyBatch", testRecordEmpty},
		{"Commit/CreatesAndRecordsInOne", testCommitCreatesAndRecords},
		{"Record/TerminalEndsOwnership", testRecordTerminal},
		{"Record/ShortLeaseBecomesClaimable", testRecordShortLease},
		{"Record/SameWriteAgainIsIdempotent", testRecordAgainIsIdempotent},
		{"ClaimDue/OnlyDueAndUnleased", testClaimOnlyDue},
		{"ClaimDue/HonoursLimit", testClaimLimit},
		{"ClaimDue/ConcurrentClaimersDisjoint", testClaimConcurrent},
		{"ClaimDue/MakesPreviousOwnerStale", testClaimFencesPrevious},
		{"RenewLeases/OnlyMatchingOwnerAndEpoch", testRenew},
		{"ReleaseLeases/ClaimableAtOnce", testReleaseNow},
		{"ReleaseLeases/ClaimableAtNextAttempt", testReleaseLater},
		{"ReleaseLeases/IgnoresWrongOwnerOrEpoch", testReleaseWrong},
		{"RegisterBranches/AddsWhileOpen", testRegisterAdds},
		{"RegisterBranches/ExistingLeftUnchanged", testRegisterExisting},
		{"RegisterBranches/RefusedWhenNotOpen", testRegisterRefused},
		{"RegisterBranches/RaceWithTransitionSerializes", testRegisterTransitionRace},
		{"RegisterBranches/ConcurrentGetDistinctPositions", testRegisterConcurrentPositions},
		{"Transition/MovesAndLeasesAtNewEpoch", testTransitionMoves},
		{"Transition/AnyOfFromWithReason", testTransitionReason},
		{"Transition/RefusedOutsideFromOrWhileLeased", testTransitionRefused},
		{"Transition/TakesOverExpiredLease", testTransitionExpired},
		{"Transition/BeforeDeadlineUsesTheDatabaseClock", testTransitionBeforeDeadline},
		{"GetTransaction/NotFound", testGetNotFound},
		{"ListEvents/InOrderPerTransaction", testListEvents},
		{"ListEvents/UnknownGIDIsEmpty", testListEventsUnknown},
		{"Branch/UncertainAndNextAttemptRoundTrip", testBranchRoundTrip},
		{"Branch/SpecWrittenOnceAndClaimed", testBranchSpec},
		{"Workflow/VersionsPerName", testWorkflowVersions},
		{"Workflow/ConcurrentSameDefinitionOnce", testWorkflowConcurrent},
		{"Stats/CountsAndBacklog", testStats},
		{"ListTransactions/FiltersAndPages", testList},
		{"Reconcile/FindsAndRedrives", testReconcile},
		{"DeleteFinished/OnlyFinishedInBatches", testDeleteFinished},
		{"OperatorQueue/QueueListDelete", testOperatorQueue},
		{"RegisterBranches/MaxRows", testRegisterMaxRows},
		{"Now/IsTheLeaseClock", testNow},
		{"Faults/CreateListDeleteFire", testFaults},
		{"Faults/MaxCountAcrossConcurrentReplicas", testFaultsMaxCountConcurrent},
		{"Ping/Current", testPing},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, newStore(t))
		})
	}
}

// ---- fixtures and helpers ----

// params is a two-step saga-shaped transaction: an action and a compensation per step.
func params(gid, owner string, lease time.Duration) store.CreateParams {
	return store.CreateParams{
		GID:             gid,
		Mode:            "saga",
		Status:          "running",
		Spec:            []byte("spec of " + gid),
		SpecHash:        []byte{0xde, 0xad, 0xbe, 0xef},
		WorkflowName:    "booking",
		WorkflowVersion: 3,
		Timeout:         time.Hour,
		Owner:           owner,
		Lease:           lease,
		Branches: []store.Branch{
			{Branch: "flight", Op: "action", Position: 0, Status: "pending"},
			{Branch: "flight", Op: "compensate", Position: 0, Status: "pending"},
			{Branch: "hotel", Op: "action", Position: 1, Status: "pending"},
			{Branch: "hotel", Op: "compensate", Position: 1, Status: "pending"},
		},
		Events: []store.Event{{Kind: "submitted", Detail: "saga with 2 steps"}},
	}
}

func create(t *testing.T, s store.Store, p store.CreateParams) store.Transaction {
	t.Helper()
	res, err := s.CreateTransaction(t.Context(), p)
	require.NoError(t, err)
	require.True(t, res.Created, "gid %q should be new", p.GID)
	return res.Transaction
}

func get(t *testing.T, s store.Store, gid string) (store.Transaction, []store.Branch) {
	t.Helper()
	tx, bs, err := s.GetTransaction(t.Context(), gid)
	require.NoError(t, err)
	return tx, bs
}

func events(t *testing.T, s store.Store, gid string) []store.Event {
	t.Helper()
	es, err := s.ListEvents(t.Context(), gid)
	require.NoError(t, err)
	return es
}

func record(t *testing.T, s store.Store, ps ...store.RecordParams) []store.RecordResult {
	t.Helper()
	res, err := s.Record(t.Context(), ps)
	require.NoError(t, err)
	require.Len(t, res, len(ps), "one result per RecordParams")
	return res
}

func claim(t *testing.T, s store.Store, owner string, lease time.Duration, limit int) []store.Claimed {
	t.Helper()
	cs, err := s.ClaimDue(t.Context(), store.ClaimParams{Owner: owner, Lease: lease, Limit: limit})
	require.NoError(t, err)
	return cs
}

func dbNow(t *testing.T, s store.Store) time.Time {
	t.Helper()
	now, err := s.Now(t.Context())
	require.NoError(t, err)
	require.False(t, now.IsZero(), "Now returned the zero time")
	return now
}

// eventually polls cond until it holds or waitFor passes. cond runs on the test goroutine, so
// it may use require.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", waitFor, what)
		}
		<-tick.C
	}
}

// waitDBTime waits until the store's clock has passed at, so that anything due at `at` is due.
func waitDBTime(t *testing.T, s store.Store, at time.Time) {
	t.Helper()
	eventually(t, "the database clock to pass "+at.String(), func() bool { return dbNow(t, s).After(at) })
}

// claimGIDs polls ClaimDue until every gid in want was claimed by owner, and returns what was
// claimed, by gid. It fails if anything outside want is claimed.
func claimGIDs(t *testing.T, s store.Store, owner string, lease time.Duration, want ...string) map[string]store.Claimed {
	t.Helper()
	wanted := make(map[string]bool, len(want))
	for _, g := range want {
		wanted[g] = true
	}
	got := map[string]store.Claimed{}
	eventually(t, fmt.Sprintf("%s to claim %v", owner, want), func() bool {
		for _, c := range claim(t, s, owner, lease, 100) {
			require.True(t, wanted[c.Transaction.GID], "claimed %q, which should not be due", c.Transaction.GID)
			require.NotContains(t, got, c.Transaction.GID, "claimed %q twice", c.Transaction.GID)
			got[c.Transaction.GID] = c
		}
		return len(got) == len(want)
	})
	return got
}

// requireBetween checks lo <= got <= hi, the way every database-clock check in the suite is
// made: bracket the operation with two reads of Now.
func requireBetween(t *testing.T, got, lo, hi time.Time, what string) {
	t.Helper()
	require.False(t, got.Before(lo), "%s = %s, before %s", what, got, lo)
	require.False(t, got.After(hi), "%s = %s, after %s", what, got, hi)
}

// requireBranchesEqual compares the durable fields of branches (UpdatedAt aside).
func requireBranchesEqual(t *testing.T, want, got []store.Branch) {
	t.Helper()
	require.Len(t, got, len(want))
	for i := range want {
		w, g := want[i], got[i]
		require.Equal(t, w.Branch, g.Branch, "branch %d", i)
		require.Equal(t, w.Op, g.Op, "branch %d (%s)", i, w.Branch)
		require.Equal(t, w.Position, g.Position, "position of %s/%s", w.Branch, w.Op)
		require.Equal(t, w.Status, g.Status, "status of %s/%s", w.Branch, w.Op)
		require.Equal(t, w.Attempts, g.Attempts, "attempts of %s/%s", w.Branch, w.Op)
		require.Equal(t, w.LastError, g.LastError, "last error of %s/%s", w.Branch, w.Op)
		require.True(t, w.NextAttemptAt.Equal(g.NextAttemptAt), "next attempt of %s/%s: want %s, got %s",
			w.Branch, w.Op, w.NextAttemptAt, g.NextAttemptAt)
		require.Equal(t, w.Uncertain, g.Uncertain, "uncertain of %s/%s", w.Branch, w.Op)
	}
}

func requireEventsEqual(t *testing.T, want, got []store.Event) {
	t.Helper()
	require.Len(t, got, len(want))
	for i := range want {
		require.Equal(t, want[i].Kind, got[i].Kind, "kind of event %d", i)
		require.Equal(t, want[i].Branch, got[i].Branch, "branch of event %d", i)
		require.Equal(t, want[i].Op, got[i].Op, "op of event %d", i)
		require.Equal(t, want[i].Detail, got[i].Detail, "detail of event %d", i)
	}
}

// us truncates to microseconds, the precision a database timestamp is guaranteed to keep.
func us(t time.Time) time.Time { return t.Truncate(time.Microsecond) }

// ---- CreateTransaction ----

func testCreateNew(t *testing.T, s store.Store) {
	p := params("create-new", "replica-a", shortLease)
	before := dbNow(t, s)
	res, err := s.CreateTransaction(t.Context(), p)
	after := dbNow(t, s)
	require.NoError(t, err)
	require.True(t, res.Created)

	stored, _ := get(t, s, p.GID)
	for _, tx := range []store.Transaction{res.Transaction, stored} {
		require.Equal(t, p.GID, tx.GID)
		require.Equal(t, p.Mode, tx.Mode)
		require.Equal(t, p.Status, tx.Status)
		require.Equal(t, p.Spec, tx.Spec)
		require.Equal(t, p.SpecHash, tx.SpecHash)
		require.Equal(t, p.WorkflowName, tx.WorkflowName)
		require.Equal(t, p.WorkflowVersion, tx.WorkflowVersion)
		require.Equal(t, "replica-a", tx.LeaseOwner, "a new transaction is leased to its creator")
		require.Equal(t, int64(1), tx.Epoch, "a new transaction starts at epoch 1")
		requireBetween(t, tx.LeaseExpiresAt, before.Add(p.Lease), after.Add(p.Lease), "LeaseExpiresAt")
		requireBetween(t, tx.Deadline, before.Add(p.Timeout), after.Add(p.Timeout), "Deadline")
		requireBetween(t, tx.CreatedAt, before, after, "CreatedAt")
		require.False(t, tx.NextAttemptAt.IsZero(), "a live transaction has a next attempt (for recovery)")
	}
	require.True(t, res.Transaction.CreatedAt.Equal(stored.CreatedAt), "the result carries the stored CreatedAt")
	require.True(t, res.Transaction.LeaseExpiresAt.Equal(stored.LeaseExpiresAt), "the result carries the stored lease")
	require.True(t, res.Transaction.Deadline.Equal(stored.Deadline), "the result carries the stored deadline")

	// Leased: nobody can claim it while the lease runs.
	require.Empty(t, claim(t, s, "replica-b", longLease, 10))
}

func testCreateRoundTrip(t *testing.T, s store.Store) {
	next := us(dbNow(t, s).Add(time.Hour))
	p := params("create-roundtrip", "replica-a", longLease)
	p.WorkflowName, p.WorkflowVersion = "", 0
	// Given out of order: the store returns them by (position, op).
	p.Branches = []store.Branch{
		{Branch: "car", Op: "compensate", Position: 2, Status: "pending"},
		{Branch: "hotel", Op: "action", Position: 1, Status: "pending"},
		{Branch: "flight", Op: "compensate", Position: 0, Status: "pending"},
		{Branch: "car", Op: "action", Position: 2, Status: "failed", Attempts: 3, LastError: "unavailable", NextAttemptAt: next, Uncertain: true},
		{Branch: "flight", Op: "action", Position: 0, Status: "pending"},
		{Branch: "hotel", Op: "compensate", Position: 1, Status: "pending"},
	}
	p.Events = []store.Event{
		{Kind: "submitted", Detail: "saga with 3 steps"},
		{Kind: "note", Branch: "car", Op: "action", Detail: "carried over"},
		{Kind: "note", Branch: "hotel", Detail: "third"},
	}
	create(t, s, p)

	tx, bs := get(t, s, p.GID)
	require.Equal(t, "", tx.WorkflowName)
	require.Equal(t, 0, tx.WorkflowVersion)
	want := []store.Branch{
		{Branch: "flight", Op: "action", Position: 0, Status: "pending"},
		{Branch: "flight", Op: "compensate", Position: 0, Status: "pending"},
		{Branch: "hotel", Op: "action", Position: 1, Status: "pending"},
		{Branch: "hotel", Op: "compensate", Position: 1, Status: "pending"},
		p.Branches[3],
		{Branch: "car", Op: "compensate", Position: 2, Status: "pending"},
	}
	requireBranchesEqual(t, want, bs)
	requireEventsEqual(t, p.Events, events(t, s, p.GID))
}

func testCreateExisting(t *testing.T, s store.Store) {
	first := create(t, s, params("create-twice", "replica-a", longLease))

	again := params("create-twice", "replica-b", shortLease)
	again.Mode, again.Status, again.Spec, again.SpecHash = "tcc", "trying", []byte("other"), []byte{1}
	again.Branches = append(again.Branches, store.Branch{Branch: "car", Op: "action", Position: 2, Status: "pending"})
	again.Events = []store.Event{{Kind: "submitted-again"}}
	res, err := s.CreateTransaction(t.Context(), again)
	require.NoError(t, err)
	require.False(t, res.Created, "a taken gid is not created again")

	// The result is the stored row, untouched.
	stored, _ := get(t, s, first.GID)
	for _, tx := range []store.Transaction{res.Transaction, stored} {
		require.Equal(t, "saga", tx.Mode)
		require.Equal(t, "running", tx.Status)
		require.Equal(t, []byte("spec of create-twice"), tx.Spec)
		require.Equal(t, []byte{0xde, 0xad, 0xbe, 0xef}, tx.SpecHash, "callers compare the hash to detect a different request")
		require.Equal(t, "replica-a", tx.LeaseOwner)
		require.Equal(t, int64(1), tx.Epoch)
		require.True(t, first.LeaseExpiresAt.Equal(tx.LeaseExpiresAt), "the lease is not reset")
		require.True(t, first.CreatedAt.Equal(tx.CreatedAt))
	}
	_, bs := get(t, s, first.GID)
	requireBranchesEqual(t, params("", "", 0).Branches, bs)
	requireEventsEqual(t, []store.Event{{Kind: "submitted", Detail: "saga with 2 steps"}}, events(t, s, first.GID))
}

func testCreateConcurrent(t *testing.T, s store.Store) {
	const n = 16
	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		res   = make([]store.CreateResult, n)
		errs  = make([]error, n)
	)
	for i := range n {
		wg.Go(func() {
			<-start
			p := params("create-race", fmt.Sprintf("replica-%d", i), longLease)
			p.Events = []store.Event{{Kind: "submitted", Detail: fmt.Sprintf("by %d", i)}}
			res[i], errs[i] = s.CreateTransaction(t.Context(), p)
		})
	}
	close(start)
	wg.Wait()

	created := -1
	for i := range n {
		require.NoError(t, errs[i], "creator %d", i)
		if res[i].Created {
			require.Equal(t, -1, created, "creators %d and %d both report Created", created, i)
			created = i
		}
	}
	require.NotEqual(t, -1, created, "exactly one creator must report Created")
	winner := fmt.Sprintf("replica-%d", created)
	for i := range n {
		require.Equal(t, winner, res[i].Transaction.LeaseOwner, "creator %d sees the winner's row", i)
		require.Equal(t, int64(1), res[i].Transaction.Epoch)
		require.True(t, res[created].Transaction.CreatedAt.Equal(res[i].Transaction.CreatedAt), "creator %d", i)
	}
	_, bs := get(t, s, "create-race")
	require.Len(t, bs, 4, "branches written once")
	requireEventsEqual(t, []store.Event{{Kind: "submitted", Detail: fmt.Sprintf("by %d", created)}}, events(t, s, "create-race"))
}

// ---- Record ----

func testRecordUpdates(t *testing.T, s store.Store) {
	tx := create(t, s, params("record-ok", "replica-a", shortLease))

	before := dbNow(t, s)
	res := record(t, s, store.RecordParams{
		GID: tx.GID, Epoch: 1, Status: "compensating", Reason: "hotel said no", Lease: longLease,
		Branches: []store.Branch{{Branch: "hotel", Op: "action", Position: 1, Status: "aborted", Attempts: 1, LastError: "no rooms"}},
		Events: []store.Event{
			{Kind: "failed", Branch: "hotel", Op: "action", Detail: "no rooms"},
			{Kind: "compensating", Detail: "turning back"},
		},
	})
	after := dbNow(t, s)
	require.True(t, res[0].Owned)
	requireBetween(t, res[0].LeaseExpiresAt, before.Add(longLease), after.Add(longLease), "RecordResult.LeaseExpiresAt")

	got, bs := get(t, s, tx.GID)
	require.Equal(t, "compensating", got.Status)
	require.Equal(t, "hotel said no", got.Reason)
	require.Equal(t, "replica-a", got.LeaseOwner, "recording keeps the owner")
	require.Equal(t, int64(1), got.Epoch, "recording does not change the epoch")
	require.True(t, res[0].LeaseExpiresAt.Equal(got.LeaseExpiresAt), "the result carries the stored lease")
	require.False(t, got.NextAttemptAt.IsZero())
	requireBetween(t, got.UpdatedAt, before, after, "UpdatedAt")
	require.Equal(t, "aborted", bs[2].Status)
	require.Equal(t, "no rooms", bs[2].LastError)
	requireEventsEqual(t, []store.Event{
		{Kind: "submitted", Detail: "saga with 2 steps"},
		{Kind: "failed", Branch: "hotel", Op: "action", Detail: "no rooms"},
		{Kind: "compensating", Detail: "turning back"},
	}, events(t, s, tx.GID))

	// The lease was extended past the creation lease: once that has passed, it is still owned.
	waitDBTime(t, s, tx.LeaseExpiresAt)
	require.Empty(t, claim(t, s, "replica-b", longLease, 10), "an extended lease is not claimable")
}

func testRecordUpsertBranches(t *testing.T, s store.Store) {
	tx := create(t, s, params("record-upsert", "replica-a", longLease))
	next := us(dbNow(t, s).Add(5 * time.Minute))

	record(t, s, store.RecordParams{
		GID: tx.GID, Epoch: tx.Epoch, Status: "running", Lease: longLease,
		Branches: []store.Branch{
			{Branch: "flight", Op: "action", Position: 0, Status: "retrying", Attempts: 2, LastError: "timeout", NextAttemptAt: next, Uncertain: true},
			{Branch: "car", Op: "action", Position: 2, Status: "pending"}, // new branch
		},
	})
	_, bs := get(t, s, tx.GID)
	requireBranchesEqual(t, []store.Branch{
		{Branch: "flight", Op: "action", Position: 0, Status: "retrying", Attempts: 2, LastError: "timeout", NextAttemptAt: next, Uncertain: true},
		{Branch: "flight", Op: "compensate", Position: 0, Status: "pending"},
		{Branch: "hotel", Op: "action", Position: 1, Status: "pending"},
		{Branch: "hotel", Op: "compensate", Position: 1, Status: "pending"},
		{Branch: "car", Op: "action", Position: 2, Status: "pending"},
	}, bs)

	// Only changed branches are given; the others keep their state.
	record(t, s, store.RecordParams{
		GID: tx.GID, Epoch: tx.Epoch, Status: "running", Lease: longLease,
		Branches: []store.Branch{
			{Branch: "flight", Op: "action", Position: 0, Status: "succeeded", Attempts: 3},
		},
	})
	_, bs = get(t, s, tx.GID)
	requireBranchesEqual(t, []store.Branch{
		{Branch: "flight", Op: "action", Position: 0, Status: "succeeded", Attempts: 3}, // cleared error, next attempt, uncertainty
		{Branch: "flight", Op: "compensate", Position: 0, Status: "pending"},
		{Branch: "hotel", Op: "action", Position: 1, Status: "pending"},
		{Branch: "hotel", Op: "compensate", Position: 1, Status: "pending"},
		{Branch: "car", Op: "action", Position: 2, Status: "pending"},
	}, bs)
}

func testRecordStale(t *testing.T, s store.Store) {
	tx := create(t, s, params("record-stale", "replica-a", longLease))
	_, wantBranches := get(t, s, tx.GID)

	res := record(t, s, store.RecordParams{
		GID: tx.GID, Epoch: tx.Epoch + 1, Status: "succeeded", Reason: "should not be written", Lease: longLease,
		Branches: []store.Branch{
			{Branch: "flight", Op: "action", Position: 0, Status: "succeeded", Attempts: 1},
			{Branch: "car", Op: "action", Position: 2, Status: "pending"},
		},
		Events: []store.Event{{Kind: "succeeded"}},
	})
	require.False(t, res[0].Owned, "a write at a wrong epoch reports ownership lost")

	got, bs := get(t, s, tx.GID)
	require.Equal(t, "running", got.Status)
	require.Equal(t, "", got.Reason)
	require.True(t, tx.LeaseExpiresAt.Equal(got.LeaseExpiresAt), "the lease is not extended")
	require.True(t, tx.UpdatedAt.Equal(got.UpdatedAt), "the row is not touched")
	requireBranchesEqual(t, wantBranches, bs)
	requireEventsEqual(t, params("", "", 0).Events, events(t, s, tx.GID))

	// Terminal at a stale epoch does not end the transaction either.
	res = record(t, s, store.RecordParams{GID: tx.GID, Epoch: 0, Status: "failed", Terminal: true})
	require.False(t, res[0].Owned)
	got, _ = get(t, s, tx.GID)
	require.Equal(t, "running", got.Status)
	require.Equal(t, "replica-a", got.LeaseOwner)
}

func testRecordUnknown(t *testing.T, s store.Store) {
	res := record(t, s, store.RecordParams{
		GID: "no-such-gid", Epoch: 1, Status: "running", Lease: longLease,
		Branches: []store.Branch{{Branch: "flight", Op: "action", Status: "pending"}},
		Events:   []store.Event{{Kind: "x"}},
	})
	require.False(t, res[0].Owned, "nobody owns a transaction that does not exist")
	_, _, err := s.GetTransaction(t.Context(), "no-such-gid")
	require.ErrorIs(t, err, store.ErrNotFound, "recording must not create a transaction")
}

func testRecordBatch(t *testing.T, s store.Store) {
	a := create(t, s, params("batch-a", "replica-a", longLease))
	b := create(t, s, params("batch-b", "replica-a", longLease))
	c := create(t, s, params("batch-c", "replica-a", longLease))

	step := func(gid string, epoch int64, status string) store.RecordParams {
		return store.RecordParams{
			GID: gid, Epoch: epoch, Status: status, Lease: longLease,
			Branches: []store.Branch{{Branch: "flight", Op: "action", Position: 0, Status: "succeeded", Attempts: 1}},
			Events:   []store.Event{{Kind: "step", Branch: "flight", Op: "action", Detail: status}},
		}
	}
	res := record(t, s, step(a.GID, a.Epoch, "a-1"), step(b.GID, b.Epoch+7, "b-stale"), step(c.GID, c.Epoch, "c-1"))
	require.True(t, res[0].Owned, "a")
	require.False(t, res[1].Owned, "b is stale")
	require.True(t, res[2].Owned, "c")

	for gid, want := range map[string]string{a.GID: "a-1", c.GID: "c-1"} {
		got, bs := get(t, s, gid)
		require.Equal(t, want, got.Status, gid)
		require.Equal(t, "succeeded", bs[0].Status, gid)
		require.Len(t, events(t, s, gid), 2, gid)
	}
	got, bs := get(t, s, b.GID)
	require.Equal(t, "running", got.Status)
	require.Equal(t, "pending", bs[0].Status)
	require.Len(t, events(t, s, b.GID), 1)

	// Several writes to one transaction in one batch apply in order.
	res = record(t, s, step(a.GID, a.Epoch, "a-2"), step(a.GID, a.Epoch, "a-3"))
	require.True(t, res[0].Owned)
	require.True(t, res[1].Owned)
	got, _ = get(t, s, a.GID)
	require.Equal(t, "a-3", got.Status, "the later write of a batch wins")
	es := events(t, s, a.GID)
	require.Len(t, es, 4)
	require.Equal(t, "a-2", es[2].Detail)
	require.Equal(t, "a-3", es[3].Detail)
}

func testRecordEmpty(t *testing.T, s store.Store) {
	res, err := s.Record(t.Context(), nil)
	require.NoError(t, err)
	require.Empty(t, res)
}

func testRecordTerminal(t *testing.T, s store.Store) {
	tx := create(t, s, params("record-terminal", "replica-a", shortLease))
	res := record(t, s, store.RecordParams{
		GID: tx.GID, Epoch: tx.Epoch, Status: "succeeded", Terminal: true, Lease: longLease,
		Branches: []store.Branch{{Branch: "hotel", Op: "action", Position: 1, Status: "succeeded", Attempts: 1}},
		Events:   []store.Event{{Kind: "succeeded"}},
	})
	require.True(t, res[0].Owned)
	require.True(t, res[0].LeaseExpiresAt.IsZero(), "a terminal write leaves no lease")

	got, bs := get(t, s, tx.GID)
	require.Equal(t, "succeeded", got.Status)
	require.Equal(t, "", got.LeaseOwner, "terminal clears the owner")
	require.True(t, got.LeaseExpiresAt.IsZero(), "terminal clears the lease")
	require.True(t, got.NextAttemptAt.IsZero(), "terminal leaves nothing due")
	require.Equal(t, "succeeded", bs[2].Status)
	require.Len(t, events(t, s, tx.GID), 2)

	// Past the lease it had, it is still not claimable, renewable or releasable into life.
	waitDBTime(t, s, tx.LeaseExpiresAt)
	require.Empty(t, claim(t, s, "replica-b", longLease, 10), "a terminal transaction is never claimed")
	rr, err := s.RenewLeases(t.Context(), store.RenewParams{Owner: "replica-a", Lease: longLease, Refs: []store.LeaseRef{{GID: tx.GID, Epoch: tx.Epoch}}})
	require.NoError(t, err)
	require.False(t, rr.Renewed[tx.GID], "a terminal transaction has no lease to renew")
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{{GID: tx.GID, Epoch: tx.Epoch}}))
	require.Empty(t, claim(t, s, "replica-b", longLease, 10), "releasing a terminal transaction does not revive it")
	got, _ = get(t, s, tx.GID)
	require.True(t, got.NextAttemptAt.IsZero())
}

func testRecordShortLease(t *testing.T, s store.Store) {
	// A write never shortens a lease: the owner may hold a longer one for a long call.
	long := create(t, s, params("record-keeps-long", "replica-a", longLease))
	kept := record(t, s, store.RecordParams{GID: long.GID, Epoch: long.Epoch, Status: "running", Lease: shortLease})
	require.True(t, kept[0].Owned)
	require.False(t, kept[0].LeaseExpiresAt.Before(long.LeaseExpiresAt), "a shorter lease in a write must not cut the longer one")

	tx := create(t, s, params("record-short", "replica-a", shortLease))
	res := record(t, s, store.RecordParams{GID: tx.GID, Epoch: tx.Epoch, Status: "running", Lease: shortLease})
	require.True(t, res[0].Owned)

	// The owner stopped recording: the transaction is claimable once that lease ran out, not before.
	got := claimGIDs(t, s, "replica-b", longLease, tx.GID)[tx.GID]
	claimedAt := got.Transaction.LeaseExpiresAt.Add(-longLease)
	require.False(t, claimedAt.Before(res[0].LeaseExpiresAt), "claimed at %s, before the lease expired at %s", claimedAt, res[0].LeaseExpiresAt)
	require.Equal(t, int64(2), got.Transaction.Epoch)
}

// ---- ClaimDue ----

func testClaimOnlyDue(t *testing.T, s store.Store) {
	ctx := t.Context()
	leased := create(t, s, params("claim-leased", "replica-a", longLease))
	expiring := create(t, s, params("claim-expiring", "replica-a", shortLease))
	terminal := create(t, s, params("claim-terminal", "replica-a", shortLease))
	record(t, s, store.RecordParams{GID: terminal.GID, Epoch: 1, Status: "failed", Terminal: true})
	released := create(t, s, params("claim-released", "replica-a", longLease))
	require.NoError(t, s.ReleaseLeases(ctx, "replica-a", []store.Release{{GID: released.GID, Epoch: 1}}))
	later := create(t, s, params("claim-later", "replica-a", longLease))
	require.NoError(t, s.ReleaseLeases(ctx, "replica-a", []store.Release{{GID: later.GID, Epoch: 1, NextAttemptAt: dbNow(t, s).Add(time.Hour)}}))

	before := dbNow(t, s)
	got := claimGIDs(t, s, "replica-b", longLease, expiring.GID, released.GID)
	after := dbNow(t, s)

	c := got[expiring.GID]
	require.False(t, c.Transaction.LeaseExpiresAt.Add(-longLease).Before(expiring.LeaseExpiresAt),
		"claimed before the previous lease expired")
	for _, c := range got {
		tx := c.Transaction
		require.Equal(t, "replica-b", tx.LeaseOwner, tx.GID)
		require.Equal(t, int64(2), tx.Epoch, "%s: a claim increments the epoch", tx.GID)
		requireBetween(t, tx.LeaseExpiresAt, before.Add(longLease), after.Add(longLease), tx.GID+" LeaseExpiresAt")
		require.Equal(t, "running", tx.Status, tx.GID)
		require.Equal(t, []byte("spec of "+tx.GID), tx.Spec, tx.GID)
		require.Equal(t, "booking", tx.WorkflowName, tx.GID)
		stored, bs := get(t, s, tx.GID)
		require.True(t, stored.LeaseExpiresAt.Equal(tx.LeaseExpiresAt), tx.GID)
		require.Equal(t, int64(2), stored.Epoch, tx.GID)
		require.Equal(t, "replica-b", stored.LeaseOwner, tx.GID)
		requireBranchesEqual(t, bs, c.Branches)
		requireBranchesEqual(t, params("", "", 0).Branches, c.Branches)
	}

	// Past the expiring lease, the rest is still not claimable.
	waitDBTime(t, s, terminal.LeaseExpiresAt)
	require.Empty(t, claim(t, s, "replica-c", longLease, 10))
	for gid, owner := range map[string]string{leased.GID: "replica-a", later.GID: "", terminal.GID: ""} {
		tx, _ := get(t, s, gid)
		require.Equal(t, owner, tx.LeaseOwner, gid)
		require.Equal(t, int64(1), tx.Epoch, gid)
	}
}

// released makes n transactions that are due at once.
func released(t *testing.T, s store.Store, prefix string, n int) []string {
	t.Helper()
	gids := make([]string, n)
	for i := range n {
		gids[i] = fmt.Sprintf("%s-%03d", prefix, i)
		create(t, s, params(gids[i], "replica-a", longLease))
		require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{{GID: gids[i], Epoch: 1}}))
	}
	return gids
}

func testClaimLimit(t *testing.T, s store.Store) {
	gids := released(t, s, "limit", 5)
	require.Empty(t, claim(t, s, "replica-b", longLease, 0), "Limit 0 claims nothing")

	seen := map[string]bool{}
	for _, want := range []int{2, 2, 1, 0} {
		cs := claim(t, s, "replica-b", longLease, 2)
		require.Len(t, cs, want)
		for _, c := range cs {
			require.False(t, seen[c.Transaction.GID], "%s claimed twice", c.Transaction.GID)
			seen[c.Transaction.GID] = true
		}
	}
	require.Len(t, seen, len(gids))
}

func testClaimConcurrent(t *testing.T, s store.Store) {
	const claimers, txs = 4, 40
	gids := released(t, s, "race", txs)

	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		got   = make([][]string, claimers)
		errs  = make([]error, claimers)
	)
	for i := range claimers {
		wg.Go(func() {
			<-start
			for {
				cs, err := s.ClaimDue(t.Context(), store.ClaimParams{Owner: fmt.Sprintf("claimer-%d", i), Lease: longLease, Limit: 3})
				if err != nil {
					errs[i] = err
					return
				}
				if len(cs) == 0 {
					return
				}
				for _, c := range cs {
					if c.Transaction.LeaseOwner != fmt.Sprintf("claimer-%d", i) || c.Transaction.Epoch != 2 {
						errs[i] = fmt.Errorf("claimed %s as owner %q at epoch %d", c.Transaction.GID, c.Transaction.LeaseOwner, c.Transaction.Epoch)
						return
					}
					got[i] = append(got[i], c.Transaction.GID)
				}
			}
		})
	}
	close(start)
	wg.Wait()

	owner := map[string]int{}
	for i := range claimers {
		require.NoError(t, errs[i], "claimer %d", i)
		for _, gid := range got[i] {
			prev, dup := owner[gid]
			require.False(t, dup, "%s claimed by claimer %d and claimer %d", gid, prev, i)
			owner[gid] = i
		}
	}
	// A claimer stops when everything left is locked by others, so the others took the rest.
	for _, c := range claim(t, s, "sweeper", longLease, txs) {
		require.NotContains(t, owner, c.Transaction.GID, "%s claimed twice", c.Transaction.GID)
		owner[c.Transaction.GID] = -1
	}
	require.Len(t, owner, len(gids))
	for _, gid := range gids {
		tx, _ := get(t, s, gid)
		require.Equal(t, int64(2), tx.Epoch, "%s claimed exactly once", gid)
	}
}

func testClaimFencesPrevious(t *testing.T, s store.Store) {
	old := create(t, s, params("fence", "replica-a", shortLease))
	c := claimGIDs(t, s, "replica-b", longLease, old.GID)[old.GID]
	require.Equal(t, old.Epoch+1, c.Transaction.Epoch)

	// The old owner wakes up (a GC pause, a partition) and tries to carry on.
	res := record(t, s, store.RecordParams{
		GID: old.GID, Epoch: old.Epoch, Status: "succeeded", Terminal: true,
		Branches: []store.Branch{{Branch: "flight", Op: "action", Position: 0, Status: "succeeded"}},
		Events:   []store.Event{{Kind: "succeeded"}},
	})
	require.False(t, res[0].Owned, "the previous owner's epoch is stale after a claim")
	rr, err := s.RenewLeases(t.Context(), store.RenewParams{Owner: "replica-a", Lease: longLease, Refs: []store.LeaseRef{{GID: old.GID, Epoch: old.Epoch}}})
	require.NoError(t, err)
	require.False(t, rr.Renewed[old.GID], "the previous owner cannot renew")
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{{GID: old.GID, Epoch: old.Epoch}}))

	tx, bs := get(t, s, old.GID)
	require.Equal(t, "running", tx.Status)
	require.Equal(t, "replica-b", tx.LeaseOwner)
	require.True(t, c.Transaction.LeaseExpiresAt.Equal(tx.LeaseExpiresAt), "the new owner's lease is intact")
	require.Equal(t, "pending", bs[0].Status)
	require.Len(t, events(t, s, old.GID), 1)

	// The new owner's writes go through.
	res = record(t, s, store.RecordParams{GID: old.GID, Epoch: c.Transaction.Epoch, Status: "compensating", Lease: longLease})
	require.True(t, res[0].Owned)
}

// ---- RenewLeases ----

func testRenew(t *testing.T, s store.Store) {
	mine := create(t, s, params("renew-mine", "replica-a", shortLease))
	wrongEpoch := create(t, s, params("renew-epoch", "replica-a", longLease))
	theirs := create(t, s, params("renew-theirs", "replica-b", longLease))
	done := create(t, s, params("renew-done", "replica-a", longLease))
	record(t, s, store.RecordParams{GID: done.GID, Epoch: 1, Status: "succeeded", Terminal: true})

	before := dbNow(t, s)
	res, err := s.RenewLeases(t.Context(), store.RenewParams{
		Owner: "replica-a", Lease: longLease,
		Refs: []store.LeaseRef{
			{GID: mine.GID, Epoch: 1},
			{GID: wrongEpoch.GID, Epoch: 2},
			{GID: theirs.GID, Epoch: 1},
			{GID: done.GID, Epoch: 1},
			{GID: "renew-unknown", Epoch: 1},
		},
	})
	after := dbNow(t, s)
	require.NoError(t, err)
	require.True(t, res.Renewed[mine.GID], "matching owner and epoch is renewed")
	for _, gid := range []string{wrongEpoch.GID, theirs.GID, done.GID, "renew-unknown"} {
		require.False(t, res.Renewed[gid], "%s must not be renewed", gid)
	}
	requireBetween(t, res.LeaseExpiresAt, before.Add(longLease), after.Add(longLease), "RenewResult.LeaseExpiresAt")

	got, _ := get(t, s, mine.GID)
	require.True(t, res.LeaseExpiresAt.Equal(got.LeaseExpiresAt), "the result carries the stored lease")
	require.Equal(t, int64(1), got.Epoch, "renewing keeps the epoch")
	for _, tx := range []store.Transaction{wrongEpoch, theirs} {
		got, _ := get(t, s, tx.GID)
		require.True(t, tx.LeaseExpiresAt.Equal(got.LeaseExpiresAt), "%s lease untouched", tx.GID)
		require.Equal(t, tx.LeaseOwner, got.LeaseOwner)
	}

	// The renewed lease outlives the one it replaced.
	waitDBTime(t, s, mine.LeaseExpiresAt)
	require.Empty(t, claim(t, s, "replica-c", longLease, 10))

	empty, err := s.RenewLeases(t.Context(), store.RenewParams{Owner: "replica-a", Lease: longLease})
	require.NoError(t, err)
	require.Empty(t, empty.Renewed)
}

// ---- ReleaseLeases ----

func testReleaseNow(t *testing.T, s store.Store) {
	tx := create(t, s, params("release-now", "replica-a", longLease))
	past := create(t, s, params("release-past", "replica-a", longLease))
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{
		{GID: tx.GID, Epoch: tx.Epoch},
		{GID: past.GID, Epoch: past.Epoch, NextAttemptAt: dbNow(t, s).Add(-time.Hour)},
	}))

	got, _ := get(t, s, tx.GID)
	require.Equal(t, "", got.LeaseOwner, "released: no owner")
	require.True(t, got.LeaseExpiresAt.IsZero(), "released: no lease")
	require.Equal(t, "running", got.Status, "releasing does not change the status")

	// Claimable at once, by anyone, without waiting for the lease it had.
	cs := claim(t, s, "replica-b", longLease, 10)
	require.Len(t, cs, 2)
	for _, c := range cs {
		require.Equal(t, int64(2), c.Transaction.Epoch)
		require.Equal(t, "replica-b", c.Transaction.LeaseOwner)
	}
}

func testReleaseLater(t *testing.T, s store.Store) {
	tx := create(t, s, params("release-later", "replica-a", longLease))
	next := dbNow(t, s).Add(300 * time.Millisecond)
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{{GID: tx.GID, Epoch: tx.Epoch, NextAttemptAt: next}}))

	got, _ := get(t, s, tx.GID)
	require.True(t, us(next).Equal(got.NextAttemptAt), "NextAttemptAt: want %s, got %s", next, got.NextAttemptAt)

	c := claimGIDs(t, s, "replica-b", longLease, tx.GID)[tx.GID]
	claimedAt := c.Transaction.LeaseExpiresAt.Add(-longLease)
	require.False(t, claimedAt.Before(us(next)), "claimed at %s, before its next attempt at %s", claimedAt, next)
}

func testReleaseWrong(t *testing.T, s store.Store) {
	tx := create(t, s, params("release-wrong", "replica-a", longLease))
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-b", []store.Release{{GID: tx.GID, Epoch: tx.Epoch}}))
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{{GID: tx.GID, Epoch: tx.Epoch + 1}}))
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{{GID: "release-unknown", Epoch: 1}}))
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", nil))

	got, _ := get(t, s, tx.GID)
	require.Equal(t, "replica-a", got.LeaseOwner)
	require.True(t, tx.LeaseExpiresAt.Equal(got.LeaseExpiresAt))
	require.Empty(t, claim(t, s, "replica-b", longLease, 10))
}

// ---- reads ----

func testGetNotFound(t *testing.T, s store.Store) {
	_, _, err := s.GetTransaction(t.Context(), "never-created")
	require.ErrorIs(t, err, store.ErrNotFound)
	require.Contains(t, err.Error(), "never-created", "the error names the gid")
}

func testListEvents(t *testing.T, s store.Store) {
	a := params("events-a", "replica-a", longLease)
	a.Events = []store.Event{{Kind: "submitted"}, {Kind: "a-2"}, {Kind: "a-3"}}
	b := params("events-b", "replica-a", longLease)
	b.Events = []store.Event{{Kind: "submitted"}, {Kind: "b-2"}}
	create(t, s, a)
	create(t, s, b)
	var wantA []store.Event
	wantA = append(wantA, a.Events...)
	for i := range 3 {
		ea := store.Event{Kind: "step", Branch: "flight", Op: "action", Detail: fmt.Sprintf("a %d", i)}
		eb := store.Event{Kind: "step", Branch: "hotel", Op: "compensate", Detail: fmt.Sprintf("b %d", i)}
		record(t, s,
			store.RecordParams{GID: a.GID, Epoch: 1, Status: "running", Lease: longLease, Events: []store.Event{ea, {Kind: "twin", Detail: ea.Detail}}},
			store.RecordParams{GID: b.GID, Epoch: 1, Status: "running", Lease: longLease, Events: []store.Event{eb}},
		)
		wantA = append(wantA, ea, store.Event{Kind: "twin", Detail: ea.Detail})
	}

	es := events(t, s, a.GID)
	requireEventsEqual(t, wantA, es)
	for i := 1; i < len(es); i++ {
		require.Greater(t, es[i].ID, es[i-1].ID, "event ids increase in order")
		require.False(t, es[i].At.Before(es[i-1].At), "event times do not go back")
	}
	for _, e := range es {
		require.False(t, e.At.IsZero())
	}
	require.Len(t, events(t, s, b.GID), 5, "events of other transactions are not mixed in")
}

func testBranchRoundTrip(t *testing.T, s store.Store) {
	tx := create(t, s, params("branch-roundtrip", "replica-a", shortLease))
	// Far from the lease on purpose, and with a time zone other than the database's, to catch
	// a backend that stores wall-clock text or drops the offset.
	next := us(dbNow(t, s).Add(36*time.Hour + 123456789*time.Nanosecond)).In(time.FixedZone("UTC+5:30", 5*3600+1800))
	want := []store.Branch{
		{Branch: "flight", Op: "action", Position: 0, Status: "unknown", Attempts: 4, LastError: "deadline exceeded", NextAttemptAt: next, Uncertain: true},
		{Branch: "flight", Op: "compensate", Position: 0, Status: "pending"},
		{Branch: "hotel", Op: "action", Position: 1, Status: "pending", Uncertain: true},
		{Branch: "hotel", Op: "compensate", Position: 1, Status: "pending"},
	}
	record(t, s, store.RecordParams{GID: tx.GID, Epoch: 1, Status: "running", Lease: shortLease, Branches: []store.Branch{want[0], want[2]}})
	_, bs := get(t, s, tx.GID)
	requireBranchesEqual(t, want, bs)

	// A claimer (recovery after a crash) sees the same, so it compensates the uncertain ones.
	c := claimGIDs(t, s, "replica-b", longLease, tx.GID)[tx.GID]
	requireBranchesEqual(t, want, c.Branches)

	// And clearing them round-trips too.
	want[0].Uncertain, want[0].NextAttemptAt, want[2].Uncertain = false, time.Time{}, false
	record(t, s, store.RecordParams{GID: tx.GID, Epoch: c.Transaction.Epoch, Status: "running", Lease: longLease, Branches: []store.Branch{want[0], want[2]}})
	_, bs = get(t, s, tx.GID)
	requireBranchesEqual(t, want, bs)
	for _, b := range bs {
		require.False(t, b.UpdatedAt.IsZero(), "%s/%s UpdatedAt", b.Branch, b.Op)
	}
}

// ---- clock and health ----

func testNow(t *testing.T, s store.Store) {
	a := dbNow(t, s)
	local := time.Now()
	b := dbNow(t, s)
	require.False(t, b.Before(a), "the database clock does not go back between calls")
	// Test databases run beside the tests; a skew this large means Now is not a clock at all.
	require.WithinDuration(t, local, a, time.Minute)

	// The lease a create hands out is measured on the clock Now reads.
	before := dbNow(t, s)
	tx := create(t, s, params("now-lease", "replica-a", longLease))
	after := dbNow(t, s)
	requireBetween(t, tx.LeaseExpiresAt, before.Add(longLease), after.Add(longLease), "LeaseExpiresAt")
}

func testPing(t *testing.T, s store.Store) {
	require.NoError(t, s.Ping(t.Context()), "a migrated store answers Ping")
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	err := s.Ping(ctx)
	require.Error(t, err, "Ping with a cancelled context must not report a healthy store")
}
