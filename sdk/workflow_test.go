package sdk_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/sdk"
)

func TestWorkflowsAreVersioned(t *testing.T) {
	t.Parallel()
	e := setup(t, nil)
	ctx := context.Background()
	def := func(steps ...string) sdk.Workflow {
		w := sdk.Workflow{Name: "book-trip"}
		for _, s := range steps {
			w.Steps = append(w.Steps, sdk.Step{Name: s, Action: e.call("Reserve", "default"), Compensate: e.call("Cancel", "default")})
		}
		return w
	}
	v1, err := e.client.RegisterWorkflow(ctx, def("car", "hotel"))
	require.NoError(t, err)
	require.Equal(t, 1, v1.Version)
	require.True(t, v1.Created)
	again, err := e.client.RegisterWorkflow(ctx, def("car", "hotel"))
	require.NoError(t, err)
	require.Equal(t, 1, again.Version)
	require.False(t, again.Created, "the same definition adds no version")

	// A run started on v1 keeps v1 even after v2 is registered.
	tx1, err := e.client.StartWorkflow(ctx, "book-trip", sdk.StartOptions{GID: "trip-v1", Inputs: map[string]sdk.Input{
		"car": {Action: &treatyv1.GetTransactionRequest{Gid: "car for trip-v1"}},
	}})
	require.NoError(t, err)
	require.Equal(t, "book-trip", tx1.Workflow)
	require.Equal(t, 1, tx1.WorkflowVersion)
	v2, err := e.client.RegisterWorkflow(ctx, def("car", "hotel", "flight"))
	require.NoError(t, err)
	require.Equal(t, 2, v2.Version)

	tx2, err := e.client.StartWorkflow(ctx, "book-trip", sdk.StartOptions{GID: "trip-v2"})
	require.NoError(t, err)
	require.Equal(t, 2, tx2.WorkflowVersion)
	require.Equal(t, []string{"action:car", "action:hotel", "action:flight"}, e.calls("trip-v2"))
	pinned, err := e.client.StartWorkflow(ctx, "book-trip", sdk.StartOptions{GID: "trip-pinned", Version: 1})
	require.NoError(t, err)
	require.Equal(t, 1, pinned.WorkflowVersion)
	require.Equal(t, []string{"action:car", "action:hotel"}, e.calls("trip-pinned"))
	got, err := e.client.Get(ctx, "trip-v1")
	require.NoError(t, err)
	require.Equal(t, 1, got.WorkflowVersion)

	// The input replaced the definition's payload for that run only.
	var req treatyv1.GetTransactionRequest
	require.NoError(t, proto.Unmarshal(e.part.CallsFor("trip-v1")[0].Payload, &req))
	require.Equal(t, "car for trip-v1", req.Gid)
	require.NoError(t, proto.Unmarshal(e.part.CallsFor("trip-v2")[0].Payload, &req))
	require.Equal(t, "default", req.Gid)

	list, err := e.client.ListWorkflows(ctx, "")
	require.NoError(t, err)
	require.Len(t, list, 2)
	require.Equal(t, []int{1, 2}, []int{list[0].Version, list[1].Version})

	_, err = e.client.StartWorkflow(ctx, "no-such", sdk.StartOptions{})
	require.ErrorIs(t, err, sdk.ErrNotFound)
	_, err = e.client.StartWorkflow(ctx, "book-trip", sdk.StartOptions{Inputs: map[string]sdk.Input{"boat": {}}})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	_, err = e.client.RegisterWorkflow(ctx, sdk.Workflow{Name: "bad name"})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
}
