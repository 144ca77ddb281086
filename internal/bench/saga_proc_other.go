//go:build !linux

package bench

import "time"

// processCPU is only measured on Linux.
func processCPU() (time.Duration, bool) { return 0, false }

// backendCPU is only measured on Linux, with the server on the same machine.
func backendCPU(int32, string) (time.Duration, bool) { return 0, false }

// loadAvg is only read on Linux.
func loadAvg() float64 { return 0 }

// pidCPU is only measured on Linux.
func pidCPU(int) (time.Duration, bool) { return 0, false }
