package outbox

import (
	"context"
	"errors"
	"fmt"

	"github.com/segmentio/kafka-go"
)

// javaPartitioner places keyed messages as the Java client's default partitioner does:
// positive(murmur2(key)) % partitions. Messages without a key go to a random partition.
var javaPartitioner = kafka.Murmur2Balancer{}

// plannedBalancer sends each message to the partition the relay planned for it (carried in
// WriterData), so that the relay's per-partition budget matches what the writer sends.
type plannedBalancer struct{}

func (plannedBalancer) Balance(msg kafka.Message, partitions ...int) int {
	if p, ok := msg.WriterData.(int); ok {
		for _, q := range partitions {
			if q == p {
				return p
			}
		}
	}
	// The partition count changed since planning: fall back to the same hash.
	return javaPartitioner.Balance(msg, partitions...)
}

// PartitionFor returns the partition the relay (and the Java client) chooses for key among n
// partitions. A nil key has no fixed partition.
func PartitionFor(key []byte, n int) int {
	ps := make([]int, n)
	for i := range ps {
		ps[i] = i
	}
	return javaPartitioner.Balance(kafka.Message{Key: key}, ps...)
}

// estimateSize is an upper bound of kafka-go's own accounting of a message against
// Writer.BatchBytes (record fields, varint lengths at their widest).
func estimateSize(m *kafka.Message) int {
	n := 27 + len(m.Key) + len(m.Value)
	for _, h := range m.Headers {
		n += 10 + len(h.Key) + len(h.Value)
	}
	return n
}

// temporary says whether a publish error is the broker's or the network's condition rather
// than the message's: those are retried without counting towards dead-lettering.
func temporary(err error) bool {
	var ke kafka.Error
	if errors.As(err, &ke) {
		return ke.Temporary()
	}
	var tooLarge kafka.MessageTooLargeError
	if errors.As(err, &tooLarge) {
		return false
	}
	var perm permanentError
	if errors.As(err, &perm) {
		return false
	}
	return true // network errors, timeouts, a closed writer
}

// permanentError is a failure found before sending that concerns the message itself.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

type topicPartition struct {
	topic     string
	partition int
}

