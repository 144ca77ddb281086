package outbox

import (
	"context"
	"slices"
	"time"
)

// leaseLoop heartbeats, renews the relay's slot leases and rebalances, every third of the TTL.
func (r *Relay) leaseLoop(ctx context.Context) {
	interval := r.cfg.LeaseTTL / 3
	for {
		if !r.sleep(ctx, interval, false) {
			return
		}
		if err := r.leaseTick(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("relay: lease round failed; slots past their lease are not read", "err", err)
		}
	}
}

// leaseTick is one round: heartbeat, count live relays, renew held leases, then claim free or
// expired slots up to this relay's share (ceil(slots / live relays)) or mark the excess for
// release. Leases and liveness come from the database clock, never this process's.
func (r *Relay) leaseTick(ctx context.Context) error {
	r.leaseMu.Lock()
	defer r.leaseMu.Unlock()
	start := time.Now()
	ttl := r.cfg.LeaseTTL
	if _, err := r.cfg.Pool.Exec(ctx, "INSERT INTO "+r.n.relays+" (relay_id, heartbeat_at, expires_at) VALUES ($1, now(), now() + $2::interval)"+
		" ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now(), expires_at = now() + $2::interval", r.cfg.ID, ttl); err != nil {
		return err
	}
	// live (heartbeat not expired) sizes this relay's share: a relay that is only late keeps its
	// place. beating (a heartbeat within half a lease, when one comes every third) is what the
	// live_relays gauge reports: a killed relay drops out of it at its first missed beat instead
	// of counting until its heartbeat expires.
	var live, beating int
	if err := r.cfg.Pool.QueryRow(ctx, "SELECT count(*) FILTER (WHERE expires_at > now()), count(*) FILTER (WHERE heartbeat_at > now() - $1::interval) FROM "+r.n.relays,
		ttl/2).Scan(&live, &beating); err != nil {
		return err
	}
	live = max(live, 1)

	rows, err := r.cfg.Pool.Query(ctx, "UPDATE "+r.n.slots+" s SET expires_at = now() + $2::interval"+
		" FROM ("+r.lockOwned("$1", "")+") c WHERE s.slot = c.slot RETURNING s.slot, s.epoch", r.cfg.ID, ttl)
	if err != nil {
		return err
	}
	renewed := map[int32]int64{}
	for rows.Next() {
		var s int32
		var e int64
		if err := rows.Scan(&s, &e); err != nil {
			rows.Close()
			return err
		}
		renewed[s] = e
	}
	if err := rows.Err(); err != nil {
		return err
	}
	validUntil := start.Add(ttl - ttl/10)

	r.mu.Lock()
	var stray []int32
	for s, e := range renewed {
		if l, ok := r.held[s]; ok && l.epoch == e {
			r.held[s] = lease{epoch: e, validUntil: validUntil}
		} else {
			// Ours in the database but not known here (a claim whose answer was lost): give
			// it back rather than renew it forever without reading it.
			stray = append(stray, s)
		}
	}
	for s := range r.held {
		if _, ok := renewed[s]; !ok {
			r.log.Warn("relay: lost slot lease", "slot", s)
			delete(r.held, s)
			delete(r.release, s)
		}
	}
	target := (r.nSlots + live - 1) / live
	kept := len(r.held) - len(r.release)
	r.live = max(beating, 1)
	r.mu.Unlock()

	if len(stray) > 0 {
		if err := r.releaseSlots(ctx, stray); err != nil {
			return err
		}
	}

	switch {
	case kept < target:
		if err := r.claim(ctx, target-kept, start); err != nil {
			return err
		}
	case kept > target:
		r.mu.Lock()
		var mine []int32
		for s := range r.held {
			if !r.release[s] {
				mine = append(mine, s)
			}
		}
		slices.Sort(mine)
		// Give up the highest slots; the batch loop releases them after its batch in flight.
		for _, s := range mine[target:] {
			r.release[s] = true
		}
		r.mu.Unlock()
		r.signal()
	}
	r.mu.Lock()
	owned, total, liveN := len(r.held), r.nSlots, r.live
	r.mu.Unlock()
	r.obs.Slots(owned, total, liveN)
	return nil
}

