// Package ctl is treatyctl: a command line for operators over the coordinator's admin REST API
// (/admin/v1). cmd/treatyctl is a thin main around Main.
//
// Commands are rows of one table (commands); a new command group is a new row with its run
// function, nothing else to wire.
package ctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"time"
)

// Exit codes: what failed, for scripts.
const (
	ExitOK          = 0
	ExitError       = 1 // anything else: the coordinator answered 5xx, an unexpected answer
	ExitUsage       = 2 // bad command line, or the coordinator refused the input (HTTP 400)
	ExitNotFound    = 3 // no such transaction or workflow (HTTP 404)
	ExitAuth        = 4 // no or wrong token, or a viewer token for an action (HTTP 401, 403)
	ExitConflict    = 5 // the action does not fit the transaction's state (HTTP 409)
	ExitUnavailable = 6 // the coordinator could not be reached, is stopping or timed out
)

// DefaultAddr is the admin API of a coordinator on this machine (`coordinator dev` and serve's
// default HTTP port).
const DefaultAddr = "http://127.0.0.1:7601"

// Env is what Main needs from the process.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
	// HTTPClient defaults to a client with a 30 s timeout per request.
	HTTPClient *http.Client
}

// command is one row of the command table: words such as "tx list", a one-line summary for the
// help, and the function that runs it with what follows the words.
type command struct {
	words   string
	args    string
	summary string
	run     func(ctx context.Context, c *cli, args []string) error
}

func commands() []command {
	return []command{
		{"tx list", "[filters]", "list transactions, newest first (filters as in the admin API)", txList},
		{"tx show", "GID", "one transaction with its branches and history", txShow},
		{"tx watch", "GID", "follow a transaction's history until it ends", txWatch},
		{"tx retry", "GID --reason TEXT", "retry now what is waiting for its next attempt", txAction("retry")},
		{"tx rollback", "GID --reason TEXT", "turn the transaction back: compensate / cancel / roll back", txAction("rollback")},
		{"tx resume", "GID --reason TEXT", "resume a transaction waiting for an operator", txAction("resume")},
		{"tx pause", "GID --reason TEXT", "stop driving the transaction until unpause", txAction("pause")},
		{"tx unpause", "GID --reason TEXT", "drive a paused transaction again", txAction("unpause")},
		{"tx resolve", "GID --branch B --op OP --reason TEXT", "record the outcome of one branch an operator settled by hand", txAction("resolve")},
		{"workflows list", "", "every version of every registered workflow", workflowsList},
		{"workflows show", "NAME", "the versions of one workflow with their definitions", workflowsShow},
		{"stats", "", "counts by mode and status, what is due and overdue", stats},
		{"faults list", "[--all]", "live fault-injection rules (--all: also deleted and expired ones, with who made and ended them)", faultsList},
		{"faults create", "--effect E --reason TEXT --expires-in D [match flags]", "inject faults into participant calls (game days; needs --allow-fault-injection on the coordinators)", faultsCreate},
		{"faults delete", "ID", "end a fault rule now", faultsDelete},
	}
}

// cli is the state one invocation shares: where to talk to and how to print.
type cli struct {
	env    Env
	addr   string
	output string // table or json
	token  string
	fs     *flag.FlagSet
}

// usageError is a mistake on the command line.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return &usageError{fmt.Sprintf(format, a...)} }

