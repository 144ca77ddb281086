package engine

import (
	"runtime"
	"sync"
	"testing"
	"time"
)

// Every function handed to the workers runs, a worker that finished takes the next function
// instead of a new goroutine starting, and idle workers leave (after idleFor, or at stop).
func TestWorkersRunEverythingAndLeave(t *testing.T) {
	before := runtime.NumGoroutine()
	w := newWorkers(time.Hour)
	var wg sync.WaitGroup
	release := make(chan struct{})
	var mu sync.Mutex
	ran := 0
	for range 50 {
		wg.Add(1)
		w.run(func() {
			defer wg.Done()
			<-release
			mu.Lock()
			ran++
			mu.Unlock()
		})
	}
	close(release)
	wg.Wait()
	if ran != 50 {
		t.Fatalf("ran %d of 50", ran)
	}
	// 50 workers are idle now; 50 more functions in sequence reuse them.
	idle := runtime.NumGoroutine()
	for range 50 {
		wg.Add(1)
		w.run(wg.Done)
		wg.Wait()
	}
	if got := runtime.NumGoroutine(); got > idle {
		t.Fatalf("goroutines grew from %d to %d running functions one at a time", idle, got)
	}
	w.stop()
	waitGoroutines(t, before)

	short := newWorkers(10 * time.Millisecond)
	for range 10 {
		short.run(func() {})
	}
	waitGoroutines(t, before) // they leave by themselves when idle
	short.stop()
}

func waitGoroutines(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for runtime.NumGoroutine() > want {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after 30s, want at most %d", runtime.NumGoroutine(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
