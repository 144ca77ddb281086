package msg_test

import (
	"testing"

	"go.uber.org/goleak"
)

// The state machine does no I/O and needs no database, so there is no pgtest.WrapTestMain here;
// the leak check stays so that a goroutine sneaking into a pure package is caught.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