// Main runs treatyctl with args (without the program name) and returns the exit code.
func Main(ctx context.Context, args []string, env Env) int {
	if env.Getenv == nil {
		env.Getenv = os.Getenv
	}
	if env.HTTPClient == nil {
		env.HTTPClient = &http.Client{Timeout: 30 * time.Second}
	}
	// Flags before the command words (treatyctl --addr URL tx list) move after them.
	var global []string
	for len(args) > 0 && strings.HasPrefix(args[0], "-") && !hasHelp(args[:1]) {
		global, args = append(global, args[0]), args[1:]
		if name := strings.TrimLeft(global[len(global)-1], "-"); (name == "addr" || name == "o") && len(args) > 0 {
			global, args = append(global, args[0]), args[1:]
		}
	}
	var words []string
	for len(args) > 0 && !strings.HasPrefix(args[0], "-") && len(words) < 2 {
		words, args = append(words, args[0]), args[1:]
	}
	var cmd *command
	cmds := commands()
	for i := range cmds {
		w := strings.Fields(cmds[i].words)
		if len(words) >= len(w) && strings.Join(words[:len(w)], " ") == cmds[i].words {
			cmd = &cmds[i]
			args = append(append(words[len(w):], args...), global...)
			break
		}
	}
	if cmd == nil {
		if len(words) == 0 || words[0] == "help" || hasHelp(args) {
			usage(env.Stdout)
			return ExitOK
		}
		fmt.Fprintf(env.Stderr, "treatyctl: unknown command %q\n\n", strings.Join(words, " "))
		usage(env.Stderr)
		return ExitUsage
	}
	c := &cli{env: env, token: env.Getenv("TREATY_TOKEN"), fs: flag.NewFlagSet("treatyctl "+cmd.words, flag.ContinueOnError)}
	addr := env.Getenv("TREATY_ADMIN_ADDR")
	if addr == "" {
		addr = DefaultAddr
	}
	c.fs.StringVar(&c.addr, "addr", addr, "admin API base URL [TREATY_ADMIN_ADDR]")
	c.fs.StringVar(&c.output, "o", "table", "output: table (for people) or json (for scripts)")
	c.fs.SetOutput(env.Stderr)
	c.fs.Usage = func() {
		fmt.Fprintf(c.fs.Output(), "usage: treatyctl %s %s\n  %s\n\nflags:\n", cmd.words, cmd.args, cmd.summary)
		c.fs.PrintDefaults()
	}
	err := cmd.run(ctx, c, args)
	if errors.Is(err, flag.ErrHelp) {
		return ExitOK
	}
	if err != nil {
		fmt.Fprintf(env.Stderr, "treatyctl %s: %v\n", cmd.words, err)
		return exitCode(err)
	}
	return ExitOK
}

func hasHelp(args []string) bool {
	for _, a := range args {
		if a == "-h" || a == "--help" || a == "-help" {
			return true
		}
	}
	return false
}

func usage(w io.Writer) {
	fmt.Fprint(w, `treatyctl: look at and act on Treaty transactions through the coordinator's admin API.

usage: treatyctl COMMAND [ARGS] [--addr URL] [-o table|json]

commands:
`)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-56s %s\n", c.words+" "+c.args, c.summary)
	}
	fmt.Fprintf(w, `
--addr is the admin API (default %s, or TREATY_ADMIN_ADDR); the bearer token comes from
TREATY_TOKEN (a viewer token reads, an operator token acts; `+"`coordinator dev`"+` on loopback needs none).
-o json prints the admin API's JSON, for scripts.

exit codes: 0 ok, 1 other error, 2 usage or refused input (HTTP 400), 3 not found (404),
4 no or wrong token (401/403), 5 not allowed in the transaction's state (409),
6 coordinator unreachable or unavailable (connection refused, 503, 504).
`, DefaultAddr)
}

// parse parses flags and positional arguments in any order, and checks the count of
// positionals.
func (c *cli) parse(args []string, positional ...string) ([]string, error) {
	var pos []string
	for len(args) > 0 {
		if err := c.fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, &usageError{err.Error()}
		}
		args = c.fs.Args()
		if len(args) > 0 {
			pos, args = append(pos, args[0]), args[1:]
		}
	}
	if c.output != "table" && c.output != "json" {
		return nil, usagef("-o %q: want table or json", c.output)
	}
	if len(pos) != len(positional) {
		if len(positional) == 0 {
			return nil, usagef("unexpected argument %q", pos[0])
		}
		return nil, usagef("want %s, got %d argument(s)", strings.Join(positional, " "), len(pos))
	}
	return pos, nil
}

// sortedKeys returns m's keys in order, for stable output.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
