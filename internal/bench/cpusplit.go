package bench

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"sync"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
)

// The roles a benchmark process plays. Everything a role starts runs under its profiler label
// (goroutines inherit the labels of the goroutine that starts them), so a CPU profile of the
// measured phase says how the process's CPU divides between them. What carries no label is the
// Go runtime's own work (GC workers, the scheduler) and the bench's bookkeeping.
const (
	roleLabel       = "treaty.bench.role"
	roleCoordinator = "coordinator"
	roleParticipant = "participants"
	roleClient      = "clients"
	roleRelay       = "relays"
	roleProducer    = "producers"
	roleBroker      = "broker"
)

// asRole runs f with the profiler label role; goroutines f starts keep the label for life.
func asRole(ctx context.Context, role string, f func(context.Context)) {
	pprof.Do(ctx, pprof.Labels(roleLabel, role), f)
}

// CPUMsPerSaga splits the CPU of one measured phase by role, in milliseconds per saga (or per
// transaction, or per message: the unit of the bench that reports it). Zero means not measured.
type CPUMsPerSaga struct {
	// Coordinator: in process, its share of this process's CPU (by profiler label); with
	// --coordinator and --coordinator-pid, that process's CPU from /proc.
	Coordinator float64 `json:"coordinator"`
	// Participants are the no-op gRPC participant servers (in this process).
	Participants float64 `json:"participants"`
	// Clients submit the work and wait for the answers (in this process).
	Clients float64 `json:"clients"`
	// Runtime is this process's CPU that carries no role: GC workers, the scheduler, the bench's
	// own reads of the counters. It is shared by every role in the process.
	Runtime float64 `json:"runtime"`
	// PostgreSQL is the CPU of the server's backends connected to the benchmark's database
	// (when the server runs on this machine).
	PostgreSQL float64 `json:"postgresql"`
	// Total is the sum of the above.
	Total float64 `json:"total"`
}

// roleProfiler records a CPU profile of a phase in memory (and to a file if asked) and, at the
// end, divides the process's CPU by role label in proportion to the samples.
type roleProfiler struct {
	buf  bytes.Buffer
	file io.Writer
	on   bool
	done bool
}

// profilerMu serializes the benchmarks' use of the Go CPU profiler, which is one per process:
// runs in one process (tests) take turns instead of one of them losing its CPU split.
var profilerMu sync.Mutex

// startRoleProfiler starts the CPU profiler; file, if not nil, receives the profile too (the
// --cpuprofile flag). A profiler that cannot start (one already runs) leaves the split empty.
func startRoleProfiler(file io.Writer) (*roleProfiler, error) {
	p := &roleProfiler{file: file}
	profilerMu.Lock()
	if err := pprof.StartCPUProfile(&p.buf); err != nil {
		p.done = true
		profilerMu.Unlock()
		if file != nil {
			return nil, fmt.Errorf("--cpuprofile: %w", err)
		}
		return p, nil
	}
	p.on = true
	return p, nil
}

// stop ends the profile and returns the share of samples per role ("" for none). Calls after
// the first return nothing, so a deferred stop can back up the one on the success path.
func (p *roleProfiler) stop() (map[string]float64, error) {
	if p.done {
		return nil, nil
	}
	p.done = true
	if !p.on {
		profilerMu.Unlock()
		return nil, nil
	}
	pprof.StopCPUProfile()
	p.on = false
	profilerMu.Unlock()
	if p.file != nil {
		if _, err := p.file.Write(p.buf.Bytes()); err != nil {
			return nil, fmt.Errorf("--cpuprofile: %w", err)
		}
	}
	return roleShares(p.buf.Bytes(), roleLabel)
}

