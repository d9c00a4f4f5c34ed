// Package spool is jetmail's queue on NATS JetStream: the one place that knows
// stream names, subjects, the envelope format, how bodies are stored and how
// the duplicate guard works. The gateway, the deliverer and the queue tools
// all go through it; none of them builds a subject by hand.
//
// # Layout
//
//   - Stream JETMAIL_QUEUE, subjects jetmail.queue.<key>: one message per
//     queued mail, holding the envelope (JSON) and, when it fits in one NATS
//     payload, the body. The stream keeps one message per subject.
//   - Stream JETMAIL_BODY, subjects jetmail.body.<queue id>.<n>: the body in
//     chunks, for mail too large to travel inline. Chunks are written before
//     the envelope, so an envelope never points at a body that is not there.
//   - KV bucket JETMAIL_STATE: per-message delivery state (attempts,
//     per-recipient results), written by deliverers, read by the queue tools.
//
// # Durability and writes per message
//
// Commit returns only after JetStream has acknowledged the envelope with the
// configured replication (with the embedded server's sync_interval: always,
// after an fsync). A mail that fits inline costs exactly one JetStream write:
// the envelope, body and duplicate guard are the same stored message. Larger
// mail costs one write per chunk plus one. The records of concurrent Commits
// (and tombstones of concurrent Completes) are stored together, one atomic
// batch and one sync for all of them (group commit, group.go).
//
// # The duplicate guard
//
// A retransmission (the client never saw our 250 and sends the same mail
// again, perhaps to another gateway pod) must not be queued twice. The queue
// subject of a guarded mail is derived from its fingerprint (see Fingerprint),
// and the envelope is published with Nats-Expected-Last-Subject-Sequence: 0,
// so the first writer wins cluster-wide and atomically, with no second write.
// A losing writer reads the winner's queue ID and answers with it. When a
// mail leaves the queue, Complete replaces its envelope by a small tombstone
// on the same subject that expires with the guard window (Nats-TTL), so the
// guard outlives delivery by that window.
//
// # Failure
//
// Every error from Commit is temporary from the SMTP client's point of view
// (the caller answers 451 4.3.0). Chunks written for a mail whose envelope
// was never stored are deleted on the way out; a crash in between leaves
// chunks that no envelope references, which no deliverer ever reads.
package spool
