package admin

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/treatyhq/treaty/internal/faults"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/fault"
)

// FaultRequest creates a fault rule (POST /admin/v1/faults): the rule's fields as in pkg/fault,
// and expires_in, the rule's lifetime (required, at most 24h).
type FaultRequest struct {
	Target      string  `json:"target,omitempty"`
	Op          string  `json:"op,omitempty"`
	GIDPrefix   string  `json:"gid_prefix,omitempty"`
	Workflow    string  `json:"workflow,omitempty"`
	Effect      string  `json:"effect"`
	Delay       string  `json:"delay,omitempty"`
	Code        string  `json:"code,omitempty"`
	Message     string  `json:"message,omitempty"`
	Probability float64 `json:"probability,omitempty"`
	MaxCount    int     `json:"max_count,omitempty"`
	Reason      string  `json:"reason"`
	ExpiresIn   string  `json:"expires_in"`
}

// Fault is a stored rule as the API shows it.
type Fault struct {
	ID          string     `json:"id"`
	Target      string     `json:"target"`
	Op          string     `json:"op"`
	GIDPrefix   string     `json:"gid_prefix"`
	Workflow    string     `json:"workflow"`
	Effect      string     `json:"effect"`
	Delay       string     `json:"delay,omitempty"`
	Code        string     `json:"code,omitempty"`
	Message     string     `json:"message,omitempty"`
	Probability float64    `json:"probability"`
	MaxCount    int        `json:"max_count"`
	Fired       int64      `json:"fired"`
	Reason      string     `json:"reason"`
	CreatedBy   string     `json:"created_by"`
	CreatedAt   time.Time  `json:"created_at"`
	ExpiresAt   time.Time  `json:"expires_at"`
	DeletedBy   string     `json:"deleted_by,omitempty"`
	DeletedAt   *time.Time `json:"deleted_at,omitempty"`
}

// FaultList answers GET /admin/v1/faults. Enabled says whether this coordinator applies rules
// (--allow-fault-injection); the dashboard shows a banner while live rules exist.
type FaultList struct {
	Enabled bool    `json:"enabled"`
	Faults  []Fault `json:"faults"`
}

func faultJSON(s faults.Stored) Fault {
	r := s.Rule
	p := r.Probability
	if p == 0 {
		p = 1
	}
	f := Fault{ID: r.ID, Target: r.Target, Op: r.Op, GIDPrefix: r.GIDPrefix, Workflow: r.Workflow, Effect: string(r.Effect),
		Code: r.Code, Message: r.Message, Probability: p, MaxCount: r.MaxCount, Fired: s.Fired, Reason: r.Reason,
		CreatedBy: s.CreatedBy, CreatedAt: s.CreatedAt, ExpiresAt: r.ExpiresAt, DeletedBy: s.DeletedBy}
	if r.Delay != 0 {
		f.Delay = time.Duration(r.Delay).String()
	}
	if !s.DeletedAt.IsZero() {
		at := s.DeletedAt
		f.DeletedAt = &at
	}
	return f
}

// faultRoutes are the fault-injection routes; they exist on every coordinator, and creating a
// rule answers 409 where injection is not allowed.
func (h *Handler) faultRoutes() []route {
	return []route{
		{"GET", "/admin/v1/faults", RoleViewer, h.listFaults},
		{"POST", "/admin/v1/faults", RoleOperator, h.createFault},
		{"DELETE", "/admin/v1/faults/{id}", RoleOperator, h.deleteFault},
	}
}

var errFaultsUnavailable = &apiError{status: http.StatusConflict, Code: "fault_injection_disabled", Message: faults.ErrDisabled.Error()}

func faultError(err error) error {
	var ae *apiError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, faults.ErrDisabled):
		return errFaultsUnavailable
	case errors.Is(err, faults.ErrTooManyRules):
		return &apiError{status: http.StatusConflict, Code: "resource_exhausted", Message: err.Error()}
	case errors.Is(err, fault.ErrInvalid):
		msg := strings.TrimPrefix(err.Error(), fault.ErrInvalid.Error()+": ")
		field, _, _ := strings.Cut(msg, " ")
		return &apiError{status: http.StatusBadRequest, Code: "invalid_argument", Message: msg, Field: field}
	case errors.Is(err, store.ErrNotFound):
		return &apiError{status: http.StatusNotFound, Code: "not_found", Message: err.Error(), Field: "id"}
	}
	return err
}

