package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"

	"google.golang.org/grpc"
	_ "modernc.org/sqlite" // the pure-Go SQLite driver, "sqlite"

	"github.com/treatyhq/treaty/sdk"
)

func main() {
	coordinator := flag.String("coordinator", "127.0.0.1:7600", "the coordinator's gRPC address (`coordinator dev` listens on 127.0.0.1:7600)")
	db := flag.String("db", filepath.Join(os.TempDir(), "treaty-gettingstarted-stock.db"), "SQLite file of the stock service")
	flag.Parse()
	if err := run(context.Background(), os.Stdout, *coordinator, *db); err != nil {
		fmt.Fprintln(os.Stderr, "gettingstarted:", err)
		os.Exit(1)
	}
}

// run serves the three participants on one loopback port, puts 3 apples on the shelf and runs
// what the guide runs: an order that succeeds, one that is compensated, a TCC transfer and a
// workflow run.
func run(ctx context.Context, w io.Writer, coordinator, dbPath string) error {
	db, err := sql.Open("sqlite", "file:"+dbPath+"?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)&_txlock=immediate")
	if err != nil {
		return err
	}
	defer db.Close()
	stock, err := NewStock(ctx, db)
	if err != nil {
		return err
	}
	if _, err := db.ExecContext(ctx, `INSERT INTO shelf (item, count) VALUES ('apple', 3) ON CONFLICT (item) DO UPDATE SET count = 3`); err != nil {
		return err
	}
	// --- snippet: serve
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	stock.Register(srv)
	NewPayments(w).Register(srv)
	NewBank(w).Register(srv)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	addr := lis.Addr().String() // what the coordinator calls: grpc://addr/shop.Stock/Reserve
	// --- end
	// --- snippet: dial
	client, err := sdk.Dial(ctx, sdk.Options{Address: coordinator})
	if err != nil {
		return err
	}
	defer client.Close()
	// --- end

	fmt.Fprintln(w, "order 1: 2 apples")
	tx, err := PlaceOrder(ctx, client, addr, addr, sdk.NewGID(), 500, "apple", 2)
	if err != nil {
		return fmt.Errorf("order 1: %w", err)
	}
	fmt.Fprintf(w, "  => %s\n", tx.Phase)
	fmt.Fprintln(w, "order 2: 5 apples")
	tx, err = PlaceOrder(ctx, client, addr, addr, sdk.NewGID(), 1200, "apple", 5)
	if !errors.Is(err, sdk.ErrAborted) {
		return fmt.Errorf("order 2 should be compensated: %v", err)
	}
	fmt.Fprintf(w, "  => %s: %s\n", tx.Phase, tx.Reason)

	fmt.Fprintln(w, "transfer: alice -> bob 30")
	if tx, err = Transfer(ctx, client, addr, "alice", "bob", 30); err != nil {
		return fmt.Errorf("transfer: %w", err)
	}
	fmt.Fprintf(w, "  => %s\n", tx.Phase)

	v, err := RegisterOrder(ctx, client, addr, addr)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "workflow %s version %d: 1 apple\n", v.Name, v.Version)
	if tx, err = StartOrder(ctx, client, sdk.NewGID(), 250, "apple", 1); err != nil {
		return fmt.Errorf("workflow: %w", err)
	}
	fmt.Fprintf(w, "  => %s (%s v%d)\n", tx.Phase, tx.Workflow, tx.WorkflowVersion)
	var left int
	if err := db.QueryRowContext(ctx, `SELECT count FROM shelf WHERE item = 'apple'`).Scan(&left); err != nil {
		return err
	}
	fmt.Fprintf(w, "apples left: %d\n", left)
	return nil
}
