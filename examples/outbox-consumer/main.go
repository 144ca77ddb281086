// Command outbox-consumer is an idempotent Kafka consumer: it reads order events that services
// wrote with outbox.Enqueue and the outbox-relay published, and applies each one exactly once to
// its own PostgreSQL table, with outbox.Inbox recording message ids in the same transaction.
//
// See README.md. With --demo it runs everything it needs in process except PostgreSQL: a
// Kafka-protocol broker (kfake), the outbox migrations, a relay and a producer.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/treatyhq/treaty/pkg/outbox"
)

// OrderPlaced is the event the producer enqueues; the key is the customer, so one customer's
// orders arrive in order.
type OrderPlaced struct {
	OrderID  string `json:"order_id"`
	Customer string `json:"customer"`
	Amount   int64  `json:"amount"`
}

type config struct {
	db, brokers, topic, group string
	demo                      bool
	orders                    int
	redeliver                 bool
}

func main() {
	var cfg config
	flag.StringVar(&cfg.db, "db", os.Getenv("TREATY_DB"), "PostgreSQL URL of the consumer's database (TREATY_DB)")
	flag.StringVar(&cfg.brokers, "brokers", os.Getenv("TREATY_BROKERS"), "Kafka brokers, comma-separated (TREATY_BROKERS)")
	flag.StringVar(&cfg.topic, "topic", "orders", "topic to consume")
	flag.StringVar(&cfg.group, "group", "order-totals", "consumer group")
	flag.BoolVar(&cfg.demo, "demo", false, "run a broker, a relay and a producer in process, consume --orders orders and exit")
	flag.IntVar(&cfg.orders, "orders", 100, "orders the demo produces")
	flag.BoolVar(&cfg.redeliver, "redeliver", false, "apply every message twice, as a redelivery after a crash would")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, cfg, os.Stdout)
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "outbox-consumer:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config, out io.Writer) error {
	if cfg.db == "" {
		return errors.New("--db is required")
	}
	pool, err := pgxpool.New(ctx, cfg.db)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := setup(ctx, pool); err != nil {
		return err
	}
	want := -1
	if cfg.demo {
		stopDemo, brokers, err := startDemo(ctx, pool, cfg, out)
		if err != nil {
			return err
		}
		defer stopDemo()
		cfg.brokers, want = brokers, cfg.orders
	}
	if cfg.brokers == "" {
		return errors.New("--brokers is required (or --demo)")
	}
	if err := consume(ctx, pool, cfg, want); err != nil {
		return err
	}
	return printTotals(ctx, pool, out)
}

// setup creates the consumer's inbox and its projection table.
func setup(ctx context.Context, pool *pgxpool.Pool) error {
	if err := outbox.MigrateInbox(ctx, pool, "order_totals_inbox"); err != nil {
		return err
	}
	_, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS order_totals (
		customer text PRIMARY KEY,
		orders   integer NOT NULL,
		amount   bigint NOT NULL)`)
	return err
}

// consume applies messages until ctx ends or, when want >= 0, until want orders are applied.
func consume(ctx context.Context, pool *pgxpool.Pool, cfg config, want int) error {
	inbox, err := outbox.NewInbox("order_totals_inbox")
	if err != nil {
		return err
	}
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers: strings.Split(cfg.brokers, ","), GroupID: cfg.group, Topic: cfg.topic,
		MaxWait: 200 * time.Millisecond, StartOffset: kafka.FirstOffset,
	})
	defer r.Close()
	for applied := 0; want < 0 || applied < want; {
		m, err := r.FetchMessage(ctx)
		if err != nil {
			return err
		}
		id, ok := outbox.MessageID(m)
		if !ok {
			return fmt.Errorf("message at %s/%d/%d has no %s header", m.Topic, m.Partition, m.Offset, outbox.HeaderMessageID)
		}
		times := 1
		if cfg.redeliver {
			times = 2
		}
		for range times {
			var ran bool
			// The inbox row and the projection commit together: a crash before the commit
			// leaves neither, and the redelivered message is applied then.
			err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				var err error
				ran, err = inbox.Process(ctx, tx, id, func(ctx context.Context) error { return apply(ctx, tx, m.Value) })
				return err
			})
			if err != nil {
				return fmt.Errorf("apply message %s: %w", id, err)
			}
			if ran {
				applied++
			}
		}
		// Committing the offset after the database commit: at worst a message is fetched
		// again, and the inbox skips it.
		if err := r.CommitMessages(ctx, m); err != nil {
			return err
		}
	}
	return nil
}

func apply(ctx context.Context, tx pgx.Tx, value []byte) error {
	var ev OrderPlaced
	if err := json.Unmarshal(value, &ev); err != nil {
		return fmt.Errorf("decode order: %w", err)
	}
	_, err := tx.Exec(ctx, `INSERT INTO order_totals (customer, orders, amount) VALUES ($1, 1, $2)
		ON CONFLICT (customer) DO UPDATE SET orders = order_totals.orders + 1, amount = order_totals.amount + EXCLUDED.amount`,
		ev.Customer, ev.Amount)
	return err
}

func printTotals(ctx context.Context, pool *pgxpool.Pool, out io.Writer) error {
	rows, err := pool.Query(ctx, "SELECT customer, orders, amount FROM order_totals ORDER BY customer")
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var c string
		var n int
		var amount int64
		if err := rows.Scan(&c, &n, &amount); err != nil {
			return err
		}
		fmt.Fprintf(out, "%s\torders=%d\tamount=%d\n", c, n, amount)
	}
	return rows.Err()
}

// startDemo starts a broker and a relay, and writes orders through the outbox the way a
// service would: each order in its own transaction, with one rolled back for every ten.
func startDemo(ctx context.Context, pool *pgxpool.Pool, cfg config, out io.Writer) (func(), string, error) {
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, cfg.topic))
	if err != nil {
		return nil, "", err
	}
	if err := outbox.Migrate(ctx, pool, outbox.MigrateOptions{}); err != nil {
		kc.Close()
		return nil, "", err
	}
	relay, err := outbox.NewRelay(outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		kc.Close()
		return nil, "", err
	}
	if err := relay.Start(ctx); err != nil {
		kc.Close()
		return nil, "", err
	}
	stop := func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = relay.Stop(sctx)
		kc.Close()
	}
	customers := []string{"ada", "grace", "linus"}
	for i := range cfg.orders + cfg.orders/10 {
		ev := OrderPlaced{OrderID: fmt.Sprintf("o-%d", i), Customer: customers[i%len(customers)], Amount: int64(10 + i)}
		b, _ := json.Marshal(ev)
		tx, err := pool.Begin(ctx)
		if err != nil {
			stop()
			return nil, "", err
		}
		err = outbox.Enqueue(ctx, tx, outbox.Message{Topic: cfg.topic, Key: []byte(ev.Customer), Value: b})
		if err == nil && i%11 == 10 {
			err = tx.Rollback(ctx) // this order's event never leaves
		} else if err == nil {
			err = tx.Commit(ctx)
		}
		if err != nil {
			_ = tx.Rollback(ctx)
			stop()
			return nil, "", err
		}
	}
	fmt.Fprintf(out, "demo: enqueued %d orders (and rolled back %d) through the outbox\n", cfg.orders, cfg.orders/10)
	return stop, strings.Join(kc.ListenAddrs(), ","), nil
}
