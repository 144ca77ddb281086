package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"sort"
	"time"
)

// Summary is the machine-readable result, printed as the last line: "SUMMARY " + JSON.
type Summary struct {
	OK       bool   `json:"ok"`
	Run      string `json:"run"`
	Backend  string `json:"backend"` // "sqlite" or "postgres"
	StateDir string `json:"state_dir,omitempty"`
	Seed     uint64 `json:"seed"`
	Workflow string `json:"workflow"`
	Version  int    `json:"workflow_version"`

	Trips      []TripResult `json:"trips"`
	Booked     int          `json:"booked"`
	RolledBack int          `json:"rolled_back"`
	Unexpected int          `json:"unexpected"`

	// Events: written to the services' outboxes, still unsent, applied by the consumer (each
	// once), skipped as duplicates by its inbox.
	EventsEnqueued    int   `json:"events_enqueued"`
	EventsUnsent      int   `json:"events_unsent"`
	EventsApplied     int   `json:"events_applied"`
	DuplicatesSkipped int64 `json:"duplicates_skipped"`
	// OtherRuns counts events of earlier runs found on a shared broker (--brokers), skipped.
	OtherRuns     int64 `json:"events_of_other_runs"`
	ChaosInjected int64 `json:"chaos_injected"`

	Inventory map[string][]ItemState `json:"inventory"`
	Problems  []string               `json:"problems"`
	Seconds   float64                `json:"seconds"`
}

// TripResult is one trip's outcome.
type TripResult struct {
	ID       string `json:"id"`
	GID      string `json:"gid"`
	Mode     string `json:"mode"`
	Expected string `json:"expected"`
	Outcome  string `json:"outcome"`
}

// ItemState is one inventory line at the end: taken = capacity - available must equal the
// units of the reservations that hold or booked it.
type ItemState struct {
	Item      string `json:"item"`
	Capacity  int    `json:"capacity"`
	Available int    `json:"available"`
	Held      int    `json:"held"`
	Booked    int    `json:"booked"`
}

// eventCounts is where the events stand.
type eventCounts struct{ enqueued, unsent, applied int }

func (d *demo) countEvents(ctx context.Context) (eventCounts, error) {
	var c eventCounts
	for _, s := range d.services {
		st := s.store.current()
		if st == nil {
			return c, fmt.Errorf("%s service is down", s.inv.name)
		}
		var n, unsent int
		if err := st.db.QueryRowContext(ctx, "SELECT count(*), count(*) - count(sent_at) FROM "+st.outboxTable).Scan(&n, &unsent); err != nil {
			return c, fmt.Errorf("count %s events: %w", s.inv.name, err)
		}
		c.enqueued += n
		c.unsent += unsent
	}
	var err error
	c.applied, err = d.notif.appliedInDB(ctx)
	return c, err
}

// waitForEvents waits until every event written so far has been published and applied.
func (d *demo) waitForEvents(ctx context.Context) (eventCounts, error) {
	var c eventCounts
	err := poll(ctx, 30*time.Second, func() (bool, error) {
		var err error
		c, err = d.countEvents(ctx)
		return err == nil && c.unsent == 0 && c.applied >= c.enqueued, err
	})
	if err != nil {
		return c, fmt.Errorf("waiting for the notifications consumer (%d events written, %d unsent, %d applied): %w",
			c.enqueued, c.unsent, c.applied, err)
	}
	return c, nil
}

// finish waits for the events, audits every service and the consumer, and builds the summary.
func (d *demo) finish(ctx context.Context) (*Summary, error) {
	s := &Summary{Run: d.run, Backend: "sqlite", StateDir: d.cfg.stateDir, Seed: d.cfg.seed, Workflow: WorkflowName,
		Version: d.version, Inventory: map[string][]ItemState{}, Problems: []string{}}
	if d.be.postgres() {
		s.Backend = "postgres"
	}
	problem := func(format string, args ...any) { s.Problems = append(s.Problems, fmt.Sprintf(format, args...)) }

	expected := map[string]string{}
	for _, t := range d.trips {
		s.Trips = append(s.Trips, TripResult{ID: t.ID, GID: t.GID, Mode: t.Mode, Expected: t.Expected, Outcome: t.Outcome})
		switch t.Outcome {
		case outcomeBooked:
			s.Booked++
		case outcomeRolledBack:
			s.RolledBack++
		}
		if !(t.Outcome == t.Expected || t.Expected == outcomeEither && (t.Outcome == outcomeBooked || t.Outcome == outcomeRolledBack)) {
			s.Unexpected++
			problem("trip %s (%s): %s (%s), expected %s", t.ID, t.Mode, t.Outcome, t.Reason, t.Expected)
		}
		expected[t.ID] = t.Outcome
	}

	c, err := d.waitForEvents(ctx)
	if err != nil {
		problem("%v", err)
	}
	s.EventsEnqueued, s.EventsUnsent, s.EventsApplied = c.enqueued, c.unsent, c.applied
	s.DuplicatesSkipped, s.OtherRuns = d.notif.duplicates.Load(), d.notif.foreign.Load()
	if c.applied != c.enqueued {
		problem("the consumer applied %d events, the services wrote %d", c.applied, c.enqueued)
	}
	written := map[string]bool{}
	for _, svc := range d.services {
		s.ChaosInjected += svc.faults.injects.Load()
		st := svc.store.current()
		ids, err := queryStrings(ctx, st.db, "SELECT CAST(msg_id AS TEXT) FROM "+st.outboxTable)
		if err != nil {
			return nil, err
		}
		for _, id := range ids {
			written[id] = true
		}
		if err := d.auditService(ctx, svc, s, expected, problem); err != nil {
			return nil, err
		}
	}
	applied, err := queryStrings(ctx, d.notif.db, "SELECT message_id FROM trip_events")
	if err != nil {
		return nil, err
	}
	for _, id := range applied {
		if !written[id] {
			problem("the consumer applied event %s, which no outbox holds", id)
		}
		delete(written, id)
	}
	for id := range written {
		problem("event %s was written but never applied", id)
	}
	s.Seconds = time.Since(d.started).Seconds()
	s.OK = len(s.Problems) == 0
	return s, nil
}

