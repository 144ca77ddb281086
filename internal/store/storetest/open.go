package storetest

// Transactions that wait for their initiator (TCC, transactional messages): created unleased,
// branches registered while open, moved on by a Transition.

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

// openParams is a TCC-shaped transaction waiting for its initiator: unleased, no branches yet.
func openParams(gid string, timeout time.Duration) store.CreateParams {
	return store.CreateParams{
		GID:      gid,
		Mode:     "tcc",
		Status:   "trying",
		Spec:     []byte("spec of " + gid),
		SpecHash: []byte{0xca, 0xfe},
		Timeout:  timeout,
		Events:   []store.Event{{Kind: "begun"}},
	}
}

// pair is one TCC branch as the engine registers it: a confirm and a cancel sharing a
// position and a spec. rel is the position relative to the first new branch of the call.
func pair(name string, rel int, spec []byte) []store.Branch {
	return []store.Branch{
		{Branch: name, Op: "confirm", Position: rel, Status: "pending", Spec: spec},
		{Branch: name, Op: "cancel", Position: rel, Status: "pending", Spec: spec},
	}
}

// stored is a pair as the store returns it: by position, then op ("cancel" < "confirm"), at
// its absolute position.
func stored(name string, pos int, spec []byte) []store.Branch {
	return []store.Branch{
		{Branch: name, Op: "cancel", Position: pos, Status: "pending", Spec: spec},
		{Branch: name, Op: "confirm", Position: pos, Status: "pending", Spec: spec},
	}
}

func registered(name string) store.Event {
	return store.Event{Kind: "branch_registered", Branch: name, Op: "try"}
}

func register(t *testing.T, s store.Store, gid string, statuses []string, bs []store.Branch, es ...store.Event) store.RegisterResult {
	t.Helper()
	res, err := s.RegisterBranches(t.Context(), store.RegisterParams{GID: gid, Statuses: statuses, Branches: bs, Events: es})
	require.NoError(t, err)
	require.NotNil(t, res.Existing, "Existing is a map even when empty")
	return res
}

func transition(t *testing.T, s store.Store, p store.TransitionParams) store.TransitionResult {
	t.Helper()
	res, err := s.Transition(t.Context(), p)
	require.NoError(t, err)
	return res
}

// requireSpecsEqual compares Branch.Spec, which requireBranchesEqual leaves aside. A nil spec
// may come back as nil or empty.
func requireSpecsEqual(t *testing.T, want, got []store.Branch) {
	t.Helper()
	require.Len(t, got, len(want))
	for i := range want {
		if len(want[i].Spec) == 0 {
			require.Empty(t, got[i].Spec, "spec of %s/%s", want[i].Branch, want[i].Op)
			continue
		}
		require.Equal(t, want[i].Spec, got[i].Spec, "spec of %s/%s", want[i].Branch, want[i].Op)
	}
}

func requireBranchesAndSpecs(t *testing.T, want, got []store.Branch) {
	t.Helper()
	requireBranchesEqual(t, want, got)
	requireSpecsEqual(t, want, got)
}

// ---- CreateTransaction without an owner ----

