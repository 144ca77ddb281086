package outbox

import (
	"time"

	"github.com/google/uuid"
)

// Observer receives the relay's events, for metrics or tests. Methods are called from the
// relay's goroutines and must not block. Embed NopObserver to implement only some of them;
// the outboxprom package implements it with Prometheus metrics.
type Observer interface {
	// BatchPublished reports messages the broker acknowledged (before they are marked sent).
	BatchPublished(b PublishedBatch)
	// PublishFailed reports messages whose publish failed. Temporary failures (broker
	// unavailable, timeouts) are retried without counting towards dead-lettering.
	PublishFailed(topic string, messages int, temporary bool, err error)
	// DeadLettered reports a message moved to the dead-letter table.
	DeadLettered(topic string, id uuid.UUID, reason string)
	// Backlog reports the unsent messages of the whole table and the age of the oldest one;
	// a growing age is the signal that messages are not leaving.
	Backlog(messages int64, oldest time.Duration)
	// Slots reports how many slots this relay holds and how many relays are live.
	Slots(owned, total, liveRelays int)
}

// PublishedBatch describes one acknowledged publish.
type PublishedBatch struct {
	Messages []PublishedMessage
	// Duration is the time spent in the produce call(s).
	Duration time.Duration
	// AckedAt is when the broker's acknowledgement arrived.
	AckedAt time.Time
}

// PublishedMessage is one acknowledged message.
type PublishedMessage struct {
	ID    uuid.UUID
	Topic string
	// CreatedAt is when Enqueue wrote the row (the database's clock).
	CreatedAt time.Time
}

// NopObserver ignores every event.
type NopObserver struct{}

func (NopObserver) BatchPublished(PublishedBatch)          {}
func (NopObserver) PublishFailed(string, int, bool, error) {}
func (NopObserver) DeadLettered(string, uuid.UUID, string) {}
func (NopObserver) Backlog(int64, time.Duration)           {}
func (NopObserver) Slots(int, int, int)                    {}
