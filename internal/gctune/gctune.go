// Package gctune sets the Go garbage collector of a coordinator process: a relaxed collection
// target while memory is plentiful, and a soft memory limit that makes the collector work
// harder as the heap nears what the replica may use.
//
// Why: with Go's defaults (GOGC=100, no limit) the collector ran 16 times a second under
// issue 13's benchmark and, with the stack regrowth it causes, took a quarter of the
// coordinator's CPU; GOGC=400 raised the saga rate by a fifth to a quarter (docs/BENCHMARKS.md).
// A larger target alone would let garbage grow to five times the live heap; the soft limit keeps
// the total bounded by the replica's memory budget instead.
package gctune

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
)

const (
	// DefaultGCPercent is the collection target when GOGC is not set.
	DefaultGCPercent = 400
	// MinMemoryLimit is the smallest automatic soft memory limit.
	MinMemoryLimit = 512 << 20
	// limitPerActiveByte: the automatic limit is this many times --max-active-bytes. A
	// transaction's live heap is about 1.5 to 1.7 times its payload (docs/BENCHMARKS.md,
	// "Coordinator memory"), so at a full budget the collector still has about as much room
	// again for garbage as GOGC=100 would give it.
	limitPerActiveByte = 3
	// cgroupShare is the part of a container's memory limit the automatic limit stays under
	// (the rest is for memory the Go runtime does not count: thread stacks, the binary).
	cgroupShare = 0.8
)

// Settings is what Apply did.
type Settings struct {
	GCPercent   int    // the collection target in force
	MemoryLimit int64  // the soft memory limit in force (math.MaxInt64: none)
	Source      string // where each came from, for the start-up log
}

// Config is what the operator asked for; zero values mean automatic.
type Config struct {
	// GCPercent: 0 = DefaultGCPercent; negative = leave Go's default.
	GCPercent int
	// MemoryLimit in bytes: 0 = automatic (Limit); negative = none.
	MemoryLimit int64
	// MaxActiveBytes is the replica's payload budget (--max-active-bytes).
	MaxActiveBytes int64
}

// Apply sets the collector for this process. The Go runtime's own variables win: with GOGC set
// the target is left alone, with GOMEMLIMIT set the limit is.
func Apply(getenv func(string) string, c Config) Settings {
	var s Settings
	var src []string
	switch {
	case getenv("GOGC") != "":
		s.GCPercent = debug.SetGCPercent(-1)
		debug.SetGCPercent(s.GCPercent)
		src = append(src, "GOGC from the environment")
	case c.GCPercent < 0:
		s.GCPercent = debug.SetGCPercent(100)
		debug.SetGCPercent(s.GCPercent)
		src = append(src, "Go's default GC target")
	default:
		s.GCPercent = c.GCPercent
		if s.GCPercent == 0 {
			s.GCPercent = DefaultGCPercent
		}
		debug.SetGCPercent(s.GCPercent)
		src = append(src, "GC target "+strconv.Itoa(s.GCPercent))
	}
	switch {
	case getenv("GOMEMLIMIT") != "":
		s.MemoryLimit = debug.SetMemoryLimit(-1)
		src = append(src, "GOMEMLIMIT from the environment")
	case c.MemoryLimit < 0:
		s.MemoryLimit = debug.SetMemoryLimit(-1)
		src = append(src, "no memory limit")
	case c.MemoryLimit > 0:
		s.MemoryLimit = c.MemoryLimit
		debug.SetMemoryLimit(s.MemoryLimit)
		src = append(src, "memory limit as configured")
	default:
		var why string
		s.MemoryLimit, why = Limit(c.MaxActiveBytes, CgroupLimit("/"))
		debug.SetMemoryLimit(s.MemoryLimit)
		src = append(src, why)
	}
	s.Source = strings.Join(src, "; ")
	return s
}

// Limit is the automatic soft memory limit: limitPerActiveByte times the payload budget, at
// least MinMemoryLimit, and at most cgroupShare of the container's limit (cgroup 0: none).
func Limit(maxActiveBytes, cgroup int64) (int64, string) {
	limit := max(limitPerActiveByte*maxActiveBytes, MinMemoryLimit)
	why := fmt.Sprintf("memory limit %d MiB (%d × --max-active-bytes, at least %d MiB)", limit>>20, limitPerActiveByte, MinMemoryLimit>>20)
	if cgroup > 0 {
		if c := int64(float64(cgroup) * cgroupShare); c < limit {
			limit = c
			why = fmt.Sprintf("memory limit %d MiB (%.0f%% of the container's %d MiB)", limit>>20, cgroupShare*100, cgroup>>20)
		}
	}
	return limit, why
}

// CgroupLimit returns this process's container memory limit in bytes, or 0 when there is none
// or it cannot be read. root is the file system root ("/"; tests pass a fake one). It reads
// cgroup v2 (memory.max) and v1 (memory.limit_in_bytes), in the process's own group first and
// then at the top of the hierarchy (what a container usually sees).
func CgroupLimit(root string) int64 {
	f, err := os.Open(filepath.Join(root, "proc/self/cgroup"))
	if err != nil {
		return 0
	}
	defer f.Close()
	var candidates []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			candidates = append(candidates,
				filepath.Join(root, "sys/fs/cgroup", parts[2], "memory.max"),
				filepath.Join(root, "sys/fs/cgroup", "memory.max"))
		case strings.Contains(","+parts[1]+",", ",memory,"):
			candidates = append(candidates,
				filepath.Join(root, "sys/fs/cgroup/memory", parts[2], "memory.limit_in_bytes"),
				filepath.Join(root, "sys/fs/cgroup/memory", "memory.limit_in_bytes"))
		}
	}
	for _, p := range candidates {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		v := strings.TrimSpace(string(b))
		if v == "max" {
			return 0
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			continue
		}
		if n >= 1<<62 { // v1 writes a page-rounded MaxInt64 for "no limit"
			return 0
		}
		return n
	}
	return 0
}
