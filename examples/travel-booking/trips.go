package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	carv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/car/v1"
	flightv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/flight/v1"
	hotelv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/hotel/v1"
	"github.com/treatyhq/treaty/sdk"
)

// trip is one booking: a flight, a hotel and a car for one traveller.
type trip struct {
	ID, GID, Traveler string
	Mode              string // "saga" or "tcc"
	Flight            string
	Seats             int
	Hotel             string
	Rooms, Nights     int
	Car               string
	Days              int

	Parts    []tripPart
	Expected string
	Outcome  string
	Reason   string
	Tx       *sdk.Transaction
}

// tripPart is what one service does for a trip, for the e-mail.
type tripPart struct{ Service, Label, Item, Detail string }

func (d *demo) newTrip(n int, mode, traveler, flight string, seats int, hotel string, nights int, car string, days int) *trip {
	id := fmt.Sprintf("trip-%s-%d", d.run, n)
	t := &trip{ID: id, GID: "book-" + id, Traveler: traveler, Mode: mode, Flight: flight, Seats: seats,
		Hotel: hotel, Rooms: 1, Nights: nights, Car: car, Days: days, Expected: outcomeBooked}
	t.Parts = []tripPart{
		{"flight", "Flight", flight, fmt.Sprintf("%d seat(s)", seats)},
		{"hotel", "Hotel", hotel, fmt.Sprintf("%d room(s), %d night(s)", t.Rooms, nights)},
		{"car", "Car", car, fmt.Sprintf("%d day(s)", days)},
	}
	if d.cfg.fail != "" {
		t.Expected = outcomeRolledBack
	}
	d.trips = append(d.trips, t)
	return t
}

func (t *trip) flightSeats() *flightv1.Seats {
	return &flightv1.Seats{TripId: t.ID, Traveler: t.Traveler, Flight: t.Flight, Seats: int32(t.Seats)}
}

func (t *trip) hotelRooms() *hotelv1.Rooms {
	return &hotelv1.Rooms{TripId: t.ID, Guest: t.Traveler, Hotel: t.Hotel, Rooms: int32(t.Rooms), Nights: int32(t.Nights)}
}

func (t *trip) carRental() *carv1.Rental {
	return &carv1.Rental{TripId: t.ID, Driver: t.Traveler, CarClass: t.Car, Days: int32(t.Days)}
}

// inventoryFor is what each service sells. The story needs a sold-out flight (TB404) and no
// SUV; --trips sizes the stock so that some trips find something sold out.
func (d *demo) inventoryFor(service string) []item {
	if d.cfg.trips == 0 {
		return map[string][]item{
			"flight": {{"TB101", "Lisbon to Reykjavik", 180}, {"TB404", "Lisbon to Tromso", 0}},
			"hotel":  {{"Harbour Hotel", "Reykjavik", 40}},
			"car":    {{"compact-KEF", "compact car at Keflavik airport", 25}, {"suv-KEF", "SUV at Keflavik airport", 0}},
		}[service]
	}
	n := d.cfg.trips
	return map[string][]item{
		// About 1.5 seats per trip over three flights: the flights sell out.
		"flight": {{"TB101", "Lisbon to Reykjavik", n * 2 / 5}, {"TB202", "Porto to Reykjavik", n * 2 / 5}, {"TB303", "Faro to Reykjavik", n * 2 / 5}},
		"hotel":  {{"Harbour Hotel", "Reykjavik", n * 3 / 5}, {"Aurora Lodge", "Reykjavik", n * 3 / 5}},
		"car":    {{"compact-KEF", "compact car at Keflavik airport", n * 2 / 5}, {"suv-KEF", "SUV at Keflavik airport", n * 2 / 5}},
	}[service]
}

// bookSaga books t with the registered workflow and waits for the outcome.
func (d *demo) bookSaga(ctx context.Context, t *trip, wait time.Duration) (*sdk.Transaction, error) {
	return d.client.StartWorkflow(ctx, WorkflowName, sdk.StartOptions{GID: t.GID, Wait: wait, Inputs: map[string]sdk.Input{
		"car":    {Action: &carv1.ReserveRequest{Rental: t.carRental()}, Compensate: &carv1.CancelReservationRequest{TripId: t.ID}},
		"hotel":  {Action: &hotelv1.ReserveRequest{Rooms: t.hotelRooms()}, Compensate: &hotelv1.CancelReservationRequest{TripId: t.ID}},
		"flight": {Action: &flightv1.ReserveRequest{Seats: t.flightSeats()}, Compensate: &flightv1.CancelReservationRequest{TripId: t.ID}},
	}})
}

