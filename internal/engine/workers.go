package engine

import "time"

// workers runs functions on goroutines kept between runs. A participant call goes deep (the
// gRPC client's stream set-up, header encoding, the codec), and a fresh goroutine grows its
// stack by copying it, several times, on every call: 4.5% of the coordinator process's CPU in
// issue 13's profile (runtime.newstack under driver.call). A kept goroutine has grown its stack
// already. Idle ones leave after idleFor, so a burst does not leave thousands behind; there is
// no bound beyond the callers' own (every call is bounded by --max-active and the steps of each
// transaction), exactly as with a goroutine per call.
type workers struct {
	work    chan func()
	quit    chan struct{}
	idleFor time.Duration
}

func newWorkers(idleFor time.Duration) *workers {
	return &workers{work: make(chan func()), quit: make(chan struct{}), idleFor: idleFor}
}

// run runs f on an idle worker, or on a new one when none is idle: it never waits.
func (w *workers) run(f func()) {
	select {
	case w.work <- f:
	default:
		go w.loop(f)
	}
}

func (w *workers) loop(f func()) {
	idle := time.NewTimer(w.idleFor)
	defer idle.Stop()
	for {
		f()
		f = nil // an idle worker must not keep the last call's driver and payload alive
		idle.Reset(w.idleFor)
		select {
		case f = <-w.work:
		case <-idle.C:
			return
		case <-w.quit:
			return
		}
	}
}

// stop makes idle workers leave; running ones leave when their function returns.
func (w *workers) stop() { close(w.quit) }
