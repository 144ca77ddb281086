package saga_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/saga"
)

func TestReasonBeforeOperator(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		`a compensation failed 3 times: step "flight" aborted: sold out`: `step "flight" aborted: sold out`,
		`a confirm failed 10 times: `:                                    ``,
		`query-prepared failed 5 times: connection refused`:              `connection refused`,
		`a delivery failed 10 times`:                                     ``,
		`step "flight" aborted: sold out`:                                `step "flight" aborted: sold out`,
	} {
		require.Equal(t, want, saga.ReasonBeforeOperator(in), in)
	}
}
