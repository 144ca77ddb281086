package engine

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"time"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/store"
)

// Admin listing limits.
const (
	DefaultListLimit = 50
	MaxListLimit     = 500
)

// ListFilter selects transactions for operators. Zero fields do not filter.
type ListFilter struct {
	Statuses      []string // the modes' own words (running, compensating, confirmed, ...)
	Modes         []string // saga, tcc, 2pc, msg
	Workflow      string
	GIDPrefix     string
	CreatedAfter  time.Time
	CreatedBefore time.Time
	UpdatedAfter  time.Time
	UpdatedBefore time.Time
	Cursor        string // from a previous page
	Limit         int    // default 50, at most 500
}

// List returns one page of transactions (without branches and events), newest first, and the
// cursor of the next page ("" when this is the last).
func (e *Engine) List(ctx context.Context, f ListFilter) ([]*treatyv1.Transaction, string, error) {
	if f.Limit == 0 {
		f.Limit = DefaultListLimit
	}
	if f.Limit < 0 || f.Limit > MaxListLimit {
		return nil, "", invalid("limit", "is %d, must be within 1..%d", f.Limit, MaxListLimit)
	}
	for _, m := range f.Modes {
		if _, ok := modeToProto[m]; !ok {
			return nil, "", invalid("mode", "%q is not one of saga, tcc, 2pc, msg", m)
		}
	}
	for _, s := range f.Statuses {
		if _, ok := statusToProto[s]; !ok {
			return nil, "", invalid("status", "%q is not a known status", s)
		}
	}
	sf := store.ListFilter{
		Statuses: f.Statuses, Modes: f.Modes, Workflow: f.Workflow, GIDPrefix: f.GIDPrefix,
		CreatedAfter: f.CreatedAfter, CreatedBefore: f.CreatedBefore,
		UpdatedAfter: f.UpdatedAfter, UpdatedBefore: f.UpdatedBefore,
		Limit: f.Limit + 1, // one more tells whether another page exists
	}
	if f.Cursor != "" {
		at, gid, err := decodeCursor(f.Cursor)
		if err != nil {
			return nil, "", err
		}
		sf.AfterCreated, sf.AfterGID = at, gid
	}
	txs, err := e.cfg.Store.ListTransactions(ctx, sf)
	if err != nil {
		return nil, "", err
	}
	next := ""
	if len(txs) > f.Limit {
		txs = txs[:f.Limit]
		last := txs[len(txs)-1]
		next = encodeCursor(last.CreatedAt, last.GID)
	}
	out := make([]*treatyv1.Transaction, len(txs))
	for i, t := range txs {
		out[i] = toProto(t, nil, nil)
	}
	return out, next, nil
}

func encodeCursor(at time.Time, gid string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(fmt.Sprintf("%d|%s", at.UnixMicro(), gid)))
}

func decodeCursor(c string) (time.Time, string, error) {
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil {
		return time.Time{}, "", invalid("cursor", "is not a cursor this API returned")
	}
	us, gid, ok := strings.Cut(string(b), "|")
	var micros int64
	if _, err := fmt.Sscan(us, &micros); !ok || err != nil {
		return time.Time{}, "", invalid("cursor", "is not a cursor this API returned")
	}
	return time.UnixMicro(micros).UTC(), gid, nil
}

// Stats summarises every transaction for operators.
func (e *Engine) Stats(ctx context.Context) (store.Stats, error) { return e.cfg.Store.Stats(ctx) }
