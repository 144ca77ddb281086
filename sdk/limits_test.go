package sdk_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/treatytest"
)

// A request over the coordinator's --max-request-bytes (default 4 MiB) is refused before it is
// read; the SDK's error says which limit that was, and the refusal is not retried.
func TestOversizedRequestNamesTheLimit(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	coord, err := treatytest.NewEmbedded(ctx)
	require.NoError(t, err)
	defer coord.Close()
	client, err := sdk.Dial(ctx, sdk.Options{Address: coord.Addr})
	require.NoError(t, err)
	defer client.Close()

	payload := wrapperspb.Bytes(bytes.Repeat([]byte{'x'}, 900<<10)) // each under the 1 MiB payload limit
	var steps []sdk.Step
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		steps = append(steps, sdk.Step{Name: name, Action: sdk.MustCall("127.0.0.1:9", "/shop.Stock/Reserve", payload)})
	}
	_, err = client.Saga(ctx, sdk.Saga{GID: "too-big", Steps: steps})
	require.ErrorIs(t, err, sdk.ErrResourceExhausted)
	require.Contains(t, err.Error(), "--max-request-bytes")
	var se *sdk.Error
	require.True(t, errors.As(err, &se))
	require.Equal(t, "request", se.Field)
}
