package outbox

import (
	"context"
	"database/sql"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Options configures an Outbox. The zero value means the default table.
type Options struct {
	// Table is the outbox table, optionally schema-qualified; it must match the name given to
	// Migrate and to the relay. Default DefaultTable.
	Table string
}

// Outbox writes messages into one outbox table.
type Outbox struct {
	names names
}

// New returns an Outbox for opts.Table.
func New(opts Options) (*Outbox, error) {
	n, err := parseTableName(opts.Table)
	if err != nil {
		return nil, err
	}
	return &Outbox{names: n}, nil
}

// defaultOutbox writes to DefaultTable; it is immutable, so sharing it is safe.
var defaultOutbox = func() *Outbox {
	o, err := New(Options{})
	if err != nil {
		panic(err) // DefaultTable is a constant that parses
	}
	return o
}()

// Enqueue writes msgs to the default outbox table in tx. They are published if and only if tx
// commits.
func Enqueue(ctx context.Context, tx pgx.Tx, msgs ...Message) error {
	return defaultOutbox.Enqueue(ctx, tx, msgs...)
}

// EnqueueSQL is Enqueue for a database/sql transaction (any PostgreSQL driver).
func EnqueueSQL(ctx context.Context, tx *sql.Tx, msgs ...Message) error {
	return defaultOutbox.EnqueueSQL(ctx, tx, msgs...)
}

// Enqueue writes msgs in tx. Messages without an ID get a new UUIDv7; W3C trace context from
// ctx is added to their headers unless they carry a traceparent already.
func (o *Outbox) Enqueue(ctx context.Context, tx pgx.Tx, msgs ...Message) error {
	return o.enqueue(ctx, msgs, func(query string, args []any) error {
		_, err := tx.Exec(ctx, query, args...)
		return err
	})
}

// EnqueueSQL is Enqueue for a database/sql transaction.
func (o *Outbox) EnqueueSQL(ctx context.Context, tx *sql.Tx, msgs ...Message) error {
	return o.enqueue(ctx, msgs, func(query string, args []any) error {
		_, err := tx.ExecContext(ctx, query, args...)
		return err
	})
}

// rowsPerInsert keeps a statement's parameters (5 per row) well under PostgreSQL's 65535.
const rowsPerInsert = 1000

func (o *Outbox) enqueue(ctx context.Context, msgs []Message, exec func(string, []any) error) error {
	if len(msgs) == 0 {
		return nil
	}
	trace := traceHeaders(ctx)
	for start := 0; start < len(msgs); start += rowsPerInsert {
		chunk := msgs[start:min(start+rowsPerInsert, len(msgs))]
		args := make([]any, 0, 5*len(chunk))
		for i := range chunk {
			m := &chunk[i]
			if err := validate(m); err != nil {
				return err
			}
			id := m.ID
			if id == uuid.Nil {
				id = NewID()
			}
			hs := m.Headers
			if len(trace) > 0 && !hasHeader(hs, HeaderTraceparent) {
				hs = append(append(make([]Header, 0, len(hs)+len(trace)), hs...), trace...)
			}
			args = append(args, id, m.Topic, m.Key, m.Value, encodeHeaders(hs))
		}
		if err := exec(o.insertSQL(len(chunk)), args); err != nil {
			return fmt.Errorf("outbox enqueue into %s: %w", o.names.source, err)
		}
	}
	return nil
}

func (o *Outbox) insertSQL(rows int) string {
	var b strings.Builder
	b.WriteString("INSERT INTO ")
	b.WriteString(o.names.table)
	b.WriteString(" (msg_id, topic, key, value, headers) VALUES ")
	for r := range rows {
		if r > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		for c := range 5 {
			if c > 0 {
				b.WriteByte(',')
			}
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(r*5 + c + 1))
		}
		b.WriteByte(')')
	}
	return b.String()
}

func hasHeader(hs []Header, key string) bool {
	for _, h := range hs {
		if h.Key == key {
			return true
		}
	}
	return false
}
