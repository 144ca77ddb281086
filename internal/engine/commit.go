package engine

import (
	"context"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

// recordReq is one fenced write, or one creation, waiting for a group commit.
type recordReq struct {
	p      store.RecordParams
	create *store.CreateParams // set: this is a creation, p is unused
	sent   time.Time           // local clock when queued: the lease is measured from here
	done   chan recordResp
}

type recordResp struct {
	res     store.RecordResult
	created store.CreateResult
	err     error
}

// create queues a new transaction for the next group commit and waits for it: a creation
// shares its commit with other creations and with the drivers' writes, and is durable before
// create returns, so before any participant is called.
func (e *Engine) create(ctx context.Context, p store.CreateParams) (store.CreateResult, error) {
	if e.commitCtx == nil { // not started: no group commit to join
		return e.cfg.Store.CreateTransaction(ctx, p)
	}
	req := &recordReq{create: &p, sent: time.Now(), done: make(chan recordResp, 1)}
	select {
	case e.commits <- req:
	case <-ctx.Done():
		return store.CreateResult{}, ctx.Err()
	case <-e.commitCtx.Done():
		return store.CreateResult{}, ErrStopping
	}
	select {
	case r := <-req.done:
		return r.created, r.err
	case <-ctx.Done():
		// The creation may still land, leased to this replica: recovery drives it once the
		// lease ends, as after a crash.
		return store.CreateResult{}, ctx.Err()
	}
}

// record queues a write and waits for its group commit. Writes of many transactions share one
// database commit: the commit count per transaction is the throughput ceiling.
func (e *Engine) record(ctx context.Context, p store.RecordParams) (store.RecordResult, time.Time, error) {
	req := &recordReq{p: p, sent: time.Now(), done: make(chan recordResp, 1)}
	select {
	case e.commits <- req:
	case <-ctx.Done():
		return store.RecordResult{}, req.sent, ctx.Err()
	}
	select {
	case r := <-req.done:
		return r.res, req.sent, r.err
	case <-ctx.Done():
		// The write may still land; the fence keeps that safe.
		return store.RecordResult{}, req.sent, ctx.Err()
	}
}

func (e *Engine) commitLoop(ctx context.Context) {
	batch := make([]*recordReq, 0, e.cfg.CommitBatch)
	for {
		// Drop the last batch's requests, not only its length: the backing array would keep
		// them (their creations carry whole specs, payloads included) alive until overwritten.
		clear(batch)
		batch = batch[:0]
		select {
		case <-ctx.Done():
			return
		case r := <-e.commits:
			batch = append(batch, r)
		}
	drain:
		for len(batch) < e.cfg.CommitBatch {
			select {
			case r := <-e.commits:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		e.cfg.Observer.GroupCommit(len(batch))
		if err := e.commitBatch(ctx, batch); err != nil && len(batch) > 1 && ctx.Err() == nil {
			// The batch is one transaction: one bad write fails them all. Write them one by
			// one so that only the bad one fails (and its driver retries or gives up alone).
			for _, r := range batch {
				if err := e.commitBatch(ctx, []*recordReq{r}); err != nil {
					r.done <- recordResp{err: err}
				}
			}
			continue
		} else if err != nil {
			for _, r := range batch {
				r.done <- recordResp{err: err}
			}
		}
	}
}

// commitBatch writes a batch in one commit and answers each request, unless it fails: then it
// answers none and returns the error.
func (e *Engine) commitBatch(ctx context.Context, batch []*recordReq) error {
	// One gid may appear twice only if a driver queued twice, which it never does while
	// waiting; keep the order anyway.
	var cs []store.CreateParams
	var ps []store.RecordParams
	for _, r := range batch {
		if r.create != nil {
			cs = append(cs, *r.create)
		} else {
			ps = append(ps, r.p)
		}
	}
	created, recorded, err := e.cfg.Store.Commit(ctx, cs, ps)
	if err != nil {
		return err
	}
	ci, ri := 0, 0
	for _, r := range batch {
		if r.create != nil {
			r.done <- recordResp{created: created[ci]}
			ci++
		} else {
			r.done <- recordResp{res: recorded[ri]}
			ri++
		}
	}
	return nil
}
