package admin

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/faults"
)

// Prefix is where the REST API lives; UIPrefix is the dashboard's.
const (
	Prefix   = "/admin/v1/"
	UIPrefix = "/ui/"
)

// Bounds on what one request may cost.
const (
	// MaxBodyBytes bounds an action's JSON body (a reason is at most engine.MaxReasonBytes).
	MaxBodyBytes = 64 << 10
	// readTimeout bounds a read; the list and statistics are single indexed queries.
	readTimeout = 15 * time.Second
	// actionTimeout bounds an action. It does not follow the client's connection: a browser
	// closed mid-action must not leave the operator guessing whether it happened.
	actionTimeout = 30 * time.Second
)

//go:embed openapi.json
var openapiJSON []byte

//go:embed ui
var uiFiles embed.FS

// Config configures the admin API and dashboard.
type Config struct {
	// Engine answers every request; required.
	Engine *engine.Engine
	// Tokens may call the API. With none and Open false, every request is refused (401).
	Tokens []Token
	// Open lets every caller act as an operator without a token. For dev mode only: anyone who
	// reaches the HTTP port can then roll back transactions.
	Open   bool
	Logger *slog.Logger
	// Faults manages the fault-injection rules (/admin/v1/faults); nil: none can be made.
	Faults *faults.Injector
}

// Handler serves /admin/v1/ and /ui/.
type Handler struct {
	eng    *engine.Engine
	tokens []Token
	open   bool
	log    *slog.Logger
	mux    *http.ServeMux
	routes []route
	faults *faults.Injector
}

// handlerFunc is a route's body; an error it returns becomes the JSON error answer.
type handlerFunc func(w http.ResponseWriter, r *http.Request, c caller) error

type route struct {
	method, path string
	// role is what the caller needs; "" means no token (the OpenAPI document only).
	role   Role
	handle handlerFunc
}

