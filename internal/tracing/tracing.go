// Package tracing wires OpenTelemetry into the coordinator: a tracer provider exporting over
// OTLP when configured (off by default), and W3C trace context carried in gRPC metadata, both from
// callers (so a transaction's spans join the caller's trace) and to participants (so theirs join
// the transaction's).
package tracing

import (
	"context"
	"fmt"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Config selects the exporter. The zero value traces nothing.
type Config struct {
	// OTLPEndpoint is host:port of an OTLP/gRPC collector; empty: tracing off.
	OTLPEndpoint string
	// Insecure sends to the collector without TLS.
	Insecure bool
	// SampleRatio of new traces to keep (0 means 1: everything); a caller's sampled trace is
	// always continued.
	SampleRatio float64
	// ServiceName defaults to "treaty-coordinator".
	ServiceName string
}

// New returns the tracer provider for cfg and a function that flushes and stops it.
func New(ctx context.Context, cfg Config) (trace.TracerProvider, func(context.Context) error, error) {
	if cfg.OTLPEndpoint == "" {
		return noop.NewTracerProvider(), func(context.Context) error { return nil }, nil
	}
	opts := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(cfg.OTLPEndpoint)}
	if cfg.Insecure {
		opts = append(opts, otlptracegrpc.WithInsecure())
	}
	exp, err := otlptracegrpc.New(ctx, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("OTLP exporter for %s: %w", cfg.OTLPEndpoint, err)
	}
	name := cfg.ServiceName
	if name == "" {
		name = "treaty-coordinator"
	}
	ratio := cfg.SampleRatio
	if ratio <= 0 || ratio > 1 {
		ratio = 1
	}
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(ratio))),
		sdktrace.WithResource(resource.NewSchemaless(semconv.ServiceName(name))),
	)
	return tp, tp.Shutdown, nil
}

// propagator is W3C trace context, used directly rather than through the process-wide
// otel.GetTextMapPropagator, so that nothing else in the process changes it.
func propagator() propagation.TraceContext { return propagation.TraceContext{} }

type mdCarrier metadata.MD

func (c mdCarrier) Get(k string) string {
	if v := metadata.MD(c).Get(k); len(v) > 0 {
		return v[0]
	}
	return ""
}
func (c mdCarrier) Set(k, v string) { metadata.MD(c).Set(k, v) }
func (c mdCarrier) Keys() []string {
	out := make([]string, 0, len(c))
	for k := range c {
		out = append(out, k)
	}
	return out
}

// Inject adds ctx's span context to the outgoing gRPC metadata (traceparent, tracestate).
func Inject(ctx context.Context) context.Context {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return ctx
	}
	md := metadata.MD{}
	propagator().Inject(ctx, mdCarrier(md))
	kv := make([]string, 0, 2*len(md))
	for k, vs := range md {
		for _, v := range vs {
			kv = append(kv, k, v)
		}
	}
	return metadata.AppendToOutgoingContext(ctx, kv...)
}

// Extract reads a caller's trace context from incoming gRPC metadata into ctx.
func Extract(ctx context.Context) context.Context {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return ctx
	}
	return propagator().Extract(ctx, mdCarrier(md))
}

// UnaryServerInterceptor makes every handler's context carry the caller's trace context.
func UnaryServerInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	return h(Extract(ctx), req)
}