// bookTCC books t with try-confirm-cancel: the initiator holds a seat, a room and a car itself
// (each try registered with the coordinator first), and the coordinator confirms all three, or
// cancels every hold when one try is refused.
func (d *demo) bookTCC(ctx context.Context, t *trip) (*sdk.Transaction, error) {
	flight, hotel, car := d.service("flight").Addr(), d.service("hotel").Addr(), d.service("car").Addr()
	retry := &sdk.Retry{InitialBackoff: 20 * time.Millisecond, MaxBackoff: 300 * time.Millisecond}
	branches := []sdk.TCCBranch{
		{Name: "flight", Retry: retry,
			Try:     sdk.MustCall(flight, flightv1.FlightService_Hold_FullMethodName, &flightv1.HoldRequest{Seats: t.flightSeats()}),
			Confirm: sdk.MustCall(flight, flightv1.FlightService_Confirm_FullMethodName, &flightv1.ConfirmRequest{TripId: t.ID}),
			Cancel:  sdk.MustCall(flight, flightv1.FlightService_Release_FullMethodName, &flightv1.ReleaseRequest{TripId: t.ID})},
		{Name: "hotel", Retry: retry,
			Try:     sdk.MustCall(hotel, hotelv1.HotelService_Hold_FullMethodName, &hotelv1.HoldRequest{Rooms: t.hotelRooms()}),
			Confirm: sdk.MustCall(hotel, hotelv1.HotelService_Confirm_FullMethodName, &hotelv1.ConfirmRequest{TripId: t.ID}),
			Cancel:  sdk.MustCall(hotel, hotelv1.HotelService_Release_FullMethodName, &hotelv1.ReleaseRequest{TripId: t.ID})},
		{Name: "car", Retry: retry,
			Try:     sdk.MustCall(car, carv1.CarService_Hold_FullMethodName, &carv1.HoldRequest{Rental: t.carRental()}),
			Confirm: sdk.MustCall(car, carv1.CarService_Confirm_FullMethodName, &carv1.ConfirmRequest{TripId: t.ID}),
			Cancel:  sdk.MustCall(car, carv1.CarService_Release_FullMethodName, &carv1.ReleaseRequest{TripId: t.ID})},
	}
	return d.client.TCC(ctx, sdk.TCCOptions{GID: t.GID, Timeout: time.Minute, Wait: time.Minute}, func(ctx context.Context, s *sdk.TCCScope) error {
		for _, b := range branches {
			if err := tryRetrying(ctx, s, b); err != nil {
				return err
			}
		}
		return nil
	})
}

