package admin

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"github.com/treatyhq/treaty/internal/engine"
)

// apiError is the JSON body of every error answer. Code is stable (clients switch on it),
// Message is for people, Field names the offending parameter when there is one.
type apiError struct {
	status  int
	Code    string `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

func (e *apiError) Error() string { return e.Code + ": " + e.Message }

// errorCodes maps the engine's errors onto HTTP, in one place rather than in each handler.
// The first entry that matches wins.
var errorCodes = []struct {
	target error
	status int
	code   string
}{
	{engine.ErrNotFound, http.StatusNotFound, "not_found"},
	{engine.ErrQueued, http.StatusAccepted, "queued"},
	{engine.ErrConflict, http.StatusConflict, "conflict"},
	{engine.ErrFailedPrecondition, http.StatusConflict, "conflict"},
	{engine.ErrAlreadyExists, http.StatusConflict, "already_exists"},
	{engine.ErrStopping, http.StatusServiceUnavailable, "unavailable"},
	{engine.ErrOverloaded, http.StatusServiceUnavailable, "unavailable"},
	{context.DeadlineExceeded, http.StatusGatewayTimeout, "deadline_exceeded"},
	// The client went away (or the replica is stopping): nobody reads the answer; it only must
	// not be logged as an internal failure.
	{context.Canceled, http.StatusServiceUnavailable, "unavailable"},
}

// toAPIError turns an engine error into the answer a client sees. Unknown errors are internal:
// their text may hold details (SQL, addresses) that belong in the log, not in the answer.
func toAPIError(err error) (*apiError, bool) {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae, true
	}
	var inv *engine.InvalidArgumentError
	if errors.As(err, &inv) {
		return &apiError{status: http.StatusBadRequest, Code: "invalid_argument", Message: inv.Error(), Field: inv.Field}, true
	}
	for _, c := range errorCodes {
		if errors.Is(err, c.target) {
			return &apiError{status: c.status, Code: c.code, Message: err.Error()}, true
		}
	}
	return &apiError{status: http.StatusInternalServerError, Code: "internal", Message: "internal error; the coordinator's log has the details"}, false
}

func badRequest(field, msg string) *apiError {
	return &apiError{status: http.StatusBadRequest, Code: "invalid_argument", Message: field + ": " + msg, Field: field}
}

func (h *Handler) writeError(w http.ResponseWriter, r *http.Request, err error) {
	ae, known := toAPIError(err)
	if !known {
		h.log.ErrorContext(r.Context(), "admin request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	if ae.status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="treaty-admin"`)
	}
	writeJSON(w, ae.status, ae)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	// An error here means the client went away; the status is out already.
	_ = enc.Encode(v)
}
