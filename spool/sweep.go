package spool

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// SweepBodies deletes the chunks of bodies that no queued mail refers to
// and whose transmission began more than olderThan ago: what a gateway
// that died between writing a body and publishing its envelope, or a
// deliverer that died between completing a mail and deleting its body,
// left behind. olderThan must exceed the longest SMTP session (the
// gateways' session deadline), so a body still arriving is never taken
// for an orphan. It returns how many bodies it deleted.
//
// It reads only the headers of the queue, and only when some body is old
// enough to be an orphan; several processes may sweep at once.
func (s *Spool) SweepBodies(ctx context.Context, olderThan time.Duration, now time.Time) (int, error) {
	info, err := s.bodies.Info(ctx, jetstream.WithSubjectFilter(bodyPrefix+"*.0"))
	if err != nil {
		return 0, fmt.Errorf("spool: list bodies: %w", err)
	}
	old := map[string]bool{}
	for subj := range info.State.Subjects {
		id := strings.TrimSuffix(strings.TrimPrefix(subj, bodyPrefix), ".0")
		qid, _, _ := strings.Cut(id, "-")
		if t, ok := QueueIDTime(qid); ok && now.Sub(t) > olderThan {
			old[id] = true
		}
	}
	if len(old) == 0 {
		return 0, nil
	}
	if err := s.bodiesInUse(ctx, old); err != nil {
		return 0, err
	}
	n := 0
	for id := range old {
		if err := s.bodies.Purge(ctx, jetstream.WithPurgeSubject(bodyPrefix+id+".>")); err != nil {
			return n, fmt.Errorf("spool: delete orphan body %s: %w", id, err)
		}
		n++
	}
	return n, nil
}

// bodiesInUse removes from ids every body a queued envelope refers to. An
// envelope without HeaderBodyID makes it fail: nothing is known to be
// unused then.
func (s *Spool) bodiesInUse(ctx context.Context, ids map[string]bool) error {
	return s.walkQueue(ctx, true, func(raw jetstream.Msg, md *jetstream.MsgMetadata) error {
		h := raw.Headers()
		if h.Get(HeaderTombstone) != "" {
			return nil
		}
		id := h.Get(HeaderBodyID)
		if id == "" {
			return fmt.Errorf("spool: envelope at sequence %d names no body; not sweeping", md.Sequence.Stream)
		}
		delete(ids, id)
		return nil
	})
}
