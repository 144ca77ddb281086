package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/treatyhq/treaty/internal/admin"
)

func (c *cli) table() *tabwriter.Writer { return tabwriter.NewWriter(c.env.Stdout, 0, 4, 2, ' ', 0) }

func when(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// clip keeps table cells on one line and short.
func clip(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n-1] + "…"
	}
	return s
}

// txList: GET /admin/v1/transactions with the API's filters as flags.
func txList(ctx context.Context, c *cli, args []string) error {
	q := url.Values{}
	params := []struct{ flag, param, usage string }{
		{"status", "status", "mode statuses, comma-separated (running, needs_operator, compensated, confirmed, ...)"},
		{"mode", "mode", "modes, comma-separated: saga, tcc, 2pc, msg"},
		{"workflow", "workflow", "registered workflow name"},
		{"gid-prefix", "gid_prefix", "gids starting with this"},
		{"created-after", "created_after", "RFC 3339 time"},
		{"created-before", "created_before", "RFC 3339 time"},
		{"updated-after", "updated_after", "RFC 3339 time"},
		{"updated-before", "updated_before", "RFC 3339 time"},
		{"limit", "limit", "page size (the API's default when empty)"},
		{"cursor", "cursor", "next page, as printed after the previous one"},
	}
	vals := make([]string, len(params))
	for i, p := range params {
		c.fs.StringVar(&vals[i], p.flag, "", p.usage)
	}
	if _, err := c.parse(args); err != nil {
		return err
	}
	for i, p := range params {
		if vals[i] != "" {
			q.Set(p.param, vals[i])
		}
	}
	var list admin.TransactionList
	table, err := c.get(ctx, "/admin/v1/transactions", q, &list)
	if err != nil || !table {
		return err
	}
	w := c.table()
	fmt.Fprintln(w, "GID\tMODE\tSTATUS\tSTATE\tWORKFLOW\tUPDATED\tREASON")
	for _, t := range list.Transactions {
		status := t.Status
		if t.Paused {
			status += " (paused)"
		}
		wf := "-"
		if t.WorkflowName != "" {
			wf = t.WorkflowName + " v" + strconv.Itoa(t.WorkflowVersion)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.GID, t.Mode, status, t.State, wf, when(t.UpdatedAt), orDash(clip(t.Reason, 60)))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if list.NextCursor != "" {
		fmt.Fprintf(c.env.Stdout, "more: --cursor %s\n", list.NextCursor)
	}
	return nil
}

// txShow: GET /admin/v1/transactions/{gid}.
func txShow(ctx context.Context, c *cli, args []string) error {
	pos, err := c.parse(args, "GID")
	if err != nil {
		return err
	}
	var t admin.Transaction
	table, err := c.get(ctx, "/admin/v1/transactions/"+url.PathEscape(pos[0]), nil, &t)
	if err != nil || !table {
		return err
	}
	return c.printTransaction(t)
}

func (c *cli) printTransaction(t admin.Transaction) error {
	w := c.table()
	fmt.Fprintf(w, "gid\t%s\n", t.GID)
	fmt.Fprintf(w, "mode\t%s\n", t.Mode)
	fmt.Fprintf(w, "status\t%s (%s)\n", t.Status, t.State)
	if t.Paused {
		fmt.Fprintf(w, "paused\tyes\n")
	}
	if t.Reason != "" {
		fmt.Fprintf(w, "reason\t%s\n", clip(t.Reason, 200))
	}
	if t.WorkflowName != "" {
		fmt.Fprintf(w, "workflow\t%s v%d\n", t.WorkflowName, t.WorkflowVersion)
	}
	fmt.Fprintf(w, "created\t%s\n", when(t.CreatedAt))
	fmt.Fprintf(w, "updated\t%s\n", when(t.UpdatedAt))
	if t.Deadline != nil {
		fmt.Fprintf(w, "deadline\t%s\n", when(t.Deadline))
	}
	if t.NextAttemptAt != nil {
		fmt.Fprintf(w, "next attempt\t%s\n", when(t.NextAttemptAt))
	}
	if t.LeaseOwner != "" {
		fmt.Fprintf(w, "lease\t%s until %s\n", t.LeaseOwner, when(t.LeaseExpiresAt))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if len(t.Branches) > 0 {
		fmt.Fprintln(c.env.Stdout, "\nbranches:")
		w = c.table()
		fmt.Fprintln(w, "  BRANCH\tOP\tSTATUS\tATTEMPTS\tUPDATED\tLAST ERROR")
		for _, b := range t.Branches {
			fmt.Fprintf(w, "  %s\t%s\t%s\t%d\t%s\t%s\n", b.Name, b.Op, b.Status, b.Attempts, when(b.UpdatedAt), orDash(clip(b.LastError, 80)))
		}
		if err := w.Flush(); err != nil {
			return err
		}
	}
	if len(t.Events) > 0 {
		fmt.Fprintln(c.env.Stdout, "\nhistory:")
		w = c.table()
		for _, e := range t.Events {
			c.printEvent(w, e)
		}
		return w.Flush()
	}
	return nil
}

func (c *cli) printEvent(w *tabwriter.Writer, e admin.Event) {
	what := e.Kind
	if e.Branch != "" {
		what += " " + e.Op + ":" + e.Branch
	}
	fmt.Fprintf(w, "  %s\t%s\t%s\n", when(e.At), what, clip(e.Detail, 120))
}

// ended reports whether nothing more happens to t without an operator.
func ended(t admin.Transaction) bool {
	switch t.State {
	case "succeeded", "compensated", "needs_operator":
		return true
	}
	return false
}

// txWatch polls the transaction and prints each new history entry until it ends.
func txWatch(ctx context.Context, c *cli, args []string) error {
	interval := c.fs.Duration("interval", time.Second, "how often to poll")
	pos, err := c.parse(args, "GID")
	if err != nil {
		return err
	}
	if *interval <= 0 {
		return usagef("--interval %s: want a positive duration", *interval)
	}
	seen := map[int64]bool{}
	for {
		var t admin.Transaction
		if err := c.do(ctx, http.MethodGet, "/admin/v1/transactions/"+url.PathEscape(pos[0]), nil, nil, &t); err != nil {
			return err
		}
		w := c.table()
		for _, e := range t.Events {
			if seen[e.ID] {
				continue
			}
			seen[e.ID] = true
			if c.output == "json" {
				b, _ := json.Marshal(e)
				fmt.Fprintf(c.env.Stdout, "%s\n", b)
			} else {
				c.printEvent(w, e)
			}
		}
		if err := w.Flush(); err != nil {
			return err
		}
		if ended(t) {
			if c.output != "json" {
				fmt.Fprintf(c.env.Stdout, "%s: %s (%s)\n", t.GID, t.State, t.Status)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(*interval):
		}
	}
}

// txAction posts an operator action.
func txAction(action string) func(ctx context.Context, c *cli, args []string) error {
	return func(ctx context.Context, c *cli, args []string) error {
		var req admin.ActionRequest
		c.fs.StringVar(&req.Reason, "reason", "", "why (required; recorded in the history with who did it)")
		if action == "resolve" {
			c.fs.StringVar(&req.Branch, "branch", "", "the branch to resolve")
			c.fs.StringVar(&req.Op, "op", "", "the branch's operation to resolve")
		}
		pos, err := c.parse(args, "GID")
		if err != nil {
			return err
		}
		if strings.TrimSpace(req.Reason) == "" {
			return usagef("--reason is required: say why, it goes into the transaction's history")
		}
		var raw json.RawMessage
		err = c.do(ctx, http.MethodPost, "/admin/v1/transactions/"+url.PathEscape(pos[0])+"/"+action, nil, req, &raw)
		var queued *queuedNotice
		if errors.As(err, &queued) {
			if c.output == "json" {
				b, _ := json.Marshal(map[string]string{"gid": pos[0], "action": action, "result": "queued", "message": queued.Message})
				return c.printJSON(b)
			}
			fmt.Fprintf(c.env.Stdout, "%s %s: queued; the replica driving it applies it on its next pass (%s)\n", action, pos[0], queued.Message)
			return nil
		}
		if err != nil {
			return err
		}
		if c.output == "json" {
			return c.printJSON(raw)
		}
		var t admin.Transaction
		if err := json.Unmarshal(raw, &t); err != nil {
			return fmt.Errorf("unexpected answer: %w", err)
		}
		paused := ""
		if t.Paused {
			paused = ", paused"
		}
		fmt.Fprintf(c.env.Stdout, "%s %s: now %s (%s%s)\n", action, t.GID, t.Status, t.State, paused)
		return nil
	}
}

func workflowsList(ctx context.Context, c *cli, args []string) error {
	if _, err := c.parse(args); err != nil {
		return err
	}
	var list admin.WorkflowList
	table, err := c.get(ctx, "/admin/v1/workflows", nil, &list)
	if err != nil || !table {
		return err
	}
	w := c.table()
	fmt.Fprintln(w, "NAME\tVERSION\tCREATED")
	for _, wf := range list.Workflows {
		fmt.Fprintf(w, "%s\t%d\t%s\n", wf.Name, wf.Version, when(wf.CreatedAt))
	}
	return w.Flush()
}

func workflowsShow(ctx context.Context, c *cli, args []string) error {
	pos, err := c.parse(args, "NAME")
	if err != nil {
		return err
	}
	var list admin.WorkflowList
	table, err := c.get(ctx, "/admin/v1/workflows/"+url.PathEscape(pos[0]), nil, &list)
	if err != nil || !table {
		return err
	}
	for i, wf := range list.Workflows {
		if i > 0 {
			fmt.Fprintln(c.env.Stdout)
		}
		fmt.Fprintf(c.env.Stdout, "%s version %d (created %s)\n", wf.Name, wf.Version, when(wf.CreatedAt))
		var def any
		if err := json.Unmarshal(wf.Definition, &def); err == nil {
			b, _ := json.MarshalIndent(def, "  ", "  ")
			fmt.Fprintf(c.env.Stdout, "  %s\n", b)
		}
	}
	return nil
}

func stats(ctx context.Context, c *cli, args []string) error {
	if _, err := c.parse(args); err != nil {
		return err
	}
	var s admin.Stats
	table, err := c.get(ctx, "/admin/v1/stats", nil, &s)
	if err != nil || !table {
		return err
	}
	// The admin API counts unfinished transactions exactly by status; finished ones are one
	// total (an estimate on PostgreSQL, so a scrape never reads the whole table).
	w := c.table()
	fmt.Fprintln(w, "MODE\tSTATUS\tUNFINISHED")
	for _, sc := range s.Counts {
		fmt.Fprintf(w, "%s\t%s\t%d\n", sc.Mode, sc.Status, sc.Count)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	w = c.table()
	fmt.Fprintf(w, "\ntotal\t%d\n", s.Total)
	fmt.Fprintf(w, "finished (kept)\t%d\n", s.Finished)
	for _, m := range sortedKeys(s.ByMode) {
		fmt.Fprintf(w, "  %s\t%d\n", m, s.ByMode[m])
	}
	fmt.Fprintf(w, "needs operator\t%d\n", s.NeedsOperator)
	fmt.Fprintf(w, "due\t%d (overdue %d, oldest waiting %.1fs)\n", s.Due, s.Overdue, s.OldestDueSeconds)
	if s.OldestRunningCreatedAt != nil {
		fmt.Fprintf(w, "oldest running since\t%s\n", when(s.OldestRunningCreatedAt))
	}
	return w.Flush()
}