func testCreateUnleased(t *testing.T, s store.Store) {
	p := openParams("unleased", time.Hour)
	before := dbNow(t, s)
	res, err := s.CreateTransaction(t.Context(), p)
	after := dbNow(t, s)
	require.NoError(t, err)
	require.True(t, res.Created)

	got, bs := get(t, s, p.GID)
	require.Empty(t, bs)
	for _, tx := range []store.Transaction{res.Transaction, got} {
		require.Equal(t, "", tx.LeaseOwner, "nobody drives it yet")
		require.True(t, tx.LeaseExpiresAt.IsZero(), "no lease")
		require.Equal(t, int64(1), tx.Epoch)
		require.Equal(t, "trying", tx.Status)
		requireBetween(t, tx.Deadline, before.Add(p.Timeout), after.Add(p.Timeout), "Deadline")
		require.True(t, tx.NextAttemptAt.Equal(tx.Deadline), "due at its deadline: NextAttemptAt %s, Deadline %s", tx.NextAttemptAt, tx.Deadline)
	}
	require.True(t, res.Transaction.Deadline.Equal(got.Deadline), "the result carries the stored deadline")
	require.Empty(t, claim(t, s, "replica-b", longLease, 10), "an unleased transaction is not due before its deadline")

	// One with a short timeout is claimed at its deadline, not before.
	soon := create(t, s, openParams("unleased-soon", shortLease))
	c := claimGIDs(t, s, "replica-b", longLease, soon.GID)[soon.GID]
	claimedAt := c.Transaction.LeaseExpiresAt.Add(-longLease)
	require.False(t, claimedAt.Before(soon.Deadline), "claimed at %s, before its deadline %s", claimedAt, soon.Deadline)
	require.Equal(t, "replica-b", c.Transaction.LeaseOwner)
	require.Equal(t, int64(2), c.Transaction.Epoch)
	require.Equal(t, "trying", c.Transaction.Status, "claiming does not change the status")
}

// ---- Branch.Spec ----

func testBranchSpec(t *testing.T, s store.Store) {
	p := params("branch-spec", "replica-a", longLease)
	flight := []byte("flight endpoints and policy")
	p.Branches[0].Spec, p.Branches[1].Spec = flight, flight // hotel keeps nil: the spec has it
	create(t, s, p)
	_, bs := get(t, s, p.GID)
	requireBranchesAndSpecs(t, p.Branches, bs)

	// Written once: Record changes state, never a spec, even when one is given or the branch is new.
	record(t, s, store.RecordParams{
		GID: p.GID, Epoch: 1, Status: "running", Lease: longLease,
		Branches: []store.Branch{
			{Branch: "flight", Op: "action", Position: 0, Status: "succeeded", Attempts: 1}, // nil spec
			{Branch: "hotel", Op: "action", Position: 1, Status: "succeeded", Attempts: 1, Spec: []byte("not to be written")},
			{Branch: "car", Op: "action", Position: 2, Status: "pending", Spec: []byte("not to be written")},
		},
	})
	want := []store.Branch{
		{Branch: "flight", Op: "action", Position: 0, Status: "succeeded", Attempts: 1, Spec: flight},
		{Branch: "flight", Op: "compensate", Position: 0, Status: "pending", Spec: flight},
		{Branch: "hotel", Op: "action", Position: 1, Status: "succeeded", Attempts: 1},
		{Branch: "hotel", Op: "compensate", Position: 1, Status: "pending"},
		{Branch: "car", Op: "action", Position: 2, Status: "pending"},
	}
	_, bs = get(t, s, p.GID)
	requireBranchesAndSpecs(t, want, bs)

	// A claimer (recovery) gets the specs too: it may have nothing else to call the branch with.
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{{GID: p.GID, Epoch: 1}}))
	c := claimGIDs(t, s, "replica-b", longLease, p.GID)[p.GID]
	requireBranchesAndSpecs(t, want, c.Branches)
}

// ---- RegisterBranches ----