// tryRetrying calls a TCC try until it succeeds, is refused (ABORTED), or fails 30 times: the
// initiator's own calls meet the same transient failures as the coordinator's, and a repeated
// try is safe behind the participant's barrier.
func tryRetrying(ctx context.Context, s *sdk.TCCScope, b sdk.TCCBranch) error {
	backoff := 10 * time.Millisecond
	for attempt := 1; ; attempt++ {
		_, err := s.Try(ctx, b)
		if err == nil || errors.Is(err, sdk.ErrAborted) || attempt == 30 {
			return err
		}
		select {
		case <-ctx.Done():
			return errors.Join(err, ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 300*time.Millisecond)
	}
}

// settle waits until t's transaction is terminal and records its outcome.
func (d *demo) settle(ctx context.Context, t *trip, callErr error) {
	tx, err := d.client.Wait(ctx, t.GID, time.Minute)
	switch {
	case err != nil:
		t.Outcome, t.Reason = "unfinished", errors.Join(callErr, err).Error()
	case tx.Status == sdk.StatusSucceeded:
		t.Outcome = outcomeBooked
	case tx.Status == sdk.StatusCompensated:
		t.Outcome, t.Reason = outcomeRolledBack, tx.Reason
	default:
		t.Outcome, t.Reason = strings.ToLower(strings.TrimPrefix(tx.Status.String(), "STATUS_")), tx.Reason
	}
	t.Tx = tx
}

func (d *demo) book(ctx context.Context, t *trip) {
	var err error
	if t.Mode == "tcc" {
		_, err = d.bookTCC(ctx, t)
	} else {
		_, err = d.bookSaga(ctx, t, time.Minute)
	}
	d.settle(ctx, t, err)
}

// verdict says how the trip ended against what was expected.
func (d *demo) verdict(t *trip) string {
	if t.Outcome == t.Expected || t.Expected == outcomeEither && (t.Outcome == outcomeBooked || t.Outcome == outcomeRolledBack) {
		if t.Outcome == outcomeRolledBack {
			return fmt.Sprintf("rolled back, as expected (%s)", tidy(t.Reason))
		}
		return t.Outcome + ", as expected"
	}
	return fmt.Sprintf("UNEXPECTED: %s (%s), expected %s", t.Outcome, tidy(t.Reason), t.Expected)
}

// history renders the transaction's branches: name, operation, status, attempts.
func history(tx *sdk.Transaction) string {
	if tx == nil || tx.Raw == nil {
		return ""
	}
	var parts []string
	for _, b := range tx.Raw.Branches {
		st := strings.ToLower(strings.TrimPrefix(b.Status.String(), "BRANCH_STATUS_"))
		if b.Status == treatyv1.BranchStatus_BRANCH_STATUS_PENDING || b.Status == treatyv1.BranchStatus_BRANCH_STATUS_SKIPPED {
			continue
		}
		p := fmt.Sprintf("%s %s %s", b.Name, b.Op, st)
		if b.Attempts > 1 {
			p += fmt.Sprintf(" after %d attempts", b.Attempts)
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, "; ")
}

// story books the trips of the walkthrough, one at a time, and prints what happens.
func (d *demo) story(ctx context.Context) error {
	chapter := func(t *trip, title, intro string, book func() error) error {
		d.say("%s", title)
		d.say("   %s", intro)
		if err := book(); err != nil {
			return err
		}
		d.say("   => %s", d.verdict(t))
		if h := history(t.Tx); h != "" {
			d.say("   coordinator's record: %s", h)
		}
		return d.printEmail(ctx, t)
	}

	ada := d.newTrip(1, "saga", "Ada Lovelace", "TB101", 1, "Harbour Hotel", 3, "compact-KEF", 3)
	if err := chapter(ada, "1. A trip that books.",
		"Ada books flight TB101, the Harbour Hotel and a compact car with the registered saga book-trip.",
		func() error { d.book(ctx, ada); return nil }); err != nil {
		return err
	}

	grace := d.newTrip(2, "saga", "Grace Hopper", "TB404", 3, "Harbour Hotel", 2, "compact-KEF", 2)
	grace.Expected = outcomeRolledBack
	if err := chapter(grace, "2. A trip whose flight is sold out.",
		"Grace wants three seats on TB404, which is sold out. Her car and hotel are reserved first, so the saga compensates them, in reverse order.",
		func() error { d.book(ctx, grace); return nil }); err != nil {
		return err
	}

	linus := d.newTrip(3, "saga", "Linus Torvalds", "TB101", 1, "Harbour Hotel", 4, "compact-KEF", 4)
	if err := chapter(linus, "3. A service crashes mid-way.",
		"Linus books; the hotel service commits his room and crashes before it can answer.",
		func() error { return d.crashHotel(ctx, linus) }); err != nil {
		return err
	}

	margaret := d.newTrip(4, "tcc", "Margaret Hamilton", "TB101", 2, "Harbour Hotel", 5, "compact-KEF", 5)
	if err := chapter(margaret, "4. A trip booked with TCC.",
		"Margaret's booking holds two seats, a room and a car (try), then the coordinator confirms all three.",
		func() error { d.book(ctx, margaret); return nil }); err != nil {
		return err
	}

	katherine := d.newTrip(5, "tcc", "Katherine Johnson", "TB101", 1, "Harbour Hotel", 2, "suv-KEF", 2)
	katherine.Expected = outcomeRolledBack
	if err := chapter(katherine, "5. A TCC trip that cannot be completed.",
		"Katherine's booking holds a seat and a room, but no SUV is left: the coordinator cancels, and the holds are released.",
		func() error { d.book(ctx, katherine); return nil }); err != nil {
		return err
	}
	if d.cfg.restart == "" {
		return nil
	}

	hedy := d.newTrip(6, "saga", "Hedy Lamarr", "TB101", 1, "Harbour Hotel", 2, "compact-KEF", 2)
	return chapter(hedy, "6. A service restarts during a booking.",
		fmt.Sprintf("Hedy books while the %s service is redeployed: it stops as her booking starts and is back %s later.", d.cfg.restart, d.cfg.restartAfter),
		func() error { return d.restartDuring(ctx, hedy) })
}

// restartDuring books t while the --restart service is down: stopped before the booking starts,
// started again on the same address --restart-after later. The coordinator's default policy
// retries the step for minutes, so the trip books, with nothing compensated.
func (d *demo) restartDuring(ctx context.Context, t *trip) error {
	name := d.cfg.restart
	svc := d.service(name)
	if err := svc.stop(ctx); err != nil {
		return fmt.Errorf("stop the %s service: %w", name, err)
	}
	down := time.Now()
	d.say("   The %s service stops: its address refuses connections.", name)
	if _, err := d.bookSaga(ctx, t, -1); err != nil {
		return fmt.Errorf("start %s: %w", t.GID, err)
	}
	attempts, plan := 0, ""
	err := poll(ctx, time.Minute, func() (bool, error) {
		tx, err := d.client.Get(ctx, t.GID)
		if err != nil {
			return false, err
		}
		for _, b := range tx.Raw.Branches {
			if b.Name == name && b.Op == "action" {
				attempts = int(b.Attempts)
			}
		}
		for _, e := range tx.Raw.Events {
			if e.Kind == "branch_retry" && e.Branch == name {
				plan = e.Detail
			}
		}
		return attempts >= 2 || tx.Terminal(), nil
	})
	if err != nil {
		return fmt.Errorf("%s: waiting for the coordinator to retry the %s service: %w", t.GID, name, err)
	}
	if i := strings.Index(plan, "retrying until "); i >= 0 {
		plan = plan[i:]
	}
	d.say("   The coordinator retries the %s step (%d attempts so far): %s.", name, attempts, plan)
	select {
	case <-time.After(time.Until(down.Add(d.cfg.restartAfter))):
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := svc.start(ctx); err != nil {
		return fmt.Errorf("restart the %s service: %w", name, err)
	}
	back := time.Now()
	d.say("   The %s service is back after %s, on the same address, from its database.", name, back.Sub(down).Round(100*time.Millisecond))
	d.settle(ctx, t, nil)
	// The waited-for answer carries no history; the record does.
	if tx, err := d.client.Get(ctx, t.GID); err == nil && tx.Raw != nil {
		for _, e := range tx.Raw.Events {
			if e.Kind == "branch_succeeded" && e.Branch == name && e.Op == "action" && e.At != nil {
				d.say("   The coordinator reached it %s after its return.", e.At.AsTime().Sub(back).Round(10*time.Millisecond))
			}
		}
	}
	return nil
}

// crashHotel books t while the hotel service crashes right after committing t's room, waits
// until the coordinator has retried against the dead address, restarts the hotel from its
// database, and lets the booking finish.
func (d *demo) crashHotel(ctx context.Context, t *trip) error {
	hotel := d.service("hotel")
	crashed := hotel.faults.armCrash(t.GID)
	if _, err := d.bookSaga(ctx, t, -1); err != nil {
		return fmt.Errorf("start %s: %w", t.GID, err)
	}
	refused := false
	err := poll(ctx, 30*time.Second, func() (bool, error) {
		select {
		case <-crashed:
			return true, nil
		default:
		}
		// The hotel may refuse (--fail hotel) instead of crashing: then there is no crash.
		tx, err := d.client.Get(ctx, t.GID)
		refused = err == nil && tx.Terminal()
		return refused, err
	})
	if err != nil {
		return fmt.Errorf("%s: waiting for the hotel to crash: %w", t.GID, err)
	}
	if refused {
		d.say("   (the hotel refused before it could crash)")
		d.settle(ctx, t, nil)
		return nil
	}
	d.say("   The hotel service is down: its address refuses connections; the room it committed is in its database.")
	attempts, lastErr := 0, ""
	err = poll(ctx, 30*time.Second, func() (bool, error) {
		tx, err := d.client.Get(ctx, t.GID)
		if err != nil {
			return false, err
		}
		for _, b := range tx.Raw.Branches {
			if b.Name == "hotel" && b.Op == "action" {
				attempts, lastErr = int(b.Attempts), b.LastError
			}
		}
		return attempts >= 3, nil
	})
	if err != nil {
		return fmt.Errorf("%s: waiting for the coordinator to retry the hotel: %w", t.GID, err)
	}
	d.say("   The coordinator keeps retrying with backoff: %d attempts so far (last: %s).", attempts, tidy(lastErr))
	if err := hotel.start(ctx); err != nil {
		return fmt.Errorf("restart the hotel service: %w", err)
	}
	d.say("   The hotel service restarts on the same address, from its database.")
	d.settle(ctx, t, nil)
	if t.Outcome == outcomeBooked {
		d.say("   The retried reservation was a repeat: the barrier answered it from its record, without reserving a second room.")
	}
	return nil
}

// poll checks cond every 20ms until it holds, fails, or timeout passes.
func poll(ctx context.Context, timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := cond()
		if err != nil || ok {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("still not done after %s", timeout)
		case <-tick.C:
		}
	}
}

// tidy shortens an error for the story: gRPC's and the barrier's wrapping say nothing a reader
// needs.
func tidy(s string) string {
	if strings.Contains(s, "connection refused") {
		return "connection refused"
	}
	for _, noise := range []string{"rpc error: code = Aborted desc = ", ": treaty participant: aborted", ": transaction rolled back"} {
		s = strings.ReplaceAll(s, noise, "")
	}
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 120 {
		s = s[:117] + "..."
	}
	return s
}

// printEmail waits until the consumer has applied every event written so far, then prints the
// e-mail it would send for t.
func (d *demo) printEmail(ctx context.Context, t *trip) error {
	if d.cfg.quiet {
		return nil
	}
	if _, err := d.waitForEvents(ctx); err != nil {
		return err
	}
	mail, err := d.notif.email(ctx, t)
	if err != nil {
		return err
	}
	d.say("   The notifications service, having applied every event so far exactly once, would send:")
	d.say("%s", mail)
	return nil
}

// bookMany books --trips random trips, --concurrency at a time, a third of them with TCC.
func (d *demo) bookMany(ctx context.Context) error {
	names := []string{"Ada", "Grace", "Linus", "Margaret", "Katherine", "Barbara", "Edsger", "Donald", "Frances", "Radia"}
	flights := []string{"TB101", "TB202", "TB303"}
	hotels := []string{"Harbour Hotel", "Aurora Lodge"}
	cars := []string{"compact-KEF", "suv-KEF"}
	var trips []*trip
	for i := range d.cfg.trips {
		mode := "saga"
		if i%3 == 2 {
			mode = "tcc"
		}
		t := d.newTrip(i+1, mode, fmt.Sprintf("%s %d", names[d.rng.IntN(len(names))], i+1),
			flights[d.rng.IntN(len(flights))], 1+d.rng.IntN(2), hotels[d.rng.IntN(len(hotels))], 1+d.rng.IntN(7),
			cars[d.rng.IntN(len(cars))], 1+d.rng.IntN(7))
		if t.Expected == outcomeBooked {
			t.Expected = outcomeEither // trips race for the same seats
		}
		trips = append(trips, t)
	}
	d.say("Booking %d trips, %d at a time (seed %d)...", len(trips), d.cfg.concurrency, d.cfg.seed)
	start := time.Now()
	sem := make(chan struct{}, d.cfg.concurrency)
	var wg sync.WaitGroup
	for _, t := range trips {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			d.book(ctx, t)
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	counts := map[string]map[string]int{}
	for _, t := range trips {
		if counts[t.Outcome] == nil {
			counts[t.Outcome] = map[string]int{}
		}
		counts[t.Outcome][t.Mode]++
	}
	d.say("Done in %s (%.1f trips/s):", elapsed.Round(time.Millisecond), float64(len(trips))/elapsed.Seconds())
	for _, o := range []string{outcomeBooked, outcomeRolledBack} {
		d.say("  %-12s %4d  (saga %d, TCC %d)", o, counts[o]["saga"]+counts[o]["tcc"], counts[o]["saga"], counts[o]["tcc"])
	}
	for o, c := range counts {
		if o != outcomeBooked && o != outcomeRolledBack {
			d.say("  %-12s %4d  UNEXPECTED", o, c["saga"]+c["tcc"])
		}
	}
	return nil
}
