package ctl

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/treatyhq/treaty/internal/admin"
)

// faultsList: GET /admin/v1/faults.
func faultsList(ctx context.Context, c *cli, args []string) error {
	all := c.fs.Bool("all", false, "also deleted and expired rules (the audit trail)")
	if _, err := c.parse(args); err != nil {
		return err
	}
	q := url.Values{}
	if *all {
		q.Set("all", "true")
	}
	var list admin.FaultList
	table, err := c.get(ctx, "/admin/v1/faults", q, &list)
	if err != nil || !table {
		return err
	}
	if !list.Enabled {
		fmt.Fprintln(c.env.Stdout, "fault injection is off on this coordinator (start it with --allow-fault-injection to allow rules)")
	}
	w := c.table()
	fmt.Fprintln(w, "ID\tEFFECT\tMATCHES\tPROBABILITY\tFIRED\tEXPIRES\tBY\tREASON")
	for _, f := range list.Faults {
		by := f.CreatedBy
		if f.DeletedAt != nil {
			by += ", deleted by " + orDash(f.DeletedBy)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%g\t%s\t%s\t%s\t%s\n", f.ID, faultEffect(f), faultMatch(f), f.Probability,
			faultFired(f), when(&f.ExpiresAt), orDash(by), clip(f.Reason, 60))
	}
	return w.Flush()
}

func faultEffect(f admin.Fault) string {
	switch {
	case f.Delay != "":
		return f.Effect + " " + f.Delay
	case f.Code != "":
		return f.Effect + " " + f.Code
	}
	return f.Effect
}

func faultMatch(f admin.Fault) string {
	var m []string
	for _, kv := range [][2]string{{"target", f.Target}, {"op", f.Op}, {"gid", f.GIDPrefix}, {"workflow", f.Workflow}} {
		if kv[1] != "" {
			m = append(m, kv[0]+"="+kv[1])
		}
	}
	if len(m) == 0 {
		return "every call"
	}
	return strings.Join(m, " ")
}

func faultFired(f admin.Fault) string {
	if f.MaxCount > 0 {
		return fmt.Sprintf("%d/%d", f.Fired, f.MaxCount)
	}
	return strconv.FormatInt(f.Fired, 10)
}

// faultsCreate: POST /admin/v1/faults. The coordinator validates the rule and names the field
// that is wrong; treatyctl only insists on what the API requires, so the message comes early.
func faultsCreate(ctx context.Context, c *cli, args []string) error {
	var req admin.FaultRequest
	c.fs.StringVar(&req.Target, "target", "", "calls whose target matches this pattern (* is any run of characters), e.g. '*/ledger.v1.Ledger/*'")
	c.fs.StringVar(&req.Op, "op", "", "only this operation: action, compensate, try, confirm, cancel, prepare, commit, rollback")
	c.fs.StringVar(&req.GIDPrefix, "gid-prefix", "", "only transactions whose gid starts with this")
	c.fs.StringVar(&req.Workflow, "workflow", "", "only transactions of this registered workflow")
	c.fs.StringVar(&req.Effect, "effect", "", "what happens: delay, status, lost_response or drop (required)")
	c.fs.StringVar(&req.Delay, "delay", "", "with --effect delay: how long, e.g. 2s")
	c.fs.StringVar(&req.Code, "code", "", "with --effect status: the gRPC code answered, e.g. UNAVAILABLE or ABORTED")
	c.fs.StringVar(&req.Message, "message", "", "with --effect status: the status message")
	c.fs.Float64Var(&req.Probability, "probability", 0, "share of matching calls affected, 0..1 (0: the API's default, every call)")
	c.fs.IntVar(&req.MaxCount, "max-count", 0, "fire at most this often across all replicas (0: no bound)")
	c.fs.StringVar(&req.Reason, "reason", "", "why (required; kept with the rule)")
	c.fs.StringVar(&req.ExpiresIn, "expires-in", "", "when the rule ends by itself, e.g. 30m (required)")
	if _, err := c.parse(args); err != nil {
		return err
	}
	switch {
	case req.Effect == "":
		return usagef("--effect is required: delay, status, lost_response or drop")
	case strings.TrimSpace(req.Reason) == "":
		return usagef("--reason is required: say why, it is kept with the rule")
	case req.ExpiresIn == "":
		return usagef("--expires-in is required: a fault rule must end by itself (e.g. 30m)")
	}
	var raw json.RawMessage
	if err := c.do(ctx, http.MethodPost, "/admin/v1/faults", nil, req, &raw); err != nil {
		return err
	}
	return c.printFault(raw, "created")
}

// faultsDelete: DELETE /admin/v1/faults/{id}.
func faultsDelete(ctx context.Context, c *cli, args []string) error {
	pos, err := c.parse(args, "ID")
	if err != nil {
		return err
	}
	var raw json.RawMessage
	if err := c.do(ctx, http.MethodDelete, "/admin/v1/faults/"+url.PathEscape(pos[0]), nil, nil, &raw); err != nil {
		return err
	}
	return c.printFault(raw, "deleted")
}

func (c *cli) printFault(raw json.RawMessage, verb string) error {
	if c.output == "json" {
		return c.printJSON(raw)
	}
	var f admin.Fault
	if err := json.Unmarshal(raw, &f); err != nil {
		return fmt.Errorf("unexpected answer: %w", err)
	}
	fmt.Fprintf(c.env.Stdout, "fault rule %s %s: %s on %s, fired %s, expires %s\n", f.ID, verb, faultEffect(f), faultMatch(f),
		faultFired(f), when(&f.ExpiresAt))
	return nil
}
