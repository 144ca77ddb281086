package outbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"go.opentelemetry.io/otel/trace"
)

// Header names the relay adds to every published message.
const (
	// HeaderMessageID carries the message's stable id (a UUIDv7 unless the caller chose one).
	// Consumers drop duplicates by it (see Inbox).
	HeaderMessageID = "treaty-message-id"
	// HeaderSource names the outbox table the message came from ("app.outbox").
	HeaderSource = "treaty-source"
	// HeaderTraceparent and HeaderTracestate carry W3C trace context from Enqueue's ctx.
	HeaderTraceparent = "traceparent"
	HeaderTracestate  = "tracestate"
	// HeaderDeadLetterError and HeaderDeadLetterTopic are added to messages sent to the
	// dead-letter topic.
	HeaderDeadLetterError = "treaty-dead-letter-error"
	HeaderDeadLetterTopic = "treaty-original-topic"
)

// Limits on what Enqueue accepts; larger things are refused rather than failing at the broker.
const (
	MaxTopicLength   = 249 // Kafka's own limit
	MaxHeaders       = 64
	MaxHeaderKeySize = 1024
)

// Message is one outgoing message, written by Enqueue in the caller's transaction.
type Message struct {
	// ID identifies the message for consumers' deduplication. Zero means a new UUIDv7.
	ID uuid.UUID
	// Topic is the Kafka topic. Required.
	Topic string
	// Key decides the partition (murmur2, as the Java client does) and the order: messages with
	// the same key are published in the order their transactions wrote them. nil means no
	// key: any partition, no order.
	Key []byte
	// Value is the payload; nil is a tombstone.
	Value []byte
	// Headers are passed through to Kafka, in order, before the headers the relay adds.
	Headers []Header
}

// Header is one Kafka record header.
type Header struct {
	Key   string
	Value []byte
}

// NewID returns a new message id (UUIDv7: time-ordered, so ids sort roughly by creation).
func NewID() uuid.UUID {
	id, err := uuid.NewV7()
	if err != nil {
		// NewV7 fails only when the system's random source does; v4 fails the same way.
		return uuid.Must(uuid.NewRandom())
	}
	return id
}

type traceKey struct{}

type traceContext struct{ traceparent, tracestate string }

// WithTraceContext returns a ctx whose W3C trace context Enqueue copies into message headers.
// Use it when the caller's tracing is not OpenTelemetry; with OpenTelemetry, the span in ctx is
// used without this.
func WithTraceContext(ctx context.Context, traceparent, tracestate string) context.Context {
	return context.WithValue(ctx, traceKey{}, traceContext{traceparent, tracestate})
}

// traceHeaders returns the W3C trace context headers for ctx: an explicit WithTraceContext
// wins, then an OpenTelemetry span context.
func traceHeaders(ctx context.Context) []Header {
	if tc, ok := ctx.Value(traceKey{}).(traceContext); ok && tc.traceparent != "" {
		h := []Header{{Key: HeaderTraceparent, Value: []byte(tc.traceparent)}}
		if tc.tracestate != "" {
			h = append(h, Header{Key: HeaderTracestate, Value: []byte(tc.tracestate)})
		}
		return h
	}
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return nil
	}
	tp := fmt.Sprintf("00-%s-%s-%s", sc.TraceID(), sc.SpanID(), sc.TraceFlags())
	h := []Header{{Key: HeaderTraceparent, Value: []byte(tp)}}
	if ts := sc.TraceState().String(); ts != "" {
		h = append(h, Header{Key: HeaderTracestate, Value: []byte(ts)})
	}
	return h
}

func validate(m *Message) error {
	if m.Topic == "" {
		return errors.New("outbox message: topic is empty")
	}
	if len(m.Topic) > MaxTopicLength {
		return fmt.Errorf("outbox message: topic is %d bytes, limit %d", len(m.Topic), MaxTopicLength)
	}
	if len(m.Headers) > MaxHeaders {
		return fmt.Errorf("outbox message to %q: %d headers, limit %d", m.Topic, len(m.Headers), MaxHeaders)
	}
	for _, h := range m.Headers {
		if len(h.Key) > MaxHeaderKeySize {
			return fmt.Errorf("outbox message to %q: header key is %d bytes, limit %d", m.Topic, len(h.Key), MaxHeaderKeySize)
		}
	}
	return nil
}

// encodeHeaders packs headers into one column: uvarint count, then per header the key and the
// value each as uvarint length and bytes (value length+1, 0 meaning a nil value). One bytea
// column keeps Enqueue independent of the driver's array support.
func encodeHeaders(hs []Header) []byte {
	if len(hs) == 0 {
		return nil
	}
	n := binary.MaxVarintLen64
	for _, h := range hs {
		n += 2*binary.MaxVarintLen64 + len(h.Key) + len(h.Value)
	}
	b := make([]byte, 0, n)
	b = binary.AppendUvarint(b, uint64(len(hs)))
	for _, h := range hs {
		b = binary.AppendUvarint(b, uint64(len(h.Key)))
		b = append(b, h.Key...)
		if h.Value == nil {
			b = binary.AppendUvarint(b, 0)
			continue
		}
		b = binary.AppendUvarint(b, uint64(len(h.Value))+1)
		b = append(b, h.Value...)
	}
	return b
}

func decodeHeaders(b []byte) ([]Header, error) {
	if len(b) == 0 {
		return nil, nil
	}
	errCorrupt := errors.New("outbox headers column is corrupt")
	next := func() (uint64, bool) {
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return 0, false
		}
		b = b[n:]
		return v, true
	}
	count, ok := next()
	if !ok || count > MaxHeaders*4 {
		return nil, errCorrupt
	}
	hs := make([]Header, 0, count)
	for range count {
		kl, ok := next()
		if !ok || kl > uint64(len(b)) {
			return nil, errCorrupt
		}
		k := string(b[:kl])
		b = b[kl:]
		vl, ok := next()
		if !ok || (vl > 0 && vl-1 > uint64(len(b))) {
			return nil, errCorrupt
		}
		var v []byte
		if vl > 0 {
			v = b[: vl-1 : vl-1]
			b = b[vl-1:]
		}
		hs = append(hs, Header{Key: k, Value: v})
	}
	return hs, nil
}