func (h *Handler) listFaults(w http.ResponseWriter, r *http.Request, _ caller) error {
	q := r.URL.Query()
	if err := onlyParams(q, "all", "limit"); err != nil {
		return err
	}
	all := false
	if v := q.Get("all"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return badRequest("all", strconv.Quote(v)+" is not true or false")
		}
		all = b
	}
	limit := 100
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			return badRequest("limit", strconv.Quote(v)+" is not a number within 1..1000")
		}
		limit = n
	}
	out := FaultList{Faults: []Fault{}}
	if h.faults == nil {
		writeJSON(w, http.StatusOK, out)
		return nil
	}
	out.Enabled = h.faults.Enabled()
	ctx, cancel := context.WithTimeout(r.Context(), readTimeout)
	defer cancel()
	list, err := h.faults.List(ctx, all, limit)
	if err != nil {
		return err
	}
	for _, s := range list {
		out.Faults = append(out.Faults, faultJSON(s))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (h *Handler) createFault(w http.ResponseWriter, r *http.Request, c caller) error {
	var req FaultRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	if h.faults == nil || !h.faults.Enabled() {
		h.log.Warn("fault rule refused: fault injection is not allowed on this coordinator", "actor", c.actor)
		return errFaultsUnavailable
	}
	rule := fault.Rule{Target: req.Target, Op: req.Op, GIDPrefix: req.GIDPrefix, Workflow: req.Workflow,
		Effect: fault.Effect(req.Effect), Code: req.Code, Message: req.Message, Probability: req.Probability,
		MaxCount: req.MaxCount, Reason: strings.TrimSpace(req.Reason)}
	if req.Delay != "" {
		d, err := time.ParseDuration(req.Delay)
		if err != nil {
			return badRequest("delay", strconv.Quote(req.Delay)+" is not a duration such as 500ms or 2s")
		}
		rule.Delay = fault.Duration(d)
	}
	if req.ExpiresIn == "" {
		return badRequest("expires_in", "is required: a fault rule must end by itself (a duration such as 30m, at most "+fault.MaxLifetime.String()+")")
	}
	expiresIn, err := time.ParseDuration(req.ExpiresIn)
	if err != nil || expiresIn <= 0 || expiresIn > fault.MaxLifetime {
		return badRequest("expires_in", strconv.Quote(req.ExpiresIn)+" is not a duration within 1s.."+fault.MaxLifetime.String())
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), actionTimeout)
	defer cancel()
	s, err := h.faults.Create(ctx, rule, expiresIn, c.actor)
	if err != nil {
		h.log.Info("fault rule refused", "actor", c.actor, "err", err)
		return faultError(err)
	}
	// The audit record: who made which rule and why, in the log as in the database row.
	h.log.Warn("fault rule created", "id", s.Rule.ID, "actor", c.actor, "reason", s.Rule.Reason, "effect", s.Rule.Effect,
		"target", s.Rule.Target, "op", s.Rule.Op, "gid_prefix", s.Rule.GIDPrefix, "workflow", s.Rule.Workflow,
		"probability", s.Rule.Probability, "max_count", s.Rule.MaxCount, "expires_at", s.Rule.ExpiresAt)
	writeJSON(w, http.StatusCreated, faultJSON(s))
	return nil
}

func (h *Handler) deleteFault(w http.ResponseWriter, r *http.Request, c caller) error {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil || id < 1 {
		return badRequest("id", strconv.Quote(r.PathValue("id"))+" is not a fault rule id (a positive integer)")
	}
	if h.faults == nil {
		return &apiError{status: http.StatusNotFound, Code: "not_found", Message: "no live fault rule " + strconv.FormatInt(id, 10), Field: "id"}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), actionTimeout)
	defer cancel()
	s, err := h.faults.Delete(ctx, id, c.actor)
	if err != nil {
		return faultError(err)
	}
	h.log.Warn("fault rule deleted", "id", s.Rule.ID, "actor", c.actor, "fired", s.Fired, "reason", s.Rule.Reason)
	writeJSON(w, http.StatusOK, faultJSON(s))
	return nil
}
