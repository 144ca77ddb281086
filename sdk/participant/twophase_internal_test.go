package participant

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The servers tests use have prepared transactions enabled and the setting cannot change
// without a restart, so the refusal is tested on the function that builds it.
func TestCheckMaxPreparedMessage(t *testing.T) {
	t.Parallel()
	require.NoError(t, checkMaxPrepared("100"))
	require.NoError(t, checkMaxPrepared("1"))

	err := checkMaxPrepared("0")
	require.ErrorIs(t, err, ErrPreparedTransactionsDisabled)
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	for _, want := range []string{
		"max_prepared_transactions is 0",
		"ALTER SYSTEM SET max_prepared_transactions = 100;",
		"restart PostgreSQL (a reload is not enough)",
		"-c max_prepared_transactions=100",
	} {
		require.Contains(t, err.Error(), want)
	}

	err = checkMaxPrepared("lots")
	require.ErrorContains(t, err, `max_prepared_transactions is "lots", expected a number`)
	require.False(t, errors.Is(err, ErrPreparedTransactionsDisabled))
}