// New builds the handler. It logs (never the secrets) how the API is protected.
func New(cfg Config) (*Handler, error) {
	if cfg.Engine == nil {
		return nil, errors.New("admin: Config.Engine is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	tokens, err := MergeTokens(cfg.Tokens)
	if err != nil {
		return nil, err
	}
	h := &Handler{eng: cfg.Engine, tokens: tokens, open: cfg.Open, log: cfg.Logger, mux: http.NewServeMux(), faults: cfg.Faults}
	switch {
	case h.open:
		h.log.Warn("admin API and dashboard are OPEN: no token needed, anyone who reaches the HTTP port may act on transactions (dev mode)")
	case len(tokens) == 0:
		h.log.Warn("admin API has no tokens configured (--admin-tokens-file or TREATY_ADMIN_TOKENS): it refuses every request")
	default:
		viewers, operators := 0, 0
		for _, t := range tokens {
			if t.role == RoleOperator {
				operators++
			} else {
				viewers++
			}
		}
		h.log.Info("admin API requires a bearer token", "operator_tokens", operators, "viewer_tokens", viewers)
	}
	h.routes = []route{
		{"GET", "/admin/v1/openapi.json", "", h.openapi},
		{"GET", "/admin/v1/whoami", RoleViewer, h.whoami},
		{"GET", "/admin/v1/stats", RoleViewer, h.stats},
		{"GET", "/admin/v1/transactions", RoleViewer, h.list},
		{"GET", "/admin/v1/transactions/{gid}", RoleViewer, h.get},
		{"GET", "/admin/v1/workflows", RoleViewer, h.workflows},
		{"GET", "/admin/v1/workflows/{name}", RoleViewer, h.workflows},
		{"GET", "/admin/v1/jobs", RoleViewer, h.jobs},
	}
	for _, action := range Actions() {
		h.routes = append(h.routes, route{"POST", "/admin/v1/transactions/{gid}/" + action, RoleOperator, h.action(action)})
	}
	h.routes = append(h.routes, h.faultRoutes()...)
	for _, rt := range h.routes {
		h.mux.Handle(rt.method+" "+rt.path, h.guard(rt))
	}
	h.mux.HandleFunc(Prefix, h.unmatched)
	ui, err := fs.Sub(uiFiles, "ui")
	if err != nil {
		return nil, err
	}
	files := http.StripPrefix(strings.TrimSuffix(UIPrefix, "/"), http.FileServerFS(ui))
	h.mux.Handle("GET "+UIPrefix, uiHeaders(files))
	h.mux.Handle("GET /ui", http.RedirectHandler(UIPrefix, http.StatusMovedPermanently))
	return h, nil
}

// Actions are the operator actions, each a POST route under /admin/v1/transactions/{gid}/.
func Actions() []string {
	return []string{
		engine.ActionRetry, engine.ActionRollback, engine.ActionResume,
		engine.ActionResolve, engine.ActionPause, engine.ActionUnpause,
	}
}

// Register mounts the API and the dashboard on mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.Handle(Prefix, h)
	mux.Handle(UIPrefix, h)
	mux.Handle("/ui", h)
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	h.mux.ServeHTTP(w, r)
}

// Routes lists the API's routes as "METHOD /path" patterns, for the OpenAPI check and docs.
func (h *Handler) Routes() []string {
	out := make([]string, len(h.routes))
	for i, rt := range h.routes {
		out[i] = rt.method + " " + rt.path
	}
	return out
}

// Match says which route pattern would serve r ("" when none).
func (h *Handler) Match(r *http.Request) string {
	_, p := h.mux.Handler(r)
	if p == Prefix || strings.HasPrefix(p, "GET "+UIPrefix) || p == "GET /ui" {
		return ""
	}
	return p
}

// guard authenticates, checks the role, and turns a returned error into the JSON answer.
func (h *Handler) guard(rt route) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var c caller
		if rt.role != "" {
			var ae *apiError
			if c, ae = h.authenticate(r); ae != nil {
				// Never the header itself: it is the secret.
				h.log.Warn("admin request refused", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "why", ae.Message)
				h.writeError(w, r, ae)
				return
			}
			if !c.role.allows(rt.role) {
				h.log.Warn("admin request forbidden", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "actor", c.actor, "role", c.role)
				h.writeError(w, r, &apiError{status: http.StatusForbidden, Code: "permission_denied",
					Message: "this token's role is " + string(c.role) + "; " + r.Method + " " + rt.path + " needs " + string(rt.role)})
				return
			}
		}
		if err := checkStrings(r); err != nil {
			h.writeError(w, r, err)
			return
		}
		if err := rt.handle(w, r, c); err != nil {
			h.writeError(w, r, err)
		}
	})
}

// checkStrings applies the check every client string passes (engine.CheckString: UTF-8, no NUL,
// length) to the path parameters and every query parameter of a request, before any handler
// reads them; request bodies are checked where they are decoded.
func checkStrings(r *http.Request) error {
	for _, name := range []string{"gid", "name"} {
		if err := engine.CheckString(name, r.PathValue(name), 0); err != nil {
			return err
		}
	}
	for k, vs := range r.URL.Query() {
		if err := engine.CheckString("query parameter name", k, 0); err != nil {
			return err
		}
		for _, v := range vs {
			if err := engine.CheckString(k, v, 0); err != nil {
				return err
			}
		}
	}
	return nil
}

// unmatched answers paths under /admin/v1/ that no route serves, in JSON like every other error.
func (h *Handler) unmatched(w http.ResponseWriter, r *http.Request) {
	var allowed []string
	for _, m := range []string{"GET", "POST", "DELETE"} {
		probe := r.Clone(r.Context())
		probe.Method = m
		if _, p := h.mux.Handler(probe); p != Prefix {
			allowed = append(allowed, m)
		}
	}
	if len(allowed) > 0 {
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		h.writeError(w, r, &apiError{status: http.StatusMethodNotAllowed, Code: "method_not_allowed",
			Message: r.Method + " is not served on " + r.URL.Path + "; allowed: " + strings.Join(allowed, ", ")})
		return
	}
	h.writeError(w, r, &apiError{status: http.StatusNotFound, Code: "not_found",
		Message: "no admin route " + r.URL.Path + "; see /admin/v1/openapi.json"})
}

