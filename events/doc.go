// Package events is jetmail's event log: one record per reception,
// rejection, duplicate suppressed, delivery result, notice queued and
// administrator action, shared by the whole cluster in the JetStream stream
// JETMAIL_EVENTS, so that a report (`jetmail report`) or a tail (`jetmail
// events --follow`) covers every pod.
//
// # No write per message
//
// The queue spends one fsynced JetStream write per message; the event log
// must not add another. A Log keeps the events of its process in memory and
// publishes them as one JetStream message per batch: every second, or
// sooner when MaxBatch events (default 1,000) are waiting, as gzipped JSON
// lines on subject jetmail.events.<pod>. At a thousand messages a second,
// that is one write a second instead of several thousand.
//
// # What a crash loses, and why that is acceptable
//
// Events are not mail. A pod that dies loses the batch it had not
// published yet: at most about one second of its events (plus whatever a
// publish still retrying held). A report is then a little short; no
// message is lost, delayed or sent twice, since the queue and the delivery
// state never depend on the event log. For the same reason Emit never
// blocks the mail path: when the buffer is full (NATS away for longer than
// the buffer lasts), events are dropped and counted in
// jetmail_events_dropped_total, and a batch that cannot be published after
// a few tries is dropped with a log line and counted the same way.
//
// # Retention
//
// The stream is a limits stream: it keeps events for MaxAge (default 7
// days) and at most MaxBytes (default 1 GiB), discarding the oldest first.
package events