func testRegisterAdds(t *testing.T, s store.Store) {
	tx := create(t, s, openParams("register-add", time.Hour))
	specA, specB, specC := []byte("a endpoints"), []byte("b endpoints"), []byte("c endpoints")

	res := register(t, s, tx.GID, []string{"trying"}, pair("a", 0, specA), registered("a"))
	require.True(t, res.Open)
	require.Empty(t, res.Existing, "nothing was registered before")
	require.Equal(t, tx.GID, res.Transaction.GID)
	require.Equal(t, "trying", res.Transaction.Status)

	// Two at once, with relative positions; any of several statuses will do.
	both := append(pair("b", 0, specB), pair("c", 1, specC)...)
	res = register(t, s, tx.GID, []string{"preparing", "trying"}, both, registered("b"), registered("c"))
	require.True(t, res.Open)
	require.Empty(t, res.Existing)

	got, bs := get(t, s, tx.GID)
	var want []store.Branch
	want = append(want, stored("a", 0, specA)...)
	want = append(want, stored("b", 1, specB)...)
	want = append(want, stored("c", 2, specC)...)
	requireBranchesAndSpecs(t, want, bs)
	requireEventsEqual(t, []store.Event{{Kind: "begun"}, registered("a"), registered("b"), registered("c")}, events(t, s, tx.GID))

	// Registering neither leases the transaction nor moves its due time.
	require.Equal(t, "", got.LeaseOwner)
	require.True(t, got.LeaseExpiresAt.IsZero())
	require.Equal(t, int64(1), got.Epoch)
	require.True(t, tx.NextAttemptAt.Equal(got.NextAttemptAt), "still due at its deadline")
	require.True(t, tx.Deadline.Equal(got.Deadline))

	// Positions continue after branches given at creation.
	p := params("register-after-create", "", 0)
	p.Timeout = time.Hour
	create(t, s, p)
	require.True(t, register(t, s, p.GID, []string{"running"}, pair("car", 0, specC)).Open)
	_, bs = get(t, s, p.GID)
	requireBranchesAndSpecs(t, append(append([]store.Branch{}, p.Branches...), stored("car", 2, specC)...), bs)
}

func testRegisterExisting(t *testing.T, s store.Store) {
	tx := create(t, s, openParams("register-again", time.Hour))
	specA, specC := []byte("a endpoints"), []byte("c endpoints")
	require.True(t, register(t, s, tx.GID, []string{"trying"}, pair("a", 0, specA), registered("a")).Open)

	// a again (with another spec, as a confused initiator might), c new (the first new branch,
	// so at relative position 0), and a note about the transaction itself.
	again := append(pair("a", 0, []byte("other endpoints")), pair("c", 0, specC)...)
	res := register(t, s, tx.GID, []string{"trying"}, again, registered("a"), registered("c"), store.Event{Kind: "note", Detail: "about the transaction"})
	require.True(t, res.Open)
	require.Equal(t, map[string][]byte{"a": specA}, res.Existing, "Existing has the stored spec of what was there before, and nothing new")

	_, bs := get(t, s, tx.GID)
	requireBranchesAndSpecs(t, append(stored("a", 0, specA), stored("c", 1, specC)...), bs)
	// Events about a branch are written only for new branches; one without a branch always is.
	requireEventsEqual(t, []store.Event{
		{Kind: "begun"}, registered("a"), registered("c"), {Kind: "note", Detail: "about the transaction"},
	}, events(t, s, tx.GID))

	// The very same call again writes nothing and reports both.
	res = register(t, s, tx.GID, []string{"trying"}, again, registered("a"), registered("c"))
	require.True(t, res.Open)
	require.Equal(t, map[string][]byte{"a": specA, "c": specC}, res.Existing)
	_, bs = get(t, s, tx.GID)
	require.Len(t, bs, 4)
	require.Len(t, events(t, s, tx.GID), 4)
}

