package engine

import (
	"fmt"
	"time"
)

// DefaultMaxActiveBytes is the default memory budget of a replica's active transactions: the
// payload bytes they hold.
const DefaultMaxActiveBytes = 256 << 20

// OverloadRetryAfter is the delay a refusal for capacity suggests (google.rpc.RetryInfo): long
// enough for transactions in flight to finish, short enough not to stall a client.
const OverloadRetryAfter = time.Second

// payloadBytes is what the calls of a machine's plan hold: the bytes its budget counts.
func payloadBytes(m machine) int64 {
	var n int
	switch m := m.(type) {
	case *sagaMachine:
		for _, s := range m.plan.steps {
			n += len(s.action.payload) + len(s.compensate.payload)
		}
	case *twopcMachine:
		for _, b := range m.plan.branches {
			n += len(b.prepare.payload) + len(b.commit.payload) + len(b.rollback.payload)
		}
	case *msgMachine:
		n += len(m.plan.query.target.payload)
		for _, d := range m.plan.deliveries {
			n += len(d.target.payload)
		}
	case *tccMachine:
		for _, b := range m.branches_ {
			n += len(b.confirm.payload) + len(b.cancel.payload)
		}
	}
	return int64(n)
}

// admitBytes refuses new work of n payload bytes when the transactions this replica drives hold
// MaxActiveBytes already (or would, with it), before anything is written. Transactions in the
// middle of being admitted are not counted, so the budget can be passed by at most the requests
// being received at that instant, which the request size limit bounds.
func (e *Engine) admitBytes(n int) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if held := e.activeBytes; held+int64(n) > e.cfg.MaxActiveBytes {
		return fmt.Errorf("%w: active transactions hold %s of payloads, this one brings %s, budget %s (--max-active-bytes)",
			ErrOverloaded, byteSize64(held), byteSize(n), byteSize64(e.cfg.MaxActiveBytes))
	}
	return nil
}

// ActiveBytes returns the payload bytes held by the transactions this replica drives now.
func (e *Engine) ActiveBytes() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.activeBytes
}

func byteSize64(n int64) string {
	if n > int64(^uint(0)>>1) {
		return fmt.Sprintf("%d bytes", n)
	}
	return byteSize(int(n))
}