// uiHeaders forbids the dashboard from loading anything that is not its own: no CDN, no
// third-party script, no framing.
func uiHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
		w.Header().Set("Referrer-Policy", "no-referrer")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("Cache-Control", "no-cache")
		next.ServeHTTP(w, r)
	})
}

func (h *Handler) openapi(w http.ResponseWriter, _ *http.Request, _ caller) error {
	w.Header().Set("Content-Type", "application/json")
	_, err := w.Write(openapiJSON)
	return err
}

func (h *Handler) whoami(w http.ResponseWriter, _ *http.Request, c caller) error {
	writeJSON(w, http.StatusOK, Whoami{Role: c.role, Actor: c.actor, Open: h.open})
	return nil
}

func (h *Handler) stats(w http.ResponseWriter, r *http.Request, _ caller) error {
	ctx, cancel := context.WithTimeout(r.Context(), readTimeout)
	defer cancel()
	s, err := h.eng.Stats(ctx)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, statsJSON(s))
	return nil
}

func (h *Handler) list(w http.ResponseWriter, r *http.Request, _ caller) error {
	f, err := parseListFilter(r.URL.Query())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(r.Context(), readTimeout)
	defer cancel()
	txs, next, err := h.eng.List(ctx, f)
	if err != nil {
		return err
	}
	out := TransactionList{Transactions: make([]Transaction, len(txs)), NextCursor: next}
	for i, t := range txs {
		out.Transactions[i] = transactionJSON(t)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (h *Handler) get(w http.ResponseWriter, r *http.Request, _ caller) error {
	gid := r.PathValue("gid")
	if err := engine.ValidateGID(gid); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(r.Context(), readTimeout)
	defer cancel()
	t, actions, err := h.eng.View(ctx, gid)
	if err != nil {
		return err
	}
	out := transactionJSON(t)
	out.Actions = actions
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (h *Handler) workflows(w http.ResponseWriter, r *http.Request, _ caller) error {
	name := r.PathValue("name")
	q := r.URL.Query()
	if err := onlyParams(q, "name"); err != nil {
		return err
	}
	if name == "" {
		name = q.Get("name")
	}
	ctx, cancel := context.WithTimeout(r.Context(), readTimeout)
	defer cancel()
	ws, err := h.eng.ListWorkflows(ctx, name)
	if err != nil {
		return err
	}
	if r.PathValue("name") != "" && len(ws) == 0 {
		return &apiError{status: http.StatusNotFound, Code: "not_found", Message: "no workflow named " + strconv.Quote(name), Field: "name"}
	}
	out := WorkflowList{Workflows: make([]Workflow, 0, len(ws))}
	for _, pw := range ws {
		wj, err := workflowJSON(pw)
		if err != nil {
			return err
		}
		out.Workflows = append(out.Workflows, wj)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// jobs reports the reconciliation jobs' last runs on this replica (every replica runs them).
func (h *Handler) jobs(w http.ResponseWriter, r *http.Request, _ caller) error {
	if err := onlyParams(r.URL.Query()); err != nil {
		return err
	}
	out := JobList{Replica: h.eng.Owner(), Jobs: []Job{}}
	for _, j := range h.eng.Jobs() {
		out.Jobs = append(out.Jobs, jobJSON(j))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// action applies one operator action. The engine and the mode's state machine decide whether
// it makes sense now; a refusal comes back as 409 with their reason.
func (h *Handler) action(name string) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request, c caller) error {
		var req ActionRequest
		if err := decodeBody(w, r, &req); err != nil {
			return err
		}
		for _, f := range []struct{ name, v string }{{"branch", req.Branch}, {"op", req.Op}, {"reason", req.Reason}} {
			if err := engine.CheckString(f.name, f.v, 0); err != nil {
				return err
			}
		}
		op := engine.Operation{
			GID: r.PathValue("gid"), Action: name, Branch: req.Branch, Op: req.Op,
			Actor: c.actor, Reason: strings.TrimSpace(req.Reason),
		}
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), actionTimeout)
		defer cancel()
		t, err := h.eng.Operate(ctx, op)
		if err != nil {
			h.log.Info("operator action refused", "gid", op.GID, "action", name, "branch", op.Branch, "op", op.Op, "actor", op.Actor, "err", err)
			return err
		}
		h.log.Info("operator action", "gid", op.GID, "action", name, "branch", op.Branch, "op", op.Op, "actor", op.Actor, "reason", op.Reason)
		out := transactionJSON(t)
		if _, actions, err := h.eng.View(ctx, op.GID); err == nil {
			out.Actions = actions // what may follow; without it the answer still stands
		}
		writeJSON(w, http.StatusOK, out)
		return nil
	}
}

func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return &apiError{status: http.StatusUnsupportedMediaType, Code: "invalid_argument",
			Message: "Content-Type is " + strconv.Quote(ct) + "; send application/json", Field: "Content-Type"}
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			return badRequest("body", "is over the limit of "+strconv.Itoa(MaxBodyBytes)+" bytes")
		case errors.Is(err, io.EOF):
			return badRequest("body", `is empty; send {"reason": "..."}`)
		}
		return badRequest("body", "is not the expected JSON object: "+err.Error())
	}
	if dec.More() {
		return badRequest("body", "has more than one JSON value")
	}
	return nil
}

