package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/pgtest"
)

func TestMain(m *testing.M) {
	code := pgtest.WrapTestMain(m)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	if binDir != "" {
		_ = os.RemoveAll(binDir)
	}
	os.Exit(code)
}

var (
	buildOnce sync.Once
	binDir    string
	binPath   string
	buildErr  error
)

// demoBinary builds the demo once per test run, as a user's `go build` would.
func demoBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "travel-booking-bin-")
		if buildErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "travel-booking")
		goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
		if _, err := os.Stat(goBin); err != nil {
			goBin = "go"
		}
		out, err := exec.Command(goBin, "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	require.NoError(t, buildErr)
	return binPath
}

// runDemo runs the binary with args and returns its exit code, stdout and stderr.
func runDemo(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, demoBinary(t), args...)
	// The demo's own environment variables must not leak in from the developer's shell.
	cmd.Env = append(os.Environ(), "TRAVEL_DB=", "TRAVEL_BROKERS=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		code = exitErr.ExitCode()
	} else {
		require.NoError(t, err, "stderr: %s", stderr.String())
	}
	return code, stdout.String(), stderr.String()
}

// summaryOf parses the SUMMARY line, which must be the last line of stdout.
func summaryOf(t *testing.T, stdout string) Summary {
	t.Helper()
	lines := strings.Split(strings.TrimRight(stdout, "\n"), "\n")
	last := lines[len(lines)-1]
	require.True(t, strings.HasPrefix(last, "SUMMARY "), "last line: %q", last)
	var s Summary
	require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(last, "SUMMARY ")), &s))
	return s
}

// books is what the test reads back from the demo's databases after it exited, without the
// demo's code: reservations and inventories per service, the events each outbox holds, and what
// the notifications consumer applied.
type books struct {
	// state[service][trip] is the reservation's state.
	state map[string]map[string]string
	// taken[service][item] = capacity - available; live[service][item] = held + booked units.
	taken, live map[string]map[string]int
	capacity    map[string]map[string]int
	// written are the outbox message ids of all services, unsent those not yet sent.
	written        []string
	unsent         int
	applied, inbox []string
}

type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

func readBooks(t *testing.T, open func(name string) querier, outboxTable func(service string) string) *books {
	t.Helper()
	ctx := context.Background()
	b := &books{state: map[string]map[string]string{}, taken: map[string]map[string]int{}, live: map[string]map[string]int{},
		capacity: map[string]map[string]int{}}
	query := func(db querier, q string, scan func(rows *sql.Rows) error) {
		rows, err := db.QueryContext(ctx, q)
		require.NoError(t, err, q)
		defer rows.Close()
		for rows.Next() {
			require.NoError(t, scan(rows))
		}
		require.NoError(t, rows.Err())
	}
	for _, svc := range []string{"flight", "hotel", "car"} {
		db := open(svc)
		b.state[svc], b.taken[svc], b.live[svc], b.capacity[svc] = map[string]string{}, map[string]int{}, map[string]int{}, map[string]int{}
		query(db, "SELECT trip_id, item, units, state FROM reservations", func(rows *sql.Rows) error {
			var trip, item, state string
			var units int
			err := rows.Scan(&trip, &item, &units, &state)
			b.state[svc][trip] = state
			if state == "held" || state == "booked" {
				b.live[svc][item] += units
			}
			return err
		})
		query(db, "SELECT item, capacity, available FROM inventory", func(rows *sql.Rows) error {
			var item string
			var capacity, available int
			err := rows.Scan(&item, &capacity, &available)
			b.taken[svc][item], b.capacity[svc][item] = capacity-available, capacity
			return err
		})
		query(db, "SELECT CAST(msg_id AS TEXT), sent_at IS NULL FROM "+outboxTable(svc), func(rows *sql.Rows) error {
			var id string
			var unsent bool
			err := rows.Scan(&id, &unsent)
			b.written = append(b.written, id)
			if unsent {
				b.unsent++
			}
			return err
		})
	}
	db := open("notifications")
	query(db, "SELECT message_id FROM trip_events", func(rows *sql.Rows) error {
		var id string
		err := rows.Scan(&id)
		b.applied = append(b.applied, id)
		return err
	})
	query(db, "SELECT message_id FROM notifications_inbox", func(rows *sql.Rows) error {
		var id string
		err := rows.Scan(&id)
		b.inbox = append(b.inbox, id)
		return err
	})
	return b
}

