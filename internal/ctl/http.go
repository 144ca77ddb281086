package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// apiError is an error answer of the admin API.
type apiError struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

func (e *apiError) Error() string {
	if e.Field != "" {
		return fmt.Sprintf("%s (HTTP %d, %s, field %s)", e.Message, e.Status, e.Code, e.Field)
	}
	return fmt.Sprintf("%s (HTTP %d, %s)", e.Message, e.Status, e.Code)
}

// queuedNotice is the admin API's 202: the action was stored for the replica that drives the
// transaction, which applies it on its next pass. Not a failure.
type queuedNotice struct {
	Message string `json:"message"`
}

func (q *queuedNotice) Error() string { return "queued: " + q.Message }

// unreachableError: the request never got an answer.
type unreachableError struct{ err error }

func (e *unreachableError) Error() string {
	return "the coordinator's admin API did not answer: " + e.err.Error()
}
func (e *unreachableError) Unwrap() error { return e.err }

// exitCode says what failed.
func exitCode(err error) int {
	var ue *usageError
	var ae *apiError
	var ne *unreachableError
	switch {
	case errors.As(err, &ue):
		return ExitUsage
	case errors.As(err, &ne):
		return ExitUnavailable
	case errors.As(err, &ae):
		switch {
		case ae.Status == http.StatusBadRequest || ae.Status == http.StatusUnsupportedMediaType:
			return ExitUsage
		case ae.Status == http.StatusNotFound:
			return ExitNotFound
		case ae.Status == http.StatusUnauthorized || ae.Status == http.StatusForbidden:
			return ExitAuth
		case ae.Status == http.StatusConflict:
			return ExitConflict
		case ae.Status == http.StatusServiceUnavailable || ae.Status == http.StatusGatewayTimeout || ae.Status == http.StatusTooManyRequests:
			return ExitUnavailable
		}
	}
	return ExitError
}

// do sends one request to the admin API and decodes a 200 answer into out (raw, when out is
// a *json.RawMessage).
func (c *cli) do(ctx context.Context, method, path string, query url.Values, body, out any) error {
	base, err := url.Parse(strings.TrimRight(c.addr, "/"))
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return usagef("--addr %q: want a URL such as %s", c.addr, DefaultAddr)
	}
	u := base.String() + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return usagef("%v", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	res, err := c.env.HTTPClient.Do(req)
	if err != nil {
		return &unreachableError{err}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 64<<20))
	if err != nil {
		return &unreachableError{err}
	}
	if res.StatusCode == http.StatusAccepted {
		// An operator action on a transaction another replica drives: queued for its owner.
		q := &queuedNotice{}
		if json.Unmarshal(b, q) != nil || q.Message == "" {
			q.Message = strings.TrimSpace(string(b))
		}
		return q
	}
	if res.StatusCode != http.StatusOK && res.StatusCode != http.StatusCreated {
		ae := &apiError{Status: res.StatusCode}
		if json.Unmarshal(b, ae) != nil || ae.Message == "" {
			ae.Code, ae.Message = "http_"+fmt.Sprint(res.StatusCode), strings.TrimSpace(string(b))
			if ae.Message == "" {
				ae.Message = http.StatusText(res.StatusCode)
			}
		}
		return ae
	}
	if raw, ok := out.(*json.RawMessage); ok {
		*raw = b
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: unexpected answer: %w", method, path, err)
	}
	return nil
}

// get fetches path and either prints its JSON (-o json) or decodes it into out for a table.
// It reports whether the caller should print a table.
func (c *cli) get(ctx context.Context, path string, query url.Values, out any) (table bool, err error) {
	if c.output == "json" {
		var raw json.RawMessage
		if err := c.do(ctx, http.MethodGet, path, query, nil, &raw); err != nil {
			return false, err
		}
		return false, c.printJSON(raw)
	}
	return true, c.do(ctx, http.MethodGet, path, query, nil, out)
}

func (c *cli) printJSON(raw json.RawMessage) error {
	var buf bytes.Buffer
	if err := json.Indent(&buf, raw, "", "  "); err != nil {
		_, err = c.env.Stdout.Write(append(raw, '\n'))
		return err
	}
	buf.WriteByte('\n')
	_, err := c.env.Stdout.Write(buf.Bytes())
	return err
}
