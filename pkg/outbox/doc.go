// Package outbox is the transactional outbox: a service writes its business rows and its
// outgoing Kafka messages in one local transaction, and a relay moves the committed messages
// to Kafka, at least once and in order per key.
//
// # Writing messages
//
// Run Migrate (or `outbox-relay migrate`) once, then in the business transaction:
//
//	err := outbox.Enqueue(ctx, tx, outbox.Message{Topic: "orders", Key: []byte(orderID), Value: payload})
//
// EnqueueSQL does the same for database/sql. A rolled-back transaction leaves no message. Each
// message gets a stable id (UUIDv7) and the W3C trace context of ctx in its headers.
//
// # Relaying
//
// A Relay (run by cmd/outbox-relay) reads committed rows in the order of their writing
// transaction ids, only below the snapshot's xmin, so a transaction that commits late is never
// skipped; it publishes with acknowledgement from all in-sync replicas, partitions by key as
// the Java client does (murmur2), and marks or deletes the rows. Keys hash into slots; each slot
// is leased to one relay at a time (leases from the database clock, fenced by an epoch), so
// several relays share a table without breaking the order of any key.
//
// # Failures
//
// A broker that is down is retried with backoff; the backlog waits in the table. A message the
// broker refuses is retried on its own and, after MaxAttempts, moved to a dead-letter table
// (and topic); DeadLetterPolicy says whether later messages of its key wait for an operator
// (BlockKey, the default) or go ahead (SkipAhead). See DeadLetters for the operator's side.
//
// # Consuming
//
// Delivery is at least once. Inbox.Process records each message id in the consumer's own
// transaction and skips ids already applied, so a consumer applies each message once.
package outbox
