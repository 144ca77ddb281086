package treatytest_test

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/testparticipant"
	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/treatytest"
)

func saga(part *testparticipant.Participant, gid string) sdk.Saga {
	return sdk.Saga{GID: gid, Wait: 30 * time.Second, Steps: []sdk.Step{{Name: "a",
		Action:     sdk.Call{Target: part.Target("x.Y/Do")},
		Compensate: sdk.Call{Target: part.Target("x.Y/Undo")}}}}
}

// A client of two replicas keeps working when one stops: its calls move to the other.
func TestClientFollowsReplicas(t *testing.T) {
	t.Parallel()
	part, err := testparticipant.Start(testparticipant.Options{})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	coords := treatytest.StartReplicas(t, 2, treatytest.Options{})
	client := treatytest.ClientOf(t, coords...)
	ctx := context.Background()
	for i := range 6 {
		_, err := client.Saga(ctx, saga(part, fmt.Sprintf("before-%d", i)))
		require.NoError(t, err)
	}
	require.NoError(t, coords[0].Close()) // one replica goes away
	for i := range 6 {
		tx, err := client.Saga(ctx, saga(part, fmt.Sprintf("after-%d", i)))
		require.NoError(t, err, "submit %d with one replica stopped", i)
		require.Equal(t, sdk.StatusSucceeded, tx.Status)
	}
	// The one left sees every transaction: they share the database.
	only, err := sdk.Dial(ctx, sdk.Options{Address: coords[1].Addr})
	require.NoError(t, err)
	defer only.Close()
	for _, gid := range []string{"before-0", "before-5", "after-0", "after-5"} {
		tx, err := only.Get(ctx, gid)
		require.NoError(t, err)
		require.Equal(t, sdk.StatusSucceeded, tx.Status, gid)
	}
}

// A replica that is down from the start (nothing listens at its address) is skipped: every
// submit succeeds on the other, whether the addresses come as a list or comma-separated.
func TestClientSkipsADeadReplica(t *testing.T) {
	t.Parallel()
	part, err := testparticipant.Start(testparticipant.Options{})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	live := treatytest.Start(t, treatytest.Options{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	dead := lis.Addr().String()
	require.NoError(t, lis.Close())
	ctx := context.Background()
	for name, opts := range map[string]sdk.Options{
		"list":  {Addresses: []string{dead, live.Addr}},
		"comma": {Address: dead + "," + live.Addr},
	} {
		client, err := sdk.Dial(ctx, opts)
		require.NoError(t, err)
		for i := range 6 {
			tx, err := client.Saga(ctx, saga(part, fmt.Sprintf("%s-%d", name, i)))
			require.NoError(t, err, "%s: submit %d", name, i)
			require.Equal(t, sdk.StatusSucceeded, tx.Status)
		}
		require.NoError(t, client.Close())
	}
}
