package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/pgtest"
)

func TestMain(m *testing.M) {
	code := pgtest.WrapTestMain(m)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// The README's demo, with every message applied twice as a redelivery would: the totals are
// those of the committed orders, each counted once.
func TestDemoAppliesEachOrderOnce(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var out bytes.Buffer
	err := run(ctx, config{db: pgtest.NewDatabase(t), topic: "orders", group: "order-totals", demo: true, orders: 33, redeliver: true}, &out)
	require.NoError(t, err, out.String())
	// Orders i = 0..35 except every 11th (i%11 == 10) were committed: 33 orders, 11 per customer.
	want := map[string][2]int64{}
	customers := []string{"ada", "grace", "linus"}
	for i := range 36 {
		if i%11 == 10 {
			continue
		}
		c := customers[i%3]
		w := want[c]
		want[c] = [2]int64{w[0] + 1, w[1] + int64(10+i)}
	}
	var exp bytes.Buffer
	exp.WriteString("demo: enqueued 33 orders (and rolled back 3) through the outbox\n")
	for _, c := range customers {
		fmt.Fprintf(&exp, "%s\torders=%d\tamount=%d\n", c, want[c][0], want[c][1])
	}
	require.Equal(t, exp.String(), out.String())
}
