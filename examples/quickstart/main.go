// Command quickstart is Treaty in one file: two participant services, payments and stock,
// written as plain Go functions without .proto files, and two orders placed as sagas against a
// coordinator embedded in the process. The first order succeeds. The second asks for more stock
// than there is, so stock refuses (a business "no", ABORTED) and the coordinator refunds the
// payment.
//
//	go run ./examples/quickstart
//
// A real participant keeps its state in its database and runs each handler under the barrier
// (participant.HandlePgx), so that retried, repeated and out-of-order calls are harmless; see
// docs/GETTING_STARTED.md.
package main

import (
	"context"
	"fmt"
	"net"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/participant"
	"github.com/treatyhq/treaty/sdk/treatytest"
)

func main() {
	// A coordinator in this process, on an in-memory store, and a client of it.
	coord := must(treatytest.NewEmbedded(context.Background()))
	defer coord.Close()
	client := must(sdk.Dial(context.Background(), sdk.Options{Address: coord.Addr}))
	defer client.Close()

	// The participants' state: money taken, items on the shelf.
	mu, balance, stock := sync.Mutex{}, int64(0), int64(3)
	payments, inventory := participant.NewService("shop.Payments", nil), participant.NewService("shop.Stock", nil)
	// Each method adds (sign +1) or takes (-1) an amount; taking more than there is is refused
	// with ErrAborted, which the coordinator reads as a business "no" and does not retry.
	method := func(svc *participant.Service, name string, v *int64, sign int64) {
		participant.Handle(svc, name, func(ctx context.Context, in *wrapperspb.Int64Value) (*wrapperspb.Int64Value, error) {
			mu.Lock()
			defer mu.Unlock()
			if *v+sign*in.Value < 0 {
				return nil, fmt.Errorf("%s(%d): only %d left: %w", name, in.Value, *v, participant.ErrAborted)
			}
			*v += sign * in.Value
			fmt.Printf("  %s(%d): balance %d, stock %d\n", svc.Method(name), in.Value, balance, stock)
			return wrapperspb.Int64(*v), nil
		})
	}
	method(payments, "Charge", &balance, +1)
	method(payments, "Refund", &balance, -1)
	method(inventory, "Reserve", &stock, -1)
	method(inventory, "Release", &stock, +1)

	// Both services on one gRPC server.
	lis := must(net.Listen("tcp", "127.0.0.1:0"))
	srv := grpc.NewServer()
	payments.Register(srv)
	inventory.Register(srv)
	go srv.Serve(lis)
	defer srv.Stop()

	// An order is a saga: charge 10 per item, then reserve the items; each step with its undo.
	call := func(svc *participant.Service, name string, n int64) sdk.Call {
		return sdk.MustCall(lis.Addr().String(), svc.Method(name), wrapperspb.Int64(n))
	}
	for _, items := range []int64{2, 5} {
		fmt.Printf("order of %d items:\n", items)
		_, err := client.Saga(context.Background(), sdk.Saga{Steps: []sdk.Step{
			{Name: "pay", Action: call(payments, "Charge", 10*items), Compensate: call(payments, "Refund", 10*items)},
			{Name: "reserve", Action: call(inventory, "Reserve", items), Compensate: call(inventory, "Release", items)},
		}})
		fmt.Printf("  => error: %v\n", err) // nil: succeeded; sdk.ErrAborted: compensated
	}
	fmt.Printf("in the end: balance %d, stock %d\n", balance, stock)
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
