package spool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// What an administrator does to queued mail (jetmail queue rm, hold,
// release, retry). Every action replaces the mail's record in the queue
// stream, with a compare-and-set on its subject's last sequence, so it
// never overwrites what a deliverer or another administrator wrote
// meanwhile (the answer is then ErrChanged: read the record again).
//
// A replacement is a new record of the same mail under the same subject:
// the stream keeps one record per subject, so the old one is deleted and
// the deliverers' consumer forgets it at once (a message waiting out the
// delay of a negative acknowledgement included), and hands the new one
// out like new mail. That is how release and retry make mail due now:
// a delay that JetStream holds cannot be shortened, but the record it
// belongs to can be replaced.
//
// The deliverers read the headers below from the record they are handed:
//
//   - held mail is never attempted (and never expires) while it is held;
//     the deliverer hands it back for an hour at a time;
//   - a replaced record is claimed before its attempt (DeliveryState.Claim),
//     like a redelivered one, so it cannot run beside an attempt of the
//     record it replaced;
//   - recipients not attempted since Jetmail-Retry-At are due at once,
//     whatever their retry time says.

// Headers of administrative actions.
const (
	// HeaderHeld is the time (RFC 3339) the mail was put on hold.
	HeaderHeld = "Jetmail-Held"
	// HeaderRetryAt is the time (RFC 3339) of a retry or release: pending
	// recipients not attempted since then are due now.
	HeaderRetryAt = "Jetmail-Retry-At"
	// HeaderRequeued marks a record that replaces an earlier one of the
	// same mail (its value is the time of the replacement).
	HeaderRequeued = "Jetmail-Requeued"
	// HeaderRemoved marks the tombstone of mail an administrator removed.
	HeaderRemoved = "Jetmail-Removed"
)

// RetryAsked tells whether an administrator asked for a retry (or a
// release) of m that recipient rs has not had yet: rs is then due at once,
// whatever its retry time says.
func (m *Message) RetryAsked(rs RcptState) bool {
	return rs.Status.Pending() && rs.LastAttempt.Before(m.RetryAt)
}

// ErrChanged is an action's answer when the mail's record changed since it
// was read: a deliverer finished it, or another action came first.
var ErrChanged = errors.New("spool: the message changed since it was read")

// ErrRemoved is Complete's answer for mail an administrator removed while
// it was in a delivery attempt.
var ErrRemoved = fmt.Errorf("%w: an administrator removed it", ErrNotQueued)

// heldPrefix is the key prefix of the markers of held mail in the state
// bucket: held.<queue ID>. They let `queue stat` count held mail without
// reading the queue; the record's header is what the deliverers obey.
const heldPrefix = "held."

// HeldMarker is the value of a held-mail marker.
type HeldMarker struct {
	QueueID string    `json:"queueId"`
	Subject string    `json:"subject"`
	Since   time.Time `json:"since"`
}

// Hold puts m on hold: no deliverer attempts it until Release. An attempt
// running now is not stopped; what it delivers stays delivered, and what
// it defers waits for the release.
func (s *Spool) Hold(ctx context.Context, m *Message, now time.Time) error {
	if err := s.replace(ctx, m, now, func(h nats.Header) {
		h.Set(HeaderHeld, now.UTC().Format(time.RFC3339Nano))
		h.Del(HeaderRetryAt)
	}); err != nil {
		return err
	}
	b, _ := json.Marshal(HeldMarker{QueueID: m.Envelope.QueueID, Subject: m.Subject, Since: now})
	if _, err := s.state.Put(ctx, heldPrefix+m.Envelope.QueueID, b); err != nil {
		return fmt.Errorf("spool: hold %s: marker: %w", m.Envelope.QueueID, err)
	}
	return nil
}

// Release takes m off hold and makes its pending recipients due now.
func (s *Spool) Release(ctx context.Context, m *Message, now time.Time) error {
	if err := s.replace(ctx, m, now, func(h nats.Header) {
		h.Del(HeaderHeld)
		h.Set(HeaderRetryAt, now.UTC().Format(time.RFC3339Nano))
	}); err != nil {
		return err
	}
	return s.dropHeldMarker(ctx, m.Envelope.QueueID)
}

// Retry makes the pending recipients of m due now.
func (s *Spool) Retry(ctx context.Context, m *Message, now time.Time) error {
	return s.replace(ctx, m, now, func(h nats.Header) {
		h.Set(HeaderRetryAt, now.UTC().Format(time.RFC3339Nano))
	})
}

