package engine

import (
	"fmt"
	"testing"
)

// The cache answers as a fresh parse does, refuses bad targets every time, and never holds more
// than maxParsedTargets entries however many targets clients invent.
func TestTargetCache(t *testing.T) {
	c := newTargetCache()
	for range 2 {
		p, err := c.parse("grpc://b:2,a:1/p.S/M")
		if err != nil {
			t.Fatal(err)
		}
		if p.label != "a:1,b:2/p.S/M" || len(p.addrs) != 2 || p.addrs[0] != "b:2" {
			t.Fatalf("parsed %+v", p)
		}
	}
	for range 2 {
		if _, err := c.parse("grpc://a:1/nomethod"); err == nil {
			t.Fatal("a bad target was accepted")
		}
	}
	for i := range 3 * maxParsedTargets {
		if _, err := c.parse(fmt.Sprintf("grpc://h%d:1/p.S/M", i)); err != nil {
			t.Fatal(err)
		}
		if n := len(c.m); n > maxParsedTargets {
			t.Fatalf("%d entries, bound %d", n, maxParsedTargets)
		}
	}
	var none *targetCache // planning without an engine (ValidateSaga, recovery) parses each time
	if p, err := none.parse("grpc://a:1/p.S/M"); err != nil || p.label != "a:1/p.S/M" {
		t.Fatalf("%+v %v", p, err)
	}
}