// listParams are the list route's query parameters; anything else is refused, so that a typo
// does not silently list everything.
var listParams = []string{
	"status", "mode", "workflow", "gid_prefix",
	"created_after", "created_before", "updated_after", "updated_before",
	"cursor", "limit",
}

func onlyParams(q url.Values, known ...string) error {
	for k := range q {
		ok := false
		for _, n := range known {
			ok = ok || k == n
		}
		if !ok {
			return badRequest(k, "is not a parameter of this route (known: "+strings.Join(known, ", ")+")")
		}
	}
	return nil
}

func parseListFilter(q url.Values) (engine.ListFilter, error) {
	var f engine.ListFilter
	if err := onlyParams(q, listParams...); err != nil {
		return f, err
	}
	for _, name := range listParams {
		if len(q[name]) > 1 && name != "status" && name != "mode" {
			return f, badRequest(name, "is given "+strconv.Itoa(len(q[name]))+" times; give it once")
		}
	}
	f.Statuses = splitList(q["status"])
	f.Modes = splitList(q["mode"])
	f.Workflow = q.Get("workflow")
	f.GIDPrefix = q.Get("gid_prefix")
	f.Cursor = q.Get("cursor")
	for _, tp := range []struct {
		name string
		dst  *time.Time
	}{
		{"created_after", &f.CreatedAfter}, {"created_before", &f.CreatedBefore},
		{"updated_after", &f.UpdatedAfter}, {"updated_before", &f.UpdatedBefore},
	} {
		v := q.Get(tp.name)
		if v == "" {
			continue
		}
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return f, badRequest(tp.name, strconv.Quote(v)+" is not an RFC 3339 time such as 2025-01-31T08:00:00Z")
		}
		*tp.dst = t
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > engine.MaxListLimit {
			return f, badRequest("limit", strconv.Quote(v)+" is not a number within 1.."+strconv.Itoa(engine.MaxListLimit))
		}
		f.Limit = n
	}
	return f, nil
}

// splitList accepts both status=a&status=b and status=a,b.
func splitList(vs []string) []string {
	var out []string
	for _, v := range vs {
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
	}
	return out
}