func testRegisterRefused(t *testing.T, s store.Store) {
	ctx := t.Context()
	wrongStatus := create(t, s, openParams("register-status", time.Hour))
	leased := create(t, s, params("register-leased", "replica-a", longLease))
	expired := create(t, s, params("register-expired", "replica-a", shortLease))
	late := create(t, s, openParams("register-late", shortLease))
	moved := create(t, s, openParams("register-moved", time.Hour))
	require.True(t, transition(t, s, store.TransitionParams{GID: moved.GID, From: []string{"trying"}, To: "confirming", Owner: "replica-a", Lease: longLease}).Done)
	waitDBTime(t, s, expired.LeaseExpiresAt)
	waitDBTime(t, s, late.Deadline)

	cases := []struct {
		gid, status, why string
		statuses         []string
	}{
		{wrongStatus.GID, "trying", "not in Statuses", []string{"confirming", "cancelling"}},
		{leased.GID, "running", "leased", []string{"running"}},
		// An expired lease still has an owner, who may still be driving it: only a Transition or
		// a claim (which fence that owner with a new epoch) may take it from there.
		{expired.GID, "running", "leased, lease expired", []string{"running"}},
		{late.GID, "trying", "past its deadline", []string{"trying"}},
		{moved.GID, "confirming", "moved on by a Transition", []string{"trying"}},
	}
	for _, tc := range cases {
		before, bsBefore := get(t, s, tc.gid)
		esBefore := events(t, s, tc.gid)
		res := register(t, s, tc.gid, tc.statuses, pair("late", 0, []byte("late endpoints")), registered("late"))
		require.False(t, res.Open, "%s: %s", tc.gid, tc.why)
		require.Equal(t, tc.gid, res.Transaction.GID, "%s: the result says why, with the stored row", tc.gid)
		require.Equal(t, tc.status, res.Transaction.Status, tc.gid)
		require.Equal(t, before.LeaseOwner, res.Transaction.LeaseOwner, tc.gid)
		require.True(t, before.Deadline.Equal(res.Transaction.Deadline), tc.gid)
		require.Empty(t, res.Existing, tc.gid)

		after, bs := get(t, s, tc.gid)
		require.Equal(t, before.Epoch, after.Epoch, "%s: nothing written", tc.gid)
		require.True(t, before.UpdatedAt.Equal(after.UpdatedAt), "%s: the row is not touched", tc.gid)
		requireBranchesEqual(t, bsBefore, bs)
		require.Len(t, events(t, s, tc.gid), len(esBefore), "%s: no event", tc.gid)
	}

	_, err := s.RegisterBranches(ctx, store.RegisterParams{GID: "register-unknown", Statuses: []string{"trying"}, Branches: pair("a", 0, nil)})
	require.ErrorIs(t, err, store.ErrNotFound)
	_, _, err = s.GetTransaction(ctx, "register-unknown")
	require.ErrorIs(t, err, store.ErrNotFound, "registering does not create a transaction")
}

// A registration racing the decision: either it lands before the Transition and the new owner
// sees the branch (it will confirm or cancel it), or it is refused. Never a branch registered
// after the decision was taken, which nobody would ever confirm or cancel.
func testRegisterTransitionRace(t *testing.T, s store.Store) {
	const n = 16
	gids := make([]string, n)
	for i := range n {
		gids[i] = fmt.Sprintf("race-register-%02d", i)
		create(t, s, openParams(gids[i], time.Hour))
	}
	var (
		wg       sync.WaitGroup
		start    = make(chan struct{})
		regs     = make([]store.RegisterResult, n)
		trans    = make([]store.TransitionResult, n)
		regErrs  = make([]error, n)
		tranErrs = make([]error, n)
	)
	for i := range n {
		wg.Go(func() {
			<-start
			regs[i], regErrs[i] = s.RegisterBranches(t.Context(), store.RegisterParams{
				GID: gids[i], Statuses: []string{"trying"}, Branches: pair("late", 0, []byte("late endpoints")),
				Events: []store.Event{registered("late")},
			})
		})
		wg.Go(func() {
			<-start
			trans[i], tranErrs[i] = s.Transition(t.Context(), store.TransitionParams{
				GID: gids[i], From: []string{"trying"}, To: "confirming", Owner: "replica-a", Lease: longLease,
				Events: []store.Event{{Kind: "confirming"}},
			})
		})
	}
	close(start)
	wg.Wait()

	var before, refused int
	for i, gid := range gids {
		require.NoError(t, regErrs[i], gid)
		require.NoError(t, tranErrs[i], gid)
		require.True(t, trans[i].Done, "%s: nothing but a registration competes with the transition", gid)
		_, bs := get(t, s, gid)
		requireBranchesEqual(t, bs, trans[i].Claimed.Branches)
		if regs[i].Open {
			before++
			requireBranchesAndSpecs(t, stored("late", 0, []byte("late endpoints")), trans[i].Claimed.Branches)
			requireEventsEqual(t, []store.Event{{Kind: "begun"}, registered("late"), {Kind: "confirming"}}, events(t, s, gid))
		} else {
			refused++
			require.Equal(t, "confirming", regs[i].Transaction.Status, "%s: refused because the transition came first", gid)
			require.Empty(t, trans[i].Claimed.Branches, gid)
			require.Empty(t, bs, "%s: a refused registration writes nothing", gid)
			requireEventsEqual(t, []store.Event{{Kind: "begun"}, {Kind: "confirming"}}, events(t, s, gid))
		}
	}
	t.Logf("%d registrations landed before the transition, %d were refused", before, refused)
}

