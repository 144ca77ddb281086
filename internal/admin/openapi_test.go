package admin_test

import (
	"encoding/json"
	"net/http"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/admin"
)

type openapiDoc struct {
	OpenAPI    string                          `json:"openapi"`
	Paths      map[string]map[string]openapiOp `json:"paths"`
	Components struct {
		Schemas map[string]struct {
			Properties map[string]json.RawMessage `json:"properties"`
		} `json:"schemas"`
	} `json:"components"`
}

type openapiOp struct {
	Security   *[]map[string][]string `json:"security"`
	Parameters []struct {
		Name string `json:"name"`
		In   string `json:"in"`
	} `json:"parameters"`
	RequestBody *json.RawMessage           `json:"requestBody"`
	Responses   map[string]json.RawMessage `json:"responses"`
}

// TestOpenAPIMatchesHandlers checks the served document against the handler both ways: every
// route the mux serves is documented and every documented operation is served by the route of
// that name; the documented auth, error answers, query parameters and JSON shapes are what the
// handlers do.
func TestOpenAPIMatchesHandlers(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	b.saga(t, "doc-1", b.step("a"))

	r := b.call(t, "GET", "/admin/v1/openapi.json", "", nil)
	require.Equal(t, http.StatusOK, r.status)
	var doc openapiDoc
	require.NoError(t, json.Unmarshal(r.body, &doc))
	require.True(t, strings.HasPrefix(doc.OpenAPI, "3."), doc.OpenAPI)

	h, err := admin.New(admin.Config{Engine: b.app.Engine})
	require.NoError(t, err)
	var documented []string
	for path, ops := range doc.Paths {
		for method, op := range ops {
			pattern := strings.ToUpper(method) + " " + path
			documented = append(documented, pattern)

			// The mux sends this operation to the route of the same pattern.
			concrete := strings.NewReplacer("{gid}", "doc-1", "{name}", "booking", "{id}", "1").Replace(path)
			req, err := http.NewRequest(strings.ToUpper(method), concrete, nil)
			require.NoError(t, err)
			require.Equal(t, pattern, h.Match(req), "documented %s is served by another route", pattern)

			// Auth as documented: no security means no token; otherwise 401 without one.
			noToken := b.call(t, strings.ToUpper(method), concrete, "", nil)
			if op.Security != nil && len(*op.Security) == 0 {
				require.Equal(t, http.StatusOK, noToken.status, pattern)
			} else {
				require.Equal(t, http.StatusUnauthorized, noToken.status, pattern)
				require.Contains(t, op.Responses, "401", pattern)
			}
			// Actions: a viewer gets 403, documented; they take a body.
			if method == "post" {
				require.Contains(t, op.Responses, "403", pattern)
				require.Contains(t, op.Responses, "409", pattern)
				require.NotNil(t, op.RequestBody, pattern)
				viewer := b.call(t, "POST", concrete, viewerSecret, admin.ActionRequest{Reason: "x"})
				require.Equal(t, http.StatusForbidden, viewer.status, pattern)
			}
			// Every documented query parameter is one the handler knows.
			for _, p := range op.Parameters {
				if p.In != "query" {
					continue
				}
				res := b.call(t, strings.ToUpper(method), concrete+"?"+p.Name+"=", viewerSecret, nil)
				require.NotContains(t, string(res.body), "is not a parameter of this route", "%s ?%s", pattern, p.Name)
			}
		}
	}
	sort.Strings(documented)
	served := h.Routes()
	sort.Strings(served)
	require.Equal(t, served, documented, "the routes the mux serves and the document's operations")

	// The handlers' query parameters beyond the documented ones are refused; the list route's
	// documented parameters are exactly the ones it accepts.
	var listed []string
	for _, p := range doc.Paths["/admin/v1/transactions"]["get"].Parameters {
		listed = append(listed, p.Name)
	}
	require.ElementsMatch(t, []string{"status", "mode", "workflow", "gid_prefix", "created_after", "created_before", "updated_after", "updated_before", "cursor", "limit"}, listed)

	// The JSON shapes: each documented schema has exactly the fields the Go type encodes.
	for name, typ := range map[string]any{
		"Transaction": admin.Transaction{}, "Branch": admin.Branch{}, "Event": admin.Event{},
		"TransactionList": admin.TransactionList{}, "Stats": admin.Stats{}, "StatusCount": admin.StatusCount{},
		"Workflow": admin.Workflow{}, "WorkflowList": admin.WorkflowList{}, "Whoami": admin.Whoami{},
		"ActionRequest": admin.ActionRequest{}, "JobList": admin.JobList{}, "Job": admin.Job{},
		"FaultRequest": admin.FaultRequest{}, "Fault": admin.Fault{}, "FaultList": admin.FaultList{},
	} {
		schema, ok := doc.Components.Schemas[name]
		require.True(t, ok, "schema %s is documented", name)
		var props []string
		for p := range schema.Properties {
			props = append(props, p)
		}
		require.ElementsMatch(t, jsonFields(reflect.TypeOf(typ)), props, "schema %s", name)
	}
	errSchema := doc.Components.Schemas["Error"]
	require.Len(t, errSchema.Properties, 3)
	for _, f := range []string{"code", "message", "field"} {
		require.Contains(t, errSchema.Properties, f)
	}

	// Every $ref points at something the document defines.
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, c := range x {
				if k == "$ref" {
					ref := c.(string)
					parts := strings.Split(strings.TrimPrefix(ref, "#/"), "/")
					var cur any = mustJSON(t, r.body)
					for _, p := range parts {
						m, ok := cur.(map[string]any)
						require.True(t, ok, "ref %s", ref)
						cur, ok = m[p]
						require.True(t, ok, "ref %s resolves", ref)
					}
				}
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	walk(mustJSON(t, r.body))
}

func mustJSON(t *testing.T, b []byte) any {
	var v any
	require.NoError(t, json.Unmarshal(b, &v))
	return v
}

func jsonFields(t reflect.Type) []string {
	var out []string
	for i := range t.NumField() {
		tag := t.Field(i).Tag.Get("json")
		name, _, _ := strings.Cut(tag, ",")
		if name != "" && name != "-" {
			out = append(out, name)
		}
	}
	return out
}
