package engine

import (
	"context"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

// recordReq is one fenced write waiting for a group commit.
type recordReq struct {
	p    store.RecordParams
	sent time.Time // local clock when queued: the lease is measured from here
	done chan recordResp
}

type recordResp struct {
	res store.RecordResult
	err error
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
	params := make([]store.RecordParams, 0, e.cfg.CommitBatch)
	for {
		batch, params = batch[:0], params[:0]
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
		// One gid may appear twice only if a driver queued twice, which it never does while
		// waiting; keep the order anyway.
		for _, r := range batch {
			params = append(params, r.p)
		}
		e.cfg.Observer.GroupCommit(len(params))
		res, err := e.cfg.Store.Record(ctx, params)
		if err != nil && len(batch) > 1 && ctx.Err() == nil {
			// The batch is one transaction: one bad write fails them all. Write them one by
			// one so that only the bad one fails (and its driver retries or gives up alone).
			for _, r := range batch {
				one, err := e.cfg.Store.Record(ctx, []store.RecordParams{r.p})
				if err != nil {
					r.done <- recordResp{err: err}
					continue
				}
				r.done <- recordResp{res: one[0]}
			}
			continue
		}
		for i, r := range batch {
			if err != nil {
				r.done <- recordResp{err: err}
				continue
			}
			r.done <- recordResp{res: res[i]}
		}
	}
}