// Remove deletes m from the queue: its record becomes a tombstone marked
// as removed (the duplicate guard stays for the duplicate window, so a
// retransmission of removed mail is not queued again), its body chunks
// and delivery state go. An attempt running now finds, when it records
// its outcome, that the mail was removed, says so in its log and writes
// nothing back.
func (s *Spool) Remove(ctx context.Context, m *Message, now time.Time) error {
	msg := &nats.Msg{Subject: m.Subject, Header: nats.Header{}}
	msg.Header.Set(HeaderQueueID, m.Envelope.QueueID)
	msg.Header.Set(HeaderTombstone, "1")
	msg.Header.Set(HeaderRemoved, now.UTC().Format(time.RFC3339Nano))
	_, err := s.js.PublishMsg(ctx, msg,
		jetstream.WithExpectStream(QueueStream),
		jetstream.WithExpectLastSequencePerSubject(m.Sequence),
		jetstream.WithMsgTTL(s.cfg.DuplicateWindow))
	if err != nil {
		return s.actionError("remove", m, err)
	}
	if m.Envelope.Body.Chunks > 0 {
		if err := s.bodies.Purge(ctx, jetstream.WithPurgeSubject(bodyPrefix+m.Envelope.Body.ID+".>")); err != nil {
			return fmt.Errorf("spool: remove %s: body: %w", m.Envelope.QueueID, err)
		}
	}
	// Most queued mail has no state (a deliverer writes one when an
	// attempt leaves recipients waiting): a read spares it a write.
	if st, err := s.LoadState(ctx, m.Envelope.QueueID); err != nil || st != nil {
		if err := s.ClearState(ctx, m.Envelope.QueueID); err != nil {
			return err
		}
	}
	if m.Held.IsZero() {
		return nil
	}
	return s.dropHeldMarker(ctx, m.Envelope.QueueID)
}

// replace stores m's record again, its headers changed by edit, only if it
// is still the subject's last record.
func (s *Spool) replace(ctx context.Context, m *Message, now time.Time, edit func(nats.Header)) error {
	if m.Tombstone || m.raw == nil {
		return fmt.Errorf("spool: %s: %w", m.Envelope.QueueID, ErrChanged)
	}
	h := nats.Header{}
	for k, v := range m.hdr {
		// The publisher's own headers (message ID, expectations, TTL) do
		// not carry over: the message ID would make JetStream drop the
		// new record as a duplicate of the old one.
		if !strings.HasPrefix(k, "Nats-") {
			h[k] = v
		}
	}
	edit(h)
	h.Set(HeaderRequeued, now.UTC().Format(time.RFC3339Nano))
	msg := &nats.Msg{Subject: m.Subject, Header: h, Data: m.raw}
	_, err := s.js.PublishMsg(ctx, msg,
		jetstream.WithExpectStream(QueueStream),
		jetstream.WithExpectLastSequencePerSubject(m.Sequence))
	if err != nil {
		return s.actionError("requeue", m, err)
	}
	return nil
}

func (s *Spool) actionError(what string, m *Message, err error) error {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		err = ErrChanged
	}
	return fmt.Errorf("spool: %s %s: %w", what, m.Envelope.QueueID, err)
}

// dropHeldMarker deletes the marker with a purge of its subject in the
// bucket's stream, which leaves nothing behind (a KV delete or purge
// leaves a marker of its own, which `queue stat` would count).
func (s *Spool) dropHeldMarker(ctx context.Context, qid string) error {
	if err := s.purgeSubject(ctx, "KV_"+StateBucket, stateSubject(heldPrefix+qid)); err != nil {
		return fmt.Errorf("spool: release %s: marker: %w", qid, err)
	}
	return nil
}

// StillQueued tells whether m's record is still the last of its subject:
// false once it was completed, removed or replaced. A deliverer asks
// after saving a deferred outcome, so that the state of mail removed
// during the attempt does not outlive it.
func (s *Spool) StillQueued(ctx context.Context, m *Message) (queued, removed bool, err error) {
	hdr, _, _, err := s.leaderGet(ctx, QueueStream, m.Subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, false, nil
	}
	if err != nil {
		return false, false, err
	}
	if hdr.Get(HeaderQueueID) != m.Envelope.QueueID {
		return false, false, nil
	}
	if hdr.Get(HeaderTombstone) != "" {
		return false, hdr.Get(HeaderRemoved) != "", nil
	}
	return true, false, nil
}

func parseHeaderTime(v string) time.Time {
	if v == "" {
		return time.Time{}
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		// A header that does not parse still says "held" or "retry":
		// take it as from the beginning of time rather than ignore it.
		return time.Unix(0, 0).UTC()
	}
	return t
}
