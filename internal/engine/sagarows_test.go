package engine

import (
	"testing"

	"github.com/treatyhq/treaty/internal/store"
)

func rowsOf(bs []store.Branch) []string {
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = b.Branch + "/" + b.Op + "=" + b.Status
	}
	return out
}

func equalRows(t *testing.T, got []store.Branch, want ...string) {
	t.Helper()
	g := rowsOf(got)
	if len(g) != len(want) {
		t.Fatalf("rows %v, want %v", g, want)
	}
	for i := range g {
		if g[i] != want[i] {
			t.Fatalf("rows %v, want %v", g, want)
		}
	}
}

// The rows a saga's store leaves out read back as the state they stand for.
func TestCompleteSagaRows(t *testing.T) {
	act := func(name string, pos int, status string) store.Branch {
		return store.Branch{Branch: name, Op: "action", Position: pos, Status: status}
	}
	comp := func(name string, pos int, status string, attempts int) store.Branch {
		return store.Branch{Branch: name, Op: "compensate", Position: pos, Status: status, Attempts: attempts}
	}
	ab := []string{"a", "b"}
	running := store.Transaction{Mode: "saga", Status: "running"}
	// Just created: nothing stored.
	equalRows(t, completeSagaRows(running, ab, nil),
		"a/action=pending", "a/compensate=pending", "b/action=pending", "b/compensate=pending")
	equalRows(t, completeSagaRows(running, ab, []store.Branch{act("a", 0, "succeeded")}),
		"a/action=succeeded", "a/compensate=pending", "b/action=pending", "b/compensate=pending")
	// Written at creation by earlier versions: kept as they are.
	equalRows(t, completeSagaRows(running, ab, []store.Branch{act("a", 0, "succeeded"), act("b", 1, "pending")}),
		"a/action=succeeded", "a/compensate=pending", "b/action=pending", "b/compensate=pending")

	succeeded := store.Transaction{Mode: "saga", Status: "succeeded"}
	equalRows(t, completeSagaRows(succeeded, ab, []store.Branch{act("a", 0, "succeeded"), act("b", 1, "succeeded")}),
		"a/action=succeeded", "a/compensate=skipped", "b/action=succeeded", "b/compensate=skipped")
	// Written by an earlier version at creation and never touched: skipped, as it would be now.
	equalRows(t, completeSagaRows(succeeded, []string{"a"}, []store.Branch{act("a", 0, "succeeded"), comp("a", 0, "pending", 0)}),
		"a/action=succeeded", "a/compensate=skipped")

	// A saga that turned back stores what it touched; rows that are there are kept as they are,
	// and the actions it never reached are pending.
	abc := []string{"a", "b", "c"}
	compensated := store.Transaction{Mode: "saga", Status: "compensated"}
	equalRows(t, completeSagaRows(compensated, abc, []store.Branch{
		act("a", 0, "succeeded"), comp("a", 0, "succeeded", 1), act("b", 1, "failed"), comp("b", 1, "skipped", 0), comp("c", 2, "skipped", 0)}),
		"a/action=succeeded", "a/compensate=succeeded", "b/action=failed", "b/compensate=skipped", "c/action=pending", "c/compensate=skipped")
	compensating := store.Transaction{Mode: "saga", Status: "compensating"}
	equalRows(t, completeSagaRows(compensating, ab, []store.Branch{act("a", 0, "succeeded"), act("b", 1, "failed"), comp("b", 1, "skipped", 0)}),
		"a/action=succeeded", "a/compensate=pending", "b/action=failed", "b/compensate=skipped")

	// A stored row the spec does not name (none is written) is not hidden.
	equalRows(t, completeSagaRows(running, []string{"a"}, []store.Branch{act("a", 0, "succeeded"), act("x", 7, "failed")}),
		"a/action=succeeded", "a/compensate=pending", "x/action=failed")
}

// Only the final write of a saga that succeeded leaves its untouched compensations out.
func TestStoredSagaRow(t *testing.T) {
	m := &sagaMachine{}
	skipped := store.Branch{Branch: "a", Op: "compensate", Status: "skipped"}
	final := store.RecordParams{Terminal: true, Status: "succeeded"}
	if storedSagaRow(m, final, skipped) {
		t.Fatal("an untouched compensation of a saga that succeeded is written")
	}
	if !storedSagaRow(m, store.RecordParams{Status: "compensating"}, skipped) {
		t.Fatal("a compensation skipped while turning back is not written")
	}
	tried := skipped
	tried.Attempts = 1
	if !storedSagaRow(m, final, tried) {
		t.Fatal("a compensation that was tried is not written")
	}
	if !storedSagaRow(m, final, store.Branch{Branch: "a", Op: "action", Status: "succeeded"}) {
		t.Fatal("an action is not written")
	}
	if !storedSagaRow(&tccMachine{}, final, skipped) {
		t.Fatal("another mode's row is left out")
	}
}