// sqliteBooks reads the books from the SQLite files in dir.
func sqliteBooks(t *testing.T, dir string) *books {
	t.Helper()
	var dbs []*sql.DB
	defer func() {
		for _, db := range dbs {
			_ = db.Close()
		}
	}()
	return readBooks(t, func(name string) querier {
		path := filepath.Join(dir, name+".db")
		_, err := os.Stat(path)
		require.NoError(t, err, "the demo keeps its state in %s", path)
		db, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
		require.NoError(t, err)
		dbs = append(dbs, db)
		return db
	}, func(string) string { return "treaty_outbox" })
}

// requireConsistent checks the books against the summary: every trip's reservations match its
// outcome (nothing reserved for a trip that was rolled back), every item's stock matches its
// live reservations, and every event written was applied exactly once.
func requireConsistent(t *testing.T, s Summary, b *books) {
	t.Helper()
	require.True(t, s.OK, "problems: %v", s.Problems)
	for _, trip := range s.Trips {
		for svc, states := range b.state {
			switch trip.Outcome {
			case "booked":
				require.Equal(t, "booked", states[trip.ID], "trip %s at the %s service", trip.ID, svc)
			case "rolled back":
				require.NotContains(t, []string{"held", "booked"}, states[trip.ID],
					"trip %s was rolled back, yet the %s service still reserves it", trip.ID, svc)
			default:
				t.Fatalf("trip %s ended %q", trip.ID, trip.Outcome)
			}
		}
	}
	for svc, items := range b.taken {
		for item, taken := range items {
			require.Equal(t, b.live[svc][item], taken, "%s %s: units out of stock vs. units held or booked", svc, item)
			require.GreaterOrEqual(t, b.capacity[svc][item], taken, "%s %s oversold", svc, item)
		}
		for trip, state := range b.state[svc] {
			require.NotEqual(t, "held", state, "%s: trip %s left held", svc, trip)
		}
	}
	require.NotEmpty(t, b.written)
	require.Zero(t, b.unsent, "every event left its outbox")
	require.ElementsMatch(t, b.written, b.applied, "each event written was applied exactly once")
	require.ElementsMatch(t, b.written, b.inbox, "and recorded once in the inbox")
	require.Equal(t, len(b.written), s.EventsApplied)
}

// The story on the embedded defaults: the booked trips are booked everywhere, the two rolled-back
// ones hold nothing anywhere, the hotel's crash cost no second room, and every event was applied
// exactly once though the consumer saw some of them twice.
func TestStoryEmbedded(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	code, stdout, stderr := runDemo(t, "--state-dir", dir)
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", stdout, stderr)
	for _, want := range []string{"1. A trip that books.", "2. A trip whose flight is sold out.", "3. A service crashes mid-way.",
		"4. A trip booked with TCC.", "5. A TCC trip that cannot be completed.", "The hotel service restarts",
		"Subject: Your trip is booked", "was reserved, then cancelled", "was held, then released"} {
		require.Contains(t, stdout, want)
	}
	require.NotContains(t, stdout, "UNEXPECTED")
	s := summaryOf(t, stdout)
	require.Equal(t, "sqlite", s.Backend)
	got := map[string]string{}
	for _, trip := range s.Trips {
		got[trip.ID[strings.LastIndexByte(trip.ID, '-')+1:]+" "+trip.Mode] = trip.Outcome
	}
	require.Equal(t, map[string]string{"1 saga": "booked", "2 saga": "rolled back", "3 saga": "booked",
		"4 tcc": "booked", "5 tcc": "rolled back"}, got)
	require.Positive(t, s.DuplicatesSkipped, "the consumer saw redeliveries and its inbox skipped them")

	b := sqliteBooks(t, dir)
	requireConsistent(t, s, b)
	// Four trips' worth of rooms were taken at some point, two were given back: the crashed
	// call, retried after the restart, did not take a second room.
	require.Equal(t, 3, b.taken["hotel"]["Harbour Hotel"])
	require.Equal(t, 0, b.taken["car"]["suv-KEF"])
	require.Equal(t, 4, b.taken["flight"]["TB101"], "Ada 1, Linus 1, Margaret 2; Katherine's seat released")
}

// Many concurrent trips, a fifth of all participant calls failing on purpose: every trip ends
// booked or rolled back and the books agree.
func TestTripsWithChaosEmbedded(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	code, stdout, stderr := runDemo(t, "--state-dir", dir, "--trips", "60", "--concurrency", "12", "--chaos", "0.2", "--quiet")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", stdout, stderr)
	require.Equal(t, 1, strings.Count(stdout, "\n"), "--quiet prints the summary only")
	s := summaryOf(t, stdout)
	require.Len(t, s.Trips, 60)
	require.Equal(t, 60, s.Booked+s.RolledBack)
	require.Positive(t, s.Booked)
	require.Positive(t, s.RolledBack, "the stock is sized so that some trips find something sold out")
	require.Positive(t, s.ChaosInjected)
	requireConsistent(t, s, sqliteBooks(t, dir))
}

