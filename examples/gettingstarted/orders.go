package main

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/treatyhq/treaty/sdk"
)

// --- snippet: saga
// PlaceOrder charges the customer and reserves the items: a saga of two steps, each with the
// call that undoes it. err is nil when both succeeded and wraps sdk.ErrAborted when a step
// refused and what had run was compensated.
func PlaceOrder(ctx context.Context, client *sdk.Client, payments, stock, gid string, cents int64, item string, count int) (*sdk.Transaction, error) {
	items, err := structpb.NewStruct(map[string]any{"item": item, "count": count})
	if err != nil {
		return nil, err
	}
	return client.Saga(ctx, sdk.Saga{GID: gid, Steps: []sdk.Step{
		{Name: "pay",
			Action:     sdk.MustCall(payments, "/shop.Payments/Charge", wrapperspb.Int64(cents)),
			Compensate: sdk.MustCall(payments, "/shop.Payments/Refund", wrapperspb.Int64(cents))},
		{Name: "reserve",
			Action:     sdk.MustCall(stock, "/shop.Stock/Reserve", items),
			Compensate: sdk.MustCall(stock, "/shop.Stock/Release", items)},
	}})
}

// --- end

// --- snippet: tcc
// Transfer moves cents between two accounts with TCC: each try holds the money, and when the
// function returns nil the coordinator confirms every branch; an error (or a panic) cancels
// every branch that was registered.
func Transfer(ctx context.Context, client *sdk.Client, bank, from, to string, cents int64) (*sdk.Transaction, error) {
	call := func(method, account string, amount int64) sdk.Call {
		req, _ := structpb.NewStruct(map[string]any{"account": account, "amount": amount})
		return sdk.MustCall(bank, "/bank.Accounts/"+method, req)
	}
	return client.TCC(ctx, sdk.TCCOptions{Timeout: time.Minute}, func(ctx context.Context, t *sdk.TCCScope) error {
		for _, b := range []struct {
			name    string
			account string
			amount  int64
		}{{"debit", from, -cents}, {"credit", to, cents}} {
			if _, err := t.Try(ctx, sdk.TCCBranch{Name: b.name,
				Try: call("Try", b.account, b.amount), Confirm: call("Confirm", b.account, b.amount), Cancel: call("Cancel", b.account, b.amount),
			}); err != nil {
				return err
			}
		}
		return nil
	})
}

// --- end

// --- snippet: workflow
// RegisterOrder stores the order saga under a name, once; callers then start it by name with
// this run's requests. A changed definition becomes a new version; runs keep the version they
// started with.
func RegisterOrder(ctx context.Context, client *sdk.Client, payments, stock string) (sdk.WorkflowVersion, error) {
	none := &structpb.Struct{}
	return client.RegisterWorkflow(ctx, sdk.Workflow{Name: "place-order", Steps: []sdk.Step{
		{Name: "pay", Action: sdk.MustCall(payments, "/shop.Payments/Charge", wrapperspb.Int64(0)),
			Compensate: sdk.MustCall(payments, "/shop.Payments/Refund", wrapperspb.Int64(0))},
		{Name: "reserve", Action: sdk.MustCall(stock, "/shop.Stock/Reserve", none),
			Compensate: sdk.MustCall(stock, "/shop.Stock/Release", none)},
	}})
}

// StartOrder runs the registered workflow with this order's amounts.
func StartOrder(ctx context.Context, client *sdk.Client, gid string, cents int64, item string, count int) (*sdk.Transaction, error) {
	items, err := structpb.NewStruct(map[string]any{"item": item, "count": count})
	if err != nil {
		return nil, err
	}
	return client.StartWorkflow(ctx, "place-order", sdk.StartOptions{GID: gid, Inputs: map[string]sdk.Input{
		"pay":     {Action: wrapperspb.Int64(cents), Compensate: wrapperspb.Int64(cents)},
		"reserve": {Action: items, Compensate: items},
	}})
}

// --- end
