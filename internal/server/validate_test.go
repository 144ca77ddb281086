package server

import (
	"errors"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
)

// A refusal names the field by its path, at any depth, in lists and maps; a valid request
// passes (the paths are built only for a refusal).
func TestValidateRequestNamesTheField(t *testing.T) {
	step := func(name string) *treatyv1.SagaStep {
		return &treatyv1.SagaStep{Name: name, Action: &treatyv1.Call{Target: "grpc://h:1/p.S/M"}}
	}
	for _, tc := range []struct {
		req   proto.Message
		field string
	}{
		{&treatyv1.SubmitSagaRequest{Gid: "a\x00"}, "gid"},
		{&treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{step("ok"), step("bad\xff")}}}, "saga.steps[1].name"},
		{&treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{step("ok"),
			{Name: "x", Action: &treatyv1.Call{Target: "grpc://h:1/p.S/M\x00"}}}}}, "saga.steps[1].action.target"},
		{&treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Timeout: &durationpb.Duration{Seconds: 1, Nanos: -1}}}, "saga.timeout"},
		{&treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{step("ok"),
			{Name: "x", CallTimeout: &durationpb.Duration{Seconds: -1, Nanos: 1}}}}}, "saga.steps[1].call_timeout"},
		{&treatyv1.StartWorkflowRequest{Name: "w", Inputs: map[string]*treatyv1.StepInput{"bad\x00": {}}}, "inputs key"},
	} {
		err := ValidateRequest(tc.req)
		var inv *engine.InvalidArgumentError
		if !errors.As(err, &inv) {
			t.Fatalf("%v: got %v, want an invalid argument", tc.req, err)
		}
		if inv.Field != tc.field {
			t.Fatalf("%v: field %q, want %q (%v)", tc.req, inv.Field, tc.field, err)
		}
	}
	ok := &treatyv1.SubmitSagaRequest{Gid: "g", Wait: durationpb.New(1), Saga: &treatyv1.SagaSpec{
		Steps: []*treatyv1.SagaStep{step("a"), step("b")}, Timeout: durationpb.New(1)}}
	if err := ValidateRequest(ok); err != nil {
		t.Fatal(err)
	}
}

func BenchmarkValidateRequest(b *testing.B) {
	req := &treatyv1.SubmitSagaRequest{Gid: "g", Wait: durationpb.New(1), Saga: &treatyv1.SagaSpec{}}
	for _, n := range []string{"flight", "hotel", "car"} {
		req.Saga.Steps = append(req.Saga.Steps, &treatyv1.SagaStep{Name: n,
			Action:     &treatyv1.Call{Target: "grpc://127.0.0.1:7000/travel.Svc/Book", Payload: []byte("x")},
			Compensate: &treatyv1.Call{Target: "grpc://127.0.0.1:7000/travel.Svc/Cancel", Payload: []byte("x")}})
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := ValidateRequest(req); err != nil {
			b.Fatal(err)
		}
	}
}