// --fail car: every trip is rolled back and every item is back in stock.
func TestFailEmbedded(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	code, stdout, stderr := runDemo(t, "--state-dir", dir, "--fail", "car", "--quiet")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", stdout, stderr)
	s := summaryOf(t, stdout)
	require.Equal(t, 5, s.RolledBack)
	b := sqliteBooks(t, dir)
	requireConsistent(t, s, b)
	for svc, items := range b.taken {
		for item, taken := range items {
			require.Zero(t, taken, "%s %s", svc, item)
		}
	}
}

// --restart hotel: the hotel service is stopped as a trip is booked and started again seconds
// later, much longer than the old five attempts lasted; the trip still books, nothing compensated.
func TestRestartEmbedded(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	code, stdout, stderr := runDemo(t, "--state-dir", dir, "--restart", "hotel", "--restart-after", "4s")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", stdout, stderr)
	for _, want := range []string{"6. A service restarts during a booking.", "The hotel service stops", "retrying until ",
		"The hotel service is back after 4", "The coordinator reached it"} {
		require.Contains(t, stdout, want)
	}
	require.NotContains(t, stdout, "UNEXPECTED")
	s := summaryOf(t, stdout)
	require.Len(t, s.Trips, 6)
	require.Equal(t, "booked", s.Trips[5].Outcome, "the trip booked across the restart")
	b := sqliteBooks(t, dir)
	requireConsistent(t, s, b)
	require.Equal(t, 4, b.taken["hotel"]["Harbour Hotel"], "one room for the restarted booking, none compensated")

	code, _, stderr = runDemo(t, "--restart", "train")
	require.Equal(t, 2, code)
	require.Contains(t, stderr, `--restart "train": want flight, hotel or car`)
	code, _, stderr = runDemo(t, "--restart", "car", "--trips", "3")
	require.Equal(t, 2, code)
	require.Contains(t, stderr, "does not combine with --trips")
}

// --db: the same story with the coordinator, the services and the consumer on PostgreSQL
// (schemas travel_*), the PostgreSQL barrier, outbox and relay.
func TestStoryPostgres(t *testing.T) {
	t.Parallel()
	url := pgtest.NewDatabase(t)
	code, stdout, stderr := runDemo(t, "--db", url, "--chaos", "0.1", "--quiet")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", stdout, stderr)
	s := summaryOf(t, stdout)
	require.Equal(t, "postgres", s.Backend)
	require.Equal(t, 3, s.Booked)
	require.Equal(t, 2, s.RolledBack)

	ctx := context.Background()
	var pools []*pgxpool.Pool
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	b := readBooks(t, func(name string) querier {
		cfg, err := pgxpool.ParseConfig(url)
		require.NoError(t, err)
		cfg.ConnConfig.RuntimeParams["search_path"] = "travel_" + name
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		require.NoError(t, err)
		pools = append(pools, pool)
		return stdlibDB(t, pool)
	}, func(service string) string { return "travel_" + service + ".treaty_outbox" })
	requireConsistent(t, s, b)
}

// A run that cannot start (no broker at the address given) exits non-zero and says why; a bad
// flag exits 2; a state directory holding something is refused.
func TestFailuresExitNonZero(t *testing.T) {
	t.Parallel()
	code, _, stderr := runDemo(t, "--brokers", "127.0.0.1:1", "--quiet")
	require.Equal(t, 1, code)
	require.Contains(t, stderr, "--brokers 127.0.0.1:1")

	code, _, stderr = runDemo(t, "--fail", "train")
	require.Equal(t, 2, code)
	require.Contains(t, stderr, `--fail "train": want flight, hotel or car`)

	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "keep.txt"), []byte("mine"), 0o644))
	code, _, stderr = runDemo(t, "--state-dir", dir)
	require.Equal(t, 1, code)
	require.Contains(t, stderr, "give a new or empty directory")
}

func stdlibDB(t *testing.T, pool *pgxpool.Pool) *sql.DB {
	t.Helper()
	db := stdlib.OpenDBFromPool(pool)
	t.Cleanup(func() { _ = db.Close() })
	return db
}
