// Package main is the program docs/GETTING_STARTED.md builds, step by step: a participant of
// your own with its state in a database under the barrier, a saga, a TCC transfer and a
// registered workflow, run against `coordinator dev` (or, in its test, an embedded coordinator).
// The guide quotes this code; a test checks that every Go snippet of the guide is in these files.
package main

import (
	"context"
	"database/sql"
	"fmt"

	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/treatyhq/treaty/sdk/participant"
)

// --- snippet: stock-service
// NewStock serves shop.Stock: Reserve takes items off the shelf, Release puts them back. Each
// call runs under the barrier, in the same local transaction as its UPDATE, so a repeated call,
// a Release before its Reserve, or a Reserve after its Release changes nothing.
func NewStock(ctx context.Context, db *sql.DB) (*participant.Service, error) {
	barrier, err := participant.NewBarrier(participant.BarrierOptions{Dialect: participant.DialectSQLite})
	if err != nil {
		return nil, err
	}
	if err := barrier.EnsureTableSQL(ctx, db); err != nil {
		return nil, err
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS shelf (item TEXT PRIMARY KEY, count INTEGER NOT NULL)`); err != nil {
		return nil, err
	}
	svc := participant.NewService("shop.Stock", &participant.ServiceOptions{Barrier: barrier, SQL: db})
	participant.HandleSQL(svc, "Reserve", func(ctx context.Context, tx *sql.Tx, in *structpb.Struct) (*wrapperspb.Int64Value, error) {
		item, n := in.Fields["item"].GetStringValue(), int64(in.Fields["count"].GetNumberValue())
		var left int64
		err := tx.QueryRowContext(ctx, `UPDATE shelf SET count = count - ? WHERE item = ? AND count >= ? RETURNING count`, n, item, n).Scan(&left)
		if err == sql.ErrNoRows {
			return nil, fmt.Errorf("not enough %s: %w", item, participant.ErrAborted) // a business "no"
		}
		return wrapperspb.Int64(left), err
	})
	participant.HandleSQL(svc, "Release", func(ctx context.Context, tx *sql.Tx, in *structpb.Struct) (*wrapperspb.Int64Value, error) {
		item, n := in.Fields["item"].GetStringValue(), int64(in.Fields["count"].GetNumberValue())
		_, err := tx.ExecContext(ctx, `UPDATE shelf SET count = count + ? WHERE item = ?`, n, item)
		return &wrapperspb.Int64Value{}, err
	})
	return svc, nil
}

// --- end
