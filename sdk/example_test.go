package sdk_test

import (
	"context"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/treatytest"
)

// startHealth runs a participant: the standard gRPC health service, whose Check method serves as
// every endpoint. A real service would expose Reserve/Cancel methods of its own.
func startHealth(refuse bool) (addr string, stop func()) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	var opts []grpc.ServerOption
	if refuse {
		opts = append(opts, grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			return nil, status.Error(codes.Aborted, "sold out")
		}))
	}
	s := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(s, health.NewServer())
	go func() { _ = s.Serve(lis) }()
	return lis.Addr().String(), s.Stop
}

// Example_saga books a trip as a saga: each step has an action and the compensation that undoes
// it; the coordinator runs them in order and compensates on a refusal.
func Example_saga() {
	ctx := context.Background()
	coord, err := treatytest.NewEmbedded(ctx) // a real coordinator, in memory
	if err != nil {
		panic(err)
	}
	defer coord.Close()
	hotels, stop := startHealth(false)
	defer stop()
	flights, stopF := startHealth(true) // the flight service refuses: sold out
	defer stopF()

	client, err := sdk.Dial(ctx, sdk.Options{Address: coord.Addr})
	if err != nil {
		panic(err)
	}
	defer client.Close()
	check := healthpb.Health_Check_FullMethodName
	req := &healthpb.HealthCheckRequest{}
	tx, err := client.Saga(ctx, sdk.Saga{GID: "trip-42", Steps: []sdk.Step{
		{Name: "hotel", Action: sdk.MustCall(hotels, check, req), Compensate: sdk.MustCall(hotels, check, req)},
		{Name: "flight", Action: sdk.MustCall(flights, check, req), Compensate: sdk.MustCall(flights, check, req)},
	}})
	fmt.Println(tx.Phase, errors.Is(err, sdk.ErrAborted))
	// Output: compensated true
}

// Example_tcc reserves with try, then confirms every branch when the function returns nil.
func Example_tcc() {
	ctx := context.Background()
	coord, err := treatytest.NewEmbedded(ctx)
	if err != nil {
		panic(err)
	}
	defer coord.Close()
	bank, stop := startHealth(false)
	defer stop()
	client, err := sdk.Dial(ctx, sdk.Options{Address: coord.Addr})
	if err != nil {
		panic(err)
	}
	defer client.Close()

	call := sdk.MustCall(bank, healthpb.Health_Check_FullMethodName, &healthpb.HealthCheckRequest{})
	tx, err := client.TCC(ctx, sdk.TCCOptions{GID: "transfer-7"}, func(ctx context.Context, t *sdk.TCCScope) error {
		for _, account := range []string{"debit-alice", "credit-bob"} {
			if _, err := t.Try(ctx, sdk.TCCBranch{Name: account, Try: call, Confirm: call, Cancel: call}); err != nil {
				return err // rolls back: every registered branch is cancelled
			}
		}
		return nil // commits: every branch is confirmed
	})
	fmt.Println(tx.Phase, err)
	// Output: confirmed <nil>
}

// Example_workflow registers a definition once and starts it by name; a changed definition
// becomes a new version, and runs keep the version they started with.
func Example_workflow() {
	ctx := context.Background()
	coord, err := treatytest.NewEmbedded(ctx)
	if err != nil {
		panic(err)
	}
	defer coord.Close()
	svc, stop := startHealth(false)
	defer stop()
	client, err := sdk.Dial(ctx, sdk.Options{Address: coord.Addr})
	if err != nil {
		panic(err)
	}
	defer client.Close()

	call := sdk.MustCall(svc, healthpb.Health_Check_FullMethodName, &healthpb.HealthCheckRequest{})
	v, err := client.RegisterWorkflow(ctx, sdk.Workflow{Name: "book-trip", Steps: []sdk.Step{
		{Name: "car", Action: call, Compensate: call},
		{Name: "hotel", Action: call, Compensate: call},
	}})
	if err != nil {
		panic(err)
	}
	tx, err := client.StartWorkflow(ctx, "book-trip", sdk.StartOptions{GID: "trip-1",
		Inputs: map[string]sdk.Input{"car": {Action: &healthpb.HealthCheckRequest{}}}}) // this run's request
	fmt.Println(v.Version, tx.Workflow, tx.WorkflowVersion, tx.Phase, err)
	// Output: 1 book-trip 1 succeeded <nil>
}
