package sdk

import (
	"context"
	"fmt"
	"time"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// Delivery is one call a transactional message makes once its local transaction committed.
type Delivery struct {
	Name        string
	Call        Call
	Retry       *Retry
	CallTimeout time.Duration
}

// Message is a transactional message: deliveries that happen if and only if the application's
// local transaction commits.
type Message struct {
	GID        string
	Deliveries []Delivery
	// QueryPrepared is the application's endpoint the coordinator asks when the message was
	// prepared but never submitted (see participant.QueryPrepared).
	QueryPrepared Call
	// Timeout is how long the coordinator waits for the submit before asking (default 30s).
	Timeout time.Duration
	// Wait is how long to wait for the deliveries (default: do not wait).
	Wait time.Duration
}

// Message prepares the message at the coordinator, runs local (the application's local
// transaction, which must record the message's barrier row: see participant.Barrier with
// participant.ModeMsg), and submits the message when local returns nil. When local fails, the
// message is never delivered: the coordinator's query finds no committed local transaction.
func (c *Client) Message(ctx context.Context, m Message, local func(ctx context.Context, gid string) error) (*Transaction, error) {
	if m.GID == "" {
		m.GID = NewGID()
	}
	req := &treatyv1.PrepareMsgRequest{Gid: m.GID, QueryPrepared: m.QueryPrepared.proto(), Timeout: durationOrNil(m.Timeout)}
	for _, d := range m.Deliveries {
		req.Deliveries = append(req.Deliveries, &treatyv1.MsgDelivery{
			Name: d.Name, Call: d.Call.proto(), Retry: d.Retry.proto(), CallTimeout: durationOrNil(d.CallTimeout),
		})
	}
	if _, err := rpc(ctx, c, "PrepareMsg", 0, func(ctx context.Context) (*treatyv1.PrepareMsgResponse, error) {
		return c.api.PrepareMsg(ctx, req)
	}); err != nil {
		return nil, err
	}
	if err := local(ctx, m.GID); err != nil {
		return nil, fmt.Errorf("message %q not sent: local transaction failed: %w", m.GID, err)
	}
	wait := time.Duration(0)
	if m.Wait > 0 {
		wait = m.Wait
	}
	res, err := rpc(ctx, c, "SubmitMsg", wait, func(ctx context.Context) (*treatyv1.SubmitMsgResponse, error) {
		return c.api.SubmitMsg(ctx, &treatyv1.SubmitMsgRequest{Gid: m.GID, Wait: durationOrNil(wait)})
	})
	if err != nil {
		return nil, err
	}
	return outcome(newTransaction(res.Transaction), wait)
}