// ---- Transition ----

func testTransitionMoves(t *testing.T, s store.Store) {
	tx := create(t, s, openParams("transition", time.Hour))
	spec := []byte("a endpoints")
	require.True(t, register(t, s, tx.GID, []string{"trying"}, pair("a", 0, spec), registered("a")).Open)

	before := dbNow(t, s)
	res := transition(t, s, store.TransitionParams{
		GID: tx.GID, From: []string{"trying"}, To: "confirming", Owner: "replica-b", Lease: longLease,
		Events: []store.Event{{Kind: "confirming", Detail: "initiator committed"}},
	})
	after := dbNow(t, s)
	require.True(t, res.Done)

	got, bs := get(t, s, tx.GID)
	for _, c := range []store.Transaction{res.Claimed.Transaction, got} {
		require.Equal(t, "confirming", c.Status)
		require.Equal(t, "replica-b", c.LeaseOwner, "leased to Owner")
		require.Equal(t, tx.Epoch+1, c.Epoch, "a new epoch fences anyone before")
		requireBetween(t, c.LeaseExpiresAt, before.Add(longLease), after.Add(longLease), "LeaseExpiresAt")
		require.False(t, c.NextAttemptAt.IsZero(), "a live transaction has a next attempt (for recovery)")
		require.Equal(t, "", c.Reason, "an empty Reason leaves the reason empty")
		require.Equal(t, tx.Spec, c.Spec)
		require.True(t, tx.Deadline.Equal(c.Deadline), "the deadline does not move")
	}
	require.True(t, got.LeaseExpiresAt.Equal(res.Claimed.Transaction.LeaseExpiresAt), "the result carries the stored lease")
	requireBranchesAndSpecs(t, stored("a", 0, spec), res.Claimed.Branches)
	requireBranchesEqual(t, bs, res.Claimed.Branches)
	requireEventsEqual(t, []store.Event{{Kind: "begun"}, registered("a"), {Kind: "confirming", Detail: "initiator committed"}}, events(t, s, tx.GID))

	// Owned now: not claimable, and writes at the new epoch go through.
	require.Empty(t, claim(t, s, "replica-c", longLease, 10))
	require.False(t, record(t, s, store.RecordParams{GID: tx.GID, Epoch: tx.Epoch, Status: "stale", Lease: longLease})[0].Owned)
	require.True(t, record(t, s, store.RecordParams{GID: tx.GID, Epoch: got.Epoch, Status: "confirming", Lease: longLease})[0].Owned)

	// Deciding again from "trying" finds it moved on, and says how it stands.
	again := transition(t, s, store.TransitionParams{GID: tx.GID, From: []string{"trying"}, To: "cancelling", Reason: "too late", Owner: "replica-c", Lease: longLease, Events: []store.Event{{Kind: "cancelling"}}})
	require.False(t, again.Done)
	require.Equal(t, "confirming", again.Current.Status)
	require.Equal(t, "replica-b", again.Current.LeaseOwner)
	require.Equal(t, got.Epoch, again.Current.Epoch)
	require.Len(t, events(t, s, tx.GID), 3, "a refused transition writes no event")
}

func testTransitionReason(t *testing.T, s store.Store) {
	tx := create(t, s, openParams("transition-reason", time.Hour))
	// Any of From will do.
	res := transition(t, s, store.TransitionParams{
		GID: tx.GID, From: []string{"preparing", "trying"}, To: "cancelling", Reason: "the initiator rolled back",
		Owner: "replica-a", Lease: longLease,
	})
	require.True(t, res.Done)
	require.Equal(t, "the initiator rolled back", res.Claimed.Transaction.Reason)
	require.Empty(t, res.Claimed.Branches)
	got, _ := get(t, s, tx.GID)
	require.Equal(t, "cancelling", got.Status)
	require.Equal(t, "the initiator rolled back", got.Reason)
	requireEventsEqual(t, []store.Event{{Kind: "begun"}}, events(t, s, tx.GID))
}

