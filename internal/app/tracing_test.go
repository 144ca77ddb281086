package app_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
)

// A saga's spans join the caller's trace, each participant call has a span of its own, and the
// participant receives that span's trace context.
func TestTracingJoinsCallerAndReachesParticipants(t *testing.T) {
	t.Parallel()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	b := setup(t, setupOpts{engine: engine.Config{Tracer: tp.Tracer("test")}})

	callerTrace := "4bf92f3577b34da6a3ce929d0e0e4736"
	ctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", "00-"+callerTrace+"-00f067aa0ba902b7-01")
	res, err := b.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "traced", Wait: durationpb.New(10 * time.Second),
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a"), b.step("b")}}})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)

	var txSpan sdktrace.ReadOnlySpan
	calls := map[string]sdktrace.ReadOnlySpan{}
	require.Eventually(t, func() bool {
		for _, s := range rec.Ended() {
			switch {
			case s.Name() == "treaty.transaction saga":
				txSpan = s
			case strings.HasPrefix(s.Name(), "treaty.call "):
				calls[s.Name()] = s
			}
		}
		return txSpan != nil && len(calls) == 2
	}, 30*time.Second, 10*time.Millisecond)
	require.Equal(t, callerTrace, txSpan.SpanContext().TraceID().String(), "the transaction joins the caller's trace")
	require.Equal(t, "00f067aa0ba902b7", txSpan.Parent().SpanID().String())
	for _, name := range []string{"treaty.call action a", "treaty.call action b"} {
		s := calls[name]
		require.NotNil(t, s, name)
		require.Equal(t, txSpan.SpanContext().SpanID(), s.Parent().SpanID(), name)
		require.Equal(t, trace.SpanKindClient, s.SpanKind())
	}
	for _, c := range b.part.CallsFor("traced") {
		require.True(t, strings.HasPrefix(c.Traceparent, "00-"+callerTrace+"-"), "participant got %q", c.Traceparent)
		span := calls["treaty.call action "+c.Branch]
		require.Contains(t, c.Traceparent, span.SpanContext().SpanID().String(), "the call's own span is the participant's parent")
	}
}