// claim takes up to n slots that nobody holds or whose lease expired, bumping their epoch so
// that the former owner's writes are refused.
func (r *Relay) claim(ctx context.Context, n int, start time.Time) error {
	rows, err := r.cfg.Pool.Query(ctx, "UPDATE "+r.n.slots+" s SET owner = $1, expires_at = now() + $2::interval, epoch = s.epoch + 1"+
		" FROM (SELECT slot FROM "+r.n.slots+" WHERE owner IS NULL OR expires_at <= now() ORDER BY slot LIMIT $3 FOR UPDATE SKIP LOCKED) c"+
		" WHERE s.slot = c.slot RETURNING s.slot, s.epoch", r.cfg.ID, r.cfg.LeaseTTL, n)
	if err != nil {
		return err
	}
	defer rows.Close()
	validUntil := start.Add(r.cfg.LeaseTTL - r.cfg.LeaseTTL/10)
	var got int
	r.mu.Lock()
	defer r.mu.Unlock()
	for rows.Next() {
		var s int32
		var e int64
		if err := rows.Scan(&s, &e); err != nil {
			return err
		}
		r.held[s] = lease{epoch: e, validUntil: validUntil}
		got++
	}
	if err := rows.Err(); err != nil {
		return err
	}
	if got > 0 {
		r.log.Debug("relay: claimed slots", "count", got, "held", len(r.held))
		r.signal()
	}
	return nil
}

// applyReleases gives up the slots marked for release. The batch loop calls it between
// batches, so no batch in flight still reads them.
func (r *Relay) applyReleases(ctx context.Context) {
	r.mu.Lock()
	if len(r.release) == 0 {
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	r.leaseMu.Lock()
	defer r.leaseMu.Unlock()
	r.mu.Lock()
	var slots []int32
	for s := range r.release {
		slots = append(slots, s)
	}
	r.mu.Unlock()
	if len(slots) == 0 {
		return
	}
	if err := r.releaseSlots(ctx, slots); err != nil {
		r.log.Warn("relay: release slots", "err", err)
		return
	}
	r.mu.Lock()
	for _, s := range slots {
		delete(r.held, s)
		delete(r.release, s)
	}
	r.mu.Unlock()
	r.log.Debug("relay: released slots for rebalancing", "count", len(slots))
}

// readable returns the slots to read now with their epochs: held, not being released, and
// within their lease as far as this process can tell.
func (r *Relay) readable() ([]int32, []int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	slots := make([]int32, 0, len(r.held))
	epochs := make([]int64, 0, len(r.held))
	for s, l := range r.held {
		if r.release[s] || now.After(l.validUntil) {
			continue
		}
		slots = append(slots, s)
		epochs = append(epochs, l.epoch)
	}
	return slots, epochs
}

// HeldSlots reports how many slots this relay holds now.
func (r *Relay) HeldSlots() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.held)
}

// lockOwned selects the relay's slots (all, or those in the array parameter only) locked in
// slot order. Every statement that locks several slot rows takes them in this one order, so
// that a renewal and a batch's fenced write cannot deadlock.
func (r *Relay) lockOwned(owner, only string) string {
	q := "SELECT slot FROM " + r.n.slots + " WHERE owner = " + owner
	if only != "" {
		q += " AND slot = ANY(" + only + ")"
	}
	return q + " ORDER BY slot FOR UPDATE"
}

// releaseSlots gives slots (nil: all of them) back, keeping their epoch: the next owner bumps it.
func (r *Relay) releaseSlots(ctx context.Context, slots []int32) error {
	if slots == nil {
		_, err := r.cfg.Pool.Exec(ctx, "UPDATE "+r.n.slots+" s SET owner = NULL, expires_at = '-infinity'"+
			" FROM ("+r.lockOwned("$1", "")+") c WHERE s.slot = c.slot", r.cfg.ID)
		return err
	}
	_, err := r.cfg.Pool.Exec(ctx, "UPDATE "+r.n.slots+" s SET owner = NULL, expires_at = '-infinity'"+
		" FROM ("+r.lockOwned("$1", "$2")+") c WHERE s.slot = c.slot", r.cfg.ID, slots)
	return err
}

func (r *Relay) releasePending() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.release) > 0
}
