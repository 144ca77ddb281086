//go:build linux

package bench

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTick is the unit of /proc/PID/stat times: USER_HZ, 100 on every Linux that Go supports.
const clockTick = 10 * time.Millisecond

// processCPU returns the CPU time (user + system) this process has used.
func processCPU() (time.Duration, bool) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, false
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), true
}

// loadAvg returns the 1-minute load average (0 when unknown).
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// backendCPU returns the CPU time (user + system) of the PostgreSQL backend with this pid, when
// the server runs on this machine and /proc shows it. A remote server's pid could name an
// unrelated local process, so the process must be a postgres backend of database datname.
func backendCPU(pid int32, datname string) (time.Duration, bool) {
	dir := "/proc/" + strconv.Itoa(int(pid))
	cmd, err := os.ReadFile(dir + "/cmdline")
	// A backend's title is "postgres: USER DATABASE HOST(PORT) STATE".
	if err != nil || !strings.HasPrefix(string(cmd), "postgres: ") || !strings.Contains(string(cmd), " "+datname+" ") {
		return 0, false
	}
	return statCPU(dir)
}

// pidCPU returns the CPU time (user + system) of the process with this pid so far: a coordinator
// in its own process (--coordinator-pid). Threads that exited count too (the kernel adds them to
// the process).
func pidCPU(pid int) (time.Duration, bool) {
	return statCPU("/proc/" + strconv.Itoa(pid))
}

// statCPU reads utime + stime from dir/stat.
func statCPU(dir string) (time.Duration, bool) {
	stat, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return 0, false
	}
	// Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, false
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration(ut+st) * clockTick, true
}
