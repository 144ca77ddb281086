package invoke_test

import (
	"testing"

	"go.uber.org/goleak"
)

// This package needs no database, so there is no pgtest.WrapTestMain here: only the leak check,
// which catches connections or gRPC goroutines that Close failed to stop.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
