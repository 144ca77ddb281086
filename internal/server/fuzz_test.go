package server

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/targetpolicy"
)

// FuzzSubmitSaga feeds encoded SubmitSagaRequests through what the coordinator does with one
// before writing anything: the codec (invalid UTF-8 included), the checks every request shares,
// the gid check and the saga's own checks with a target policy. Whatever the bytes, the answer
// is acceptance or INVALID_ARGUMENT naming a field (never another code, never a panic), and an
// accepted request holds only strings that PostgreSQL and the limits accept. The seed corpus in
// testdata/fuzz/FuzzSubmitSaga runs with every `go test`; `make fuzz` explores further.
func FuzzSubmitSaga(f *testing.F) {
	policy, err := targetpolicy.New(nil)
	if err != nil {
		f.Fatal(err)
	}
	if err := policy.AddOwn("127.0.0.1:7600"); err != nil {
		f.Fatal(err)
	}
	lim := engine.Limits{MaxSteps: 8, MaxPayloadBytes: 1 << 10, Targets: policy}
	codec := NewCodec()
	f.Fuzz(func(t *testing.T, data []byte) {
		req := new(treatyv1.SubmitSagaRequest)
		if err := codec.Unmarshal(bufferSlice(data), req); err != nil {
			return // not a SubmitSagaRequest at all: gRPC refuses it before any handler
		}
		err := ValidateRequest(req)
		if err == nil && req.Gid != "" {
			err = engine.ValidateGID(req.Gid)
		}
		if err == nil {
			err = engine.ValidateSaga(req.Saga, lim)
		}
		if err != nil {
			var inv *engine.InvalidArgumentError
			if !errors.As(err, &inv) || inv.Field == "" {
				t.Fatalf("refusal is not a named invalid argument: %T %v", err, err)
			}
			if st := status.Convert(toStatus(err)); st.Code() != codes.InvalidArgument {
				t.Fatalf("answered %v, want INVALID_ARGUMENT: %v", st.Code(), err)
			}
			return
		}
		// Accepted: everything that will be stored is storable and within the limits.
		if len(req.Saga.GetSteps()) == 0 || len(req.Saga.GetSteps()) > lim.MaxSteps {
			t.Fatalf("accepted %d steps", len(req.Saga.GetSteps()))
		}
		for _, s := range req.Saga.GetSteps() {
			for _, v := range append([]string{s.Name, s.GetAction().GetTarget(), s.GetCompensate().GetTarget()}, s.DependsOn...) {
				if !utf8.ValidString(v) || strings.ContainsRune(v, 0) || len(v) > engine.MaxStringBytes {
					t.Fatalf("accepted string %q", v)
				}
			}
			if len(s.GetAction().GetPayload()) > lim.MaxPayloadBytes || len(s.GetCompensate().GetPayload()) > lim.MaxPayloadBytes {
				t.Fatalf("accepted a payload over the limit")
			}
			for _, target := range []string{s.GetAction().GetTarget(), s.GetCompensate().GetTarget()} {
				tg, err := invoke.ParseTarget(target)
				if err != nil {
					t.Fatalf("accepted target %q: %v", target, err)
				}
				for _, a := range tg.Addrs {
					if err := policy.Check(a); err != nil {
						t.Fatalf("accepted a target the policy refuses: %v", err)
					}
				}
			}
		}
		if _, err := proto.Marshal(req); err != nil {
			t.Fatalf("an accepted request does not encode for storage: %v", err)
		}
	})
}
