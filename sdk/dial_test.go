package sdk_test

import (
	"context"
	"net"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/treatytest"
)

func TestDialTargets(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	coord, err := treatytest.NewEmbedded(ctx)
	require.NoError(t, err)
	defer coord.Close()
	_, port, err := net.SplitHostPort(coord.Addr)
	require.NoError(t, err)
	// A DNS name: every address it resolves to is a replica (here localhost's, of which only
	// 127.0.0.1 answers).
	for _, addr := range []string{"dns:///localhost:" + port, coord.Addr, " " + coord.Addr + " , " + coord.Addr} {
		c, err := sdk.Dial(ctx, sdk.Options{Address: addr})
		require.NoError(t, err, addr)
		_, err = c.Get(ctx, "nope")
		require.ErrorIs(t, err, sdk.ErrNotFound, addr)
		require.NoError(t, c.Close())
	}
	for _, tc := range []struct {
		opts sdk.Options
		want string
	}{
		{sdk.Options{}, "Options.Address is required"},
		{sdk.Options{Address: " , "}, "Options.Address is required"},
		{sdk.Options{Address: "a:1,dns:///b:2"}, `"dns:///b:2": a gRPC target (scheme:///name) must be the only address`},
		{sdk.Options{Address: "a:1", Addresses: []string{"b"}}, `"b" is not host:port`},
	} {
		_, err := sdk.Dial(ctx, tc.opts)
		require.ErrorIs(t, err, sdk.ErrInvalidArgument)
		require.ErrorContains(t, err, tc.want)
	}
}