func testTransitionRefused(t *testing.T, s store.Store) {
	open := create(t, s, openParams("transition-status", time.Hour))
	leased := create(t, s, params("transition-leased", "replica-a", longLease))
	for _, tc := range []struct {
		gid  string
		from []string
		why  string
	}{
		{open.GID, []string{"prepared", "confirming"}, "not in From"},
		{leased.GID, []string{"running"}, "leased, lease running"},
	} {
		before, bsBefore := get(t, s, tc.gid)
		res := transition(t, s, store.TransitionParams{
			GID: tc.gid, From: tc.from, To: "cancelling", Reason: "must not be written", Owner: "replica-b", Lease: longLease,
			Events: []store.Event{{Kind: "cancelling"}},
		})
		require.False(t, res.Done, "%s: %s", tc.gid, tc.why)
		require.Empty(t, res.Claimed.Branches, tc.gid)
		cur := res.Current
		require.Equal(t, tc.gid, cur.GID, "%s: Current is the stored row", tc.gid)
		require.Equal(t, before.Status, cur.Status, tc.gid)
		require.Equal(t, before.LeaseOwner, cur.LeaseOwner, tc.gid)
		require.Equal(t, before.Epoch, cur.Epoch, tc.gid)
		require.True(t, before.LeaseExpiresAt.Equal(cur.LeaseExpiresAt), tc.gid)

		after, bs := get(t, s, tc.gid)
		require.Equal(t, before.Status, after.Status, "%s: nothing written", tc.gid)
		require.Equal(t, "", after.Reason, tc.gid)
		require.Equal(t, before.Epoch, after.Epoch, tc.gid)
		require.True(t, before.UpdatedAt.Equal(after.UpdatedAt), "%s: the row is not touched", tc.gid)
		requireBranchesEqual(t, bsBefore, bs)
		require.Len(t, events(t, s, tc.gid), 1, "%s: no event", tc.gid)
	}

	_, err := s.Transition(t.Context(), store.TransitionParams{GID: "transition-unknown", From: []string{"trying"}, To: "confirming", Owner: "replica-b", Lease: longLease})
	require.ErrorIs(t, err, store.ErrNotFound)
	_, _, err = s.GetTransaction(t.Context(), "transition-unknown")
	require.ErrorIs(t, err, store.ErrNotFound, "a transition does not create a transaction")
}

// An owner whose lease ran out is taken over by a Transition, as by a claim.
func testTransitionExpired(t *testing.T, s store.Store) {
	old := create(t, s, params("transition-expired", "replica-a", shortLease))
	waitDBTime(t, s, old.LeaseExpiresAt)
	res := transition(t, s, store.TransitionParams{
		GID: old.GID, From: []string{"running"}, To: "compensating", Owner: "replica-b", Lease: longLease,
	})
	require.True(t, res.Done)
	require.Equal(t, "replica-b", res.Claimed.Transaction.LeaseOwner)
	require.Equal(t, old.Epoch+1, res.Claimed.Transaction.Epoch)
	requireBranchesEqual(t, params("", "", 0).Branches, res.Claimed.Branches)

	// The old owner wakes up: fenced.
	require.False(t, record(t, s, store.RecordParams{GID: old.GID, Epoch: old.Epoch, Status: "succeeded", Terminal: true})[0].Owned)
	got, _ := get(t, s, old.GID)
	require.Equal(t, "compensating", got.Status)
	require.Equal(t, "replica-b", got.LeaseOwner)
}

// ---- ListEvents ----

func testListEventsUnknown(t *testing.T, s store.Store) {
	es, err := s.ListEvents(t.Context(), "never-created")
	require.NoError(t, err, "an unknown gid has no history, which is not an error")
	require.Empty(t, es)
}
