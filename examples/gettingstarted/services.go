package main

import (
	"context"
	"fmt"
	"io"
	"sync"

	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/treatyhq/treaty/sdk/participant"
)

// --- snippet: payments-service
// NewPayments serves shop.Payments with its state in memory, to keep the guide short; a real
// one keeps it in its database under the barrier, as NewStock does.
func NewPayments(w io.Writer) *participant.Service {
	var mu sync.Mutex
	var balance int64
	svc := participant.NewService("shop.Payments", nil)
	participant.Handle(svc, "Charge", func(ctx context.Context, in *wrapperspb.Int64Value) (*emptypb.Empty, error) {
		mu.Lock()
		defer mu.Unlock()
		md, _ := participant.FromContext(ctx) // gid, branch, op and mode of the coordinator's call
		balance += in.Value
		fmt.Fprintf(w, "  payments: %s charged %d\n", md.GID, in.Value)
		return &emptypb.Empty{}, nil
	})
	participant.Handle(svc, "Refund", func(ctx context.Context, in *wrapperspb.Int64Value) (*emptypb.Empty, error) {
		mu.Lock()
		defer mu.Unlock()
		md, _ := participant.FromContext(ctx)
		balance -= in.Value
		fmt.Fprintf(w, "  payments: %s refunded %d\n", md.GID, in.Value)
		return &emptypb.Empty{}, nil
	})
	return svc
}

// --- end

// NewBank serves bank.Accounts, a TCC participant: Try holds the amount, Confirm applies it,
// Cancel drops the hold. In memory, keyed by gid and branch, so repeats change nothing.
func NewBank(w io.Writer) *participant.Service {
	var mu sync.Mutex
	balances := map[string]int64{"alice": 100, "bob": 0}
	held := map[string]int64{}
	svc := participant.NewService("bank.Accounts", nil)
	handle := func(name string, apply func(key, account string, amount int64) error) {
		participant.Handle(svc, name, func(ctx context.Context, in *structpb.Struct) (*emptypb.Empty, error) {
			mu.Lock()
			defer mu.Unlock()
			md, _ := participant.FromContext(ctx)
			account, amount := in.Fields["account"].GetStringValue(), int64(in.Fields["amount"].GetNumberValue())
			err := apply(md.GID+"/"+md.Branch, account, amount)
			fmt.Fprintf(w, "  bank: %s %s %s %d: err=%v\n", name, md.Branch, account, amount, err)
			return &emptypb.Empty{}, err
		})
	}
	handle("Try", func(key, account string, amount int64) error {
		if _, ok := held[key]; ok {
			return nil
		}
		if balances[account]+amount < 0 {
			return fmt.Errorf("%s has %d: %w", account, balances[account], participant.ErrAborted)
		}
		held[key] = amount
		return nil
	})
	handle("Confirm", func(key, account string, _ int64) error {
		balances[account] += held[key]
		delete(held, key)
		return nil
	})
	handle("Cancel", func(key, _ string, _ int64) error {
		delete(held, key)
		return nil
	})
	return svc
}
