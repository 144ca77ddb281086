package engine

import (
	"context"
	"time"
)

// Every time this replica persists or compares with a persisted time (a deadline, a branch's
// next attempt, a hand-back time) must be on the database clock, which leases and claims use:
// a replica whose own clock is off would otherwise cancel early, retry late, or look stuck to
// the reconciliation job. The engine therefore keeps its offset to the database clock, measured
// at start and refreshed every clockInterval, and reads "now" as its own clock plus that offset.
// Its own clock still measures intervals (lease remaining, timers), which skew does not affect.

const (
	// clockInterval is how often the offset is measured again: clocks drift by far less than a
	// millisecond a minute when synchronised, and a stepped clock is caught within this.
	clockInterval = 30 * time.Second
	// ClockWarnOffset: above this offset to the database clock the engine logs a warning at
	// every measurement (the engine corrects for it, but the host's time service is broken).
	ClockWarnOffset = time.Second
	// clockSamples is how many round trips one measurement takes; the fastest one wins, since
	// its midpoint is the closest estimate of when the database read its clock.
	clockSamples = 3
)

// ClockObserver is told the measured offset of this replica's clock to the database clock
// (database minus replica). An Observer that also implements it receives it; internal/metrics
// does.
type ClockObserver interface {
	ClockOffset(d time.Duration)
}

// now is the database clock as seen from this replica.
func (e *Engine) now() time.Time {
	return e.cfg.Now().Add(time.Duration(e.clockOffset.Load()))
}

// Now is the database clock as seen from this replica: its own clock plus the measured offset.
// Other parts of the coordinator that compare with persisted times use it too.
func (e *Engine) Now() time.Time { return e.now() }

// ClockOffset returns the last measured offset of the database clock to this replica's clock.
func (e *Engine) ClockOffset() time.Duration { return time.Duration(e.clockOffset.Load()) }

// measureClock reads the database clock a few times and keeps the offset of the fastest read.
func (e *Engine) measureClock(ctx context.Context) error {
	best := time.Duration(-1)
	var offset time.Duration
	for range clockSamples {
		local := e.cfg.Now()
		start := time.Now()
		db, err := e.cfg.Store.Now(ctx)
		if err != nil {
			return err
		}
		rtt := time.Since(start)
		if best < 0 || rtt < best {
			best = rtt
			offset = db.Sub(local.Add(rtt / 2))
		}
	}
	e.clockOffset.Store(int64(offset))
	if o, ok := e.cfg.Observer.(ClockObserver); ok {
		o.ClockOffset(offset)
	}
	if offset > ClockWarnOffset || offset < -ClockWarnOffset {
		e.log.Warn("this replica's clock is off from the database clock; persisted times are corrected, but fix the host's time service",
			"offset", offset, "round_trip", best, "warn_above", ClockWarnOffset)
	}
	return nil
}

// clockLoop refreshes the offset; a failed measurement keeps the last one and is tried again
// sooner.
func (e *Engine) clockLoop(ctx context.Context) {
	t := time.NewTimer(clockInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		next := clockInterval
		if err := e.measureClock(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			e.log.Warn("could not read the database clock; keeping the last offset", "err", err, "offset", e.ClockOffset())
			next = time.Second
		}
		t.Reset(next)
	}
}