// roleShares parses a gzipped pprof profile and returns, per value of label key, the share of
// the profile's CPU time in samples with that value ("" for samples without the label). Only the
// few fields needed are read (profile.proto: Profile.sample = 2, Profile.string_table = 6,
// Sample.value = 2, Sample.label = 3, Label.key = 1, Label.str = 2).
func roleShares(gz []byte, key string) (map[string]float64, error) {
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		return nil, fmt.Errorf("read cpu profile: %w", err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		return nil, fmt.Errorf("read cpu profile: %w", err)
	}
	type sample struct {
		value    int64
		labelStr int64 // string index of the label's value; -1 for none
	}
	var (
		strs    []string
		samples []sample
	)
	// Samples name their label by string index, and the string table may come after them, so
	// keep (key, str) indices and resolve at the end.
	type rawSample struct {
		value int64
		pairs [][2]int64
	}
	var rs []rawSample
	b := raw
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, errors.New("read cpu profile: bad tag")
		}
		b = b[n:]
		if typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return nil, errors.New("read cpu profile: bad field")
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, errors.New("read cpu profile: bad bytes")
		}
		b = b[n:]
		switch num {
		case 2:
			s, err := parseSample(v)
			if err != nil {
				return nil, err
			}
			rs = append(rs, rawSample{value: s.value, pairs: s.pairs})
		case 6:
			strs = append(strs, string(v))
		}
	}
	for _, r := range rs {
		s := sample{value: r.value, labelStr: -1}
		for _, kv := range r.pairs {
			if kv[0] >= 0 && kv[0] < int64(len(strs)) && strs[kv[0]] == key {
				s.labelStr = kv[1]
			}
		}
		samples = append(samples, s)
	}
	var total int64
	by := map[string]int64{}
	for _, s := range samples {
		role := ""
		if s.labelStr >= 0 && s.labelStr < int64(len(strs)) {
			role = strs[s.labelStr]
		}
		by[role] += s.value
		total += s.value
	}
	out := make(map[string]float64, len(by))
	if total == 0 {
		return out, nil
	}
	for r, v := range by {
		out[r] = float64(v) / float64(total)
	}
	return out, nil
}

type parsedSample struct {
	value int64 // the last value: CPU nanoseconds in a Go CPU profile
	pairs [][2]int64
}

func parseSample(b []byte) (parsedSample, error) {
	var s parsedSample
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return s, errors.New("read cpu profile: bad sample tag")
		}
		b = b[n:]
		switch {
		case num == 2 && typ == protowire.BytesType: // packed values
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return s, errors.New("read cpu profile: bad sample values")
			}
			b = b[n:]
			for len(v) > 0 {
				x, m := protowire.ConsumeVarint(v)
				if m < 0 {
					return s, errors.New("read cpu profile: bad sample value")
				}
				v = v[m:]
				s.value = int64(x)
			}
		case num == 2 && typ == protowire.VarintType:
			x, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return s, errors.New("read cpu profile: bad sample value")
			}
			b = b[n:]
			s.value = int64(x)
		case num == 3 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return s, errors.New("read cpu profile: bad label")
			}
			b = b[n:]
			var kv [2]int64
			for len(v) > 0 {
				ln, lt, m := protowire.ConsumeTag(v)
				if m < 0 {
					return s, errors.New("read cpu profile: bad label field")
				}
				v = v[m:]
				if lt == protowire.VarintType && (ln == 1 || ln == 2) {
					x, m := protowire.ConsumeVarint(v)
					if m < 0 {
						return s, errors.New("read cpu profile: bad label value")
					}
					v = v[m:]
					kv[ln-1] = int64(x)
					continue
				}
				m = protowire.ConsumeFieldValue(ln, lt, v)
				if m < 0 {
					return s, errors.New("read cpu profile: bad label field")
				}
				v = v[m:]
			}
			s.pairs = append(s.pairs, kv)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return s, errors.New("read cpu profile: bad sample field")
			}
			b = b[n:]
		}
	}
	return s, nil
}

// splitCPU turns the process's CPU over a phase and the profile's shares into milliseconds per
// unit of work; external is the CPU of a coordinator in its own process (0 if not measured) and
// pg that of the PostgreSQL backends.
func splitCPU(process time.Duration, shares map[string]float64, external, pg time.Duration, units int64) CPUMsPerSaga {
	if units <= 0 {
		return CPUMsPerSaga{}
	}
	per := func(d time.Duration) float64 { return Millis(d / time.Duration(units)) }
	part := func(role string) time.Duration { return time.Duration(float64(process) * shares[role]) }
	c := CPUMsPerSaga{
		Coordinator:  per(part(roleCoordinator) + external),
		Participants: per(part(roleParticipant)),
		Clients:      per(part(roleClient)),
		Runtime:      per(part("")),
		PostgreSQL:   per(pg),
	}
	c.Total = Round3(c.Coordinator + c.Participants + c.Clients + c.Runtime + c.PostgreSQL)
	return c
}

// writeAllocProfile writes the process's allocation profile to path.
func writeAllocProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("--memprofile: %w", err)
	}
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		_ = f.Close()
		return fmt.Errorf("--memprofile: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("--memprofile: %w", err)
	}
	return nil
}
