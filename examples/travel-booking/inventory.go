package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/pkg/outbox"
	"github.com/treatyhq/treaty/sdk/participant"
)

// EventsTopic is the Kafka topic every service's domain events go to, keyed by trip.
const EventsTopic = "travel.events"

// Reservation states in a service's reservations table.
const (
	stateHeld      = "held"      // TCC try: out of sale, not yet booked
	stateBooked    = "booked"    // saga action, or TCC confirm
	stateCancelled = "cancelled" // saga compensation
	stateReleased  = "released"  // TCC cancel
)

// inventorySchema is each service's business schema. The same SQL runs on SQLite and PostgreSQL
// (with search_path set to the service's schema there).
const inventorySchema = `
CREATE TABLE IF NOT EXISTS inventory (
    item        TEXT    PRIMARY KEY,
    description TEXT    NOT NULL,
    capacity    INTEGER NOT NULL,
    available   INTEGER NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    trip_id TEXT    PRIMARY KEY,
    item    TEXT    NOT NULL,
    who     TEXT    NOT NULL,
    units   INTEGER NOT NULL,
    detail  TEXT    NOT NULL,
    state   TEXT    NOT NULL
)`

// Event is a domain event a service writes with the outbox in the transaction that changed its
// inventory; the notifications consumer reads it.
type Event struct {
	// Type is the service's name and what happened: FlightReserved, HotelCancelled, CarHeld,
	// FlightBooked, CarReleased, ...
	Type    string `json:"type"`
	Service string `json:"service"`
	Run     string `json:"run"`
	TripID  string `json:"trip_id"`
	Who     string `json:"who"`
	Item    string `json:"item"`
	Units   int    `json:"units"`
	Detail  string `json:"detail"`
	// State is the reservation's state after the event.
	State string    `json:"state"`
	At    time.Time `json:"at"`
}

// booking is what a service is asked to reserve or hold.
type booking struct {
	TripID, Who, Item, Detail string
	Units                     int
}

// inventory is the business logic shared by the flight, hotel and car services: a table of
// items with their availability and a table of reservations per trip. Every operation runs
// under the barrier, and writes its event to the outbox, in one local transaction.
type inventory struct {
	name  string // "flight", "hotel", "car"
	title string // "Flight", "Hotel", "Car": prefix of event types
	run   string
	unit  string // "seat", "room", "car"
	store *serviceStore
}

// enqueuer is what both outboxes (PostgreSQL and SQLite) offer a database/sql transaction.
type enqueuer interface {
	EnqueueSQL(ctx context.Context, tx *sql.Tx, msgs ...outbox.Message) error
}

// call runs fn under the barrier for the call in ctx, in one transaction with the barrier row,
// and turns the outcome into the gRPC status the coordinator understands.
func (inv *inventory) call(ctx context.Context, fn func(ctx context.Context, tx *sql.Tx, st *serviceState) error) error {
	md, ok := participant.FromContext(ctx)
	if !ok {
		return status.Errorf(codes.InvalidArgument, "%s service: call carries no Treaty metadata; it must come from a Treaty coordinator or TCC initiator", inv.name)
	}
	st := inv.store.current()
	if st == nil {
		return status.Errorf(codes.Unavailable, "%s service is down", inv.name)
	}
	err := st.barrier.CallSQLDB(ctx, st.db, md, func(ctx context.Context, tx *sql.Tx) error { return fn(ctx, tx, st) })
	if err == nil {
		st.wake()
	}
	return participant.ToStatus(err)
}

// take removes units from the item's availability and records the trip's reservation in state
// (booked for a saga action, held for a TCC try). Not enough left is a business "no" (ABORTED).
func (inv *inventory) take(ctx context.Context, b booking, state string) error {
	if b.TripID == "" || b.Item == "" || b.Units <= 0 {
		return status.Errorf(codes.InvalidArgument, "%s service: trip_id, item and a positive count are required, got trip %q item %q count %d",
			inv.name, b.TripID, b.Item, b.Units)
	}
	return inv.call(ctx, func(ctx context.Context, tx *sql.Tx, st *serviceState) error {
		res, err := tx.ExecContext(ctx, `UPDATE inventory SET available = available - $1 WHERE item = $2 AND available >= $1`, b.Units, b.Item)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			var left int
			err := tx.QueryRowContext(ctx, `SELECT available FROM inventory WHERE item = $1`, b.Item).Scan(&left)
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("%s service: no such %s %q: %w", inv.name, inv.name, b.Item, participant.ErrAborted)
			}
			if err != nil {
				return err
			}
			return fmt.Errorf("%s %s: %d %s(s) wanted, %d left (sold out): %w", inv.name, b.Item, b.Units, inv.unit, left, participant.ErrAborted)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO reservations (trip_id, item, who, units, detail, state) VALUES ($1, $2, $3, $4, $5, $6)`,
			b.TripID, b.Item, b.Who, b.Units, b.Detail, state); err != nil {
			return err
		}
		verb := "Reserved"
		if state == stateHeld {
			verb = "Held"
		}
		return inv.emit(ctx, tx, st, verb, b, state)
	})
}

// move changes the trip's reservation from state from to state to and, when the units go back
// on sale, returns them to the item's availability. A trip without a reservation in state from
// has nothing to undo or confirm (the barrier already keeps repeats away).
func (inv *inventory) move(ctx context.Context, tripID, from, to, verb string, giveBack bool) error {
	if tripID == "" {
		return status.Errorf(codes.InvalidArgument, "%s service: trip_id is required", inv.name)
	}
	return inv.call(ctx, func(ctx context.Context, tx *sql.Tx, st *serviceState) error {
		var b booking
		err := tx.QueryRowContext(ctx, `UPDATE reservations SET state = $1 WHERE trip_id = $2 AND state = $3
			RETURNING trip_id, item, who, units, detail`, to, tripID, from).Scan(&b.TripID, &b.Item, &b.Who, &b.Units, &b.Detail)
		if errors.Is(err, sql.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		if giveBack {
			if _, err := tx.ExecContext(ctx, `UPDATE inventory SET available = available + $1 WHERE item = $2`, b.Units, b.Item); err != nil {
				return err
			}
		}
		return inv.emit(ctx, tx, st, verb, b, to)
	})
}

func (inv *inventory) reserve(ctx context.Context, b booking) error {
	return inv.take(ctx, b, stateBooked)
}

func (inv *inventory) cancelReservation(ctx context.Context, tripID string) error {
	return inv.move(ctx, tripID, stateBooked, stateCancelled, "Cancelled", true)
}

func (inv *inventory) hold(ctx context.Context, b booking) error {
	return inv.take(ctx, b, stateHeld)
}

func (inv *inventory) confirm(ctx context.Context, tripID string) error {
	return inv.move(ctx, tripID, stateHeld, stateBooked, "Booked", false)
}

func (inv *inventory) release(ctx context.Context, tripID string) error {
	return inv.move(ctx, tripID, stateHeld, stateReleased, "Released", true)
}

// emit writes the event in tx, keyed by trip so that one trip's events of one service arrive in
// the order they happened.
func (inv *inventory) emit(ctx context.Context, tx *sql.Tx, st *serviceState, verb string, b booking, state string) error {
	ev := Event{Type: inv.title + verb, Service: inv.name, Run: inv.run, TripID: b.TripID, Who: b.Who, Item: b.Item,
		Units: b.Units, Detail: b.Detail, State: state, At: time.Now().UTC()}
	value, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	return st.outbox.EnqueueSQL(ctx, tx, outbox.Message{Topic: EventsTopic, Key: []byte(b.TripID), Value: value})
}