// publish sends rows in order and sets each row's outcome. Rows that cannot be sent now
// without breaking their key's order (a partition's budget is spent, an earlier message of
// the key failed or waits) are left unsent for the next batch.
//
// A batch goes out as one WriteMessages call holding at most one record batch per partition,
// then each suspect message (one that failed before) on its own, so that a message the broker
// refuses is found and counted alone, without charging its neighbours.
func (r *Relay) publish(ctx context.Context, rows []*outRow) {
	topicSet := map[string]bool{}
	var topics []string
	for _, o := range rows {
		if !topicSet[o.topic] {
			topicSet[o.topic] = true
			topics = append(topics, o.topic)
		}
	}
	meta, err := r.client.Metadata(ctx, &kafka.MetadataRequest{Topics: topics})
	if err != nil {
		for _, o := range rows {
			o.err = fmt.Errorf("topic metadata: %w", err)
		}
		return
	}
	counts := map[string]int{}
	topicErr := map[string]error{}
	for _, t := range meta.Topics {
		if t.Error != nil {
			topicErr[t.Name] = t.Error
		} else {
			counts[t.Name] = len(t.Partitions)
		}
	}
	for _, t := range topics {
		if _, ok := counts[t]; !ok && topicErr[t] == nil {
			topicErr[t] = kafka.UnknownTopicOrPartition
		}
	}

	type budget struct {
		count, bytes int
		closed       bool
	}
	budgets := map[topicPartition]*budget{}
	blocked := map[string]bool{}  // keys whose remaining rows wait for a later batch
	inNormal := map[string]bool{} // keys with a row in the main call
	perTP := map[topicPartition]int{}
	var normal, solos []*outRow
	block := func(o *outRow) {
		if k := o.keyID(); k != "" {
			blocked[k] = true
		}
	}
	for _, o := range rows {
		k := o.keyID()
		if k != "" && blocked[k] {
			continue
		}
		if err := topicErr[o.topic]; err != nil {
			// The topic is missing or refused: this message's own failure, counted.
			o.err = permanentError{fmt.Errorf("topic %q: %w", o.topic, err)}
			o.counted = true
			block(o)
			continue
		}
		hs, err := decodeHeaders(o.headers)
		if err != nil {
			o.err = permanentError{err}
			o.counted = true
			block(o)
			continue
		}
		hs = append(hs, Header{Key: HeaderMessageID, Value: []byte(o.msgID.String())}, Header{Key: HeaderSource, Value: []byte(r.n.source)})
		khs := make([]kafka.Header, len(hs))
		for i, h := range hs {
			khs[i] = kafka.Header{Key: h.Key, Value: h.Value}
		}
		o.msg = kafka.Message{Topic: o.topic, Key: o.key, Value: o.value, Headers: khs, Time: o.createdAt}
		size := estimateSize(&o.msg)
		if size > r.cfg.MaxBatchBytes {
			o.err = permanentError{fmt.Errorf("message to %q is %d bytes, limit %d (max batch bytes)", o.topic, size, r.cfg.MaxBatchBytes)}
			o.counted = true
			block(o)
			continue
		}
		ps := make([]int, counts[o.topic])
		for i := range ps {
			ps[i] = i
		}
		p := javaPartitioner.Balance(o.msg, ps...)
		o.msg.WriterData = p
		if o.lastError != nil {
			if k != "" && inNormal[k] {
				block(o)
				continue
			}
			solos = append(solos, o)
			block(o) // the key's later rows wait for the suspect's outcome
			continue
		}
		tp := topicPartition{o.topic, p}
		b := budgets[tp]
		if b == nil {
			b = &budget{}
			budgets[tp] = b
		}
		if b.closed || b.count+1 > r.cfg.BatchSize || b.bytes+size > r.cfg.MaxBatchBytes {
			b.closed = true
			block(o)
			continue
		}
		b.count++
		b.bytes += size
		perTP[tp]++
		normal = append(normal, o)
		if k != "" {
			inNormal[k] = true
		}
	}

	if len(normal) > 0 {
		msgs := make([]kafka.Message, len(normal))
		for i, o := range normal {
			msgs[i] = o.msg
		}
		errs := r.write(ctx, msgs)
		for i, o := range normal {
			o.sent = true
			o.err = errs[i]
			// A refusal of a record batch that held only this message is this message's own.
			if o.err != nil && !temporary(o.err) && perTP[topicPartition{o.topic, o.msg.WriterData.(int)}] == 1 {
				o.counted = true
			}
		}
	}
	for _, o := range solos {
		o.sent = true
		o.err = r.write(ctx, []kafka.Message{o.msg})[0]
		if o.err != nil && !temporary(o.err) {
			o.counted = true
		}
	}
}

// write sends msgs synchronously and returns one error per message.
func (r *Relay) write(ctx context.Context, msgs []kafka.Message) []error {
	errs := make([]error, len(msgs))
	err := r.writer.WriteMessages(ctx, msgs...)
	if err == nil {
		return errs
	}
	var werrs kafka.WriteErrors
	if errors.As(err, &werrs) && len(werrs) == len(msgs) {
		copy(errs, werrs)
		return errs
	}
	for i := range errs {
		errs[i] = err
	}
	return errs
}

// publishDeadLetters sends the dead messages to the dead-letter topic, one at a time (a rare
// path), and returns the failures. A temporary failure keeps the message in the outbox to be
// dead-lettered on a later attempt; a permanent one (the message is too large for the topic
// too) is noted in the dead-letter table instead.
func (r *Relay) publishDeadLetters(ctx context.Context, dead []*outRow) map[*outRow]error {
	failed := map[*outRow]error{}
	for _, o := range dead {
		hs, _ := decodeHeaders(o.headers)
		m := kafka.Message{Topic: r.cfg.DeadLetterTopic, Key: o.key, Value: o.value, Time: o.createdAt}
		for _, h := range hs {
			m.Headers = append(m.Headers, kafka.Header{Key: h.Key, Value: h.Value})
		}
		m.Headers = append(m.Headers,
			kafka.Header{Key: HeaderMessageID, Value: []byte(o.msgID.String())},
			kafka.Header{Key: HeaderSource, Value: []byte(r.n.source)},
			kafka.Header{Key: HeaderDeadLetterError, Value: []byte(o.err.Error())},
			kafka.Header{Key: HeaderDeadLetterTopic, Value: []byte(o.topic)})
		if size := estimateSize(&m); size > r.cfg.MaxBatchBytes {
			failed[o] = permanentError{fmt.Errorf("message is %d bytes, limit %d", size, r.cfg.MaxBatchBytes)}
			continue
		}
		if err := r.write(ctx, []kafka.Message{m})[0]; err != nil {
			failed[o] = err
		}
	}
	return failed
}