// auditService checks one service's books: every item's taken units are those of its live
// reservations, nothing is left held, and each trip's reservation matches its outcome.
func (d *demo) auditService(ctx context.Context, svc *service, s *Summary, expected map[string]string, problem func(string, ...any)) error {
	name := svc.inv.name
	db := svc.store.current().db
	rows, err := db.QueryContext(ctx, `SELECT i.item, i.capacity, i.available,
		coalesce(sum(CASE WHEN r.state = 'held' THEN r.units END), 0),
		coalesce(sum(CASE WHEN r.state = 'booked' THEN r.units END), 0)
		FROM inventory i LEFT JOIN reservations r ON r.item = i.item
		GROUP BY i.item, i.capacity, i.available ORDER BY i.item`)
	if err != nil {
		return fmt.Errorf("audit %s inventory: %w", name, err)
	}
	var items []ItemState
	for rows.Next() {
		var it ItemState
		if err := rows.Scan(&it.Item, &it.Capacity, &it.Available, &it.Held, &it.Booked); err != nil {
			rows.Close()
			return err
		}
		items = append(items, it)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	s.Inventory[name] = items
	for _, it := range items {
		if taken := it.Capacity - it.Available; taken != it.Held+it.Booked {
			problem("%s %s: %d taken from stock but %d held and %d booked", name, it.Item, taken, it.Held, it.Booked)
		}
		if it.Held != 0 {
			problem("%s %s: %d still held after every transaction finished", name, it.Item, it.Held)
		}
	}
	rows, err = db.QueryContext(ctx, `SELECT trip_id, state FROM reservations`)
	if err != nil {
		return err
	}
	state := map[string]string{}
	for rows.Next() {
		var trip, st string
		if err := rows.Scan(&trip, &st); err != nil {
			rows.Close()
			return err
		}
		state[trip] = st
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	trips := make([]string, 0, len(expected))
	for t := range expected {
		trips = append(trips, t)
	}
	sort.Strings(trips)
	for _, t := range trips {
		switch st := state[t]; expected[t] {
		case outcomeBooked:
			if st != stateBooked {
				problem("trip %s was booked but the %s service has it %q", t, name, st)
			}
		case outcomeRolledBack:
			if st == stateBooked || st == stateHeld {
				problem("trip %s was rolled back but the %s service still has it %s", t, name, st)
			}
		}
	}
	return nil
}

func queryStrings(ctx context.Context, db *sql.DB, query string) ([]string, error) {
	rows, err := db.QueryContext(ctx, query)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var v string
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

func (d *demo) printSummary(s *Summary) {
	if !d.cfg.quiet {
		d.say("Summary: %d trips, %d booked, %d rolled back, %d unexpected.", len(s.Trips), s.Booked, s.RolledBack, s.Unexpected)
		d.say("  events: %d written through the outboxes, %d applied by the notifications consumer, each once (%d redeliveries skipped by its inbox)",
			s.EventsEnqueued, s.EventsApplied, s.DuplicatesSkipped)
		if s.ChaosInjected > 0 {
			d.say("  chaos: %d participant calls failed on purpose; every one was retried", s.ChaosInjected)
		}
		for _, name := range []string{"flight", "hotel", "car"} {
			for _, it := range s.Inventory[name] {
				d.say("  %-6s %-14s capacity %4d, booked %4d, held %d, available %4d", name, it.Item, it.Capacity, it.Booked, it.Held, it.Available)
			}
		}
		if s.OK {
			d.say("Every outcome is as expected; the books of all three services and the consumer agree.")
		} else {
			for _, p := range s.Problems {
				d.say("  PROBLEM: %s", p)
			}
		}
	}
	b, err := json.Marshal(s)
	if err != nil {
		b = []byte(fmt.Sprintf(`{"ok":false,"problems":[%q]}`, err.Error()))
	}
	fmt.Fprintf(d.out, "SUMMARY %s\n", b)
}
