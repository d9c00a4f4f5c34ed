package events

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrNoStream is the readers' answer when the server has no event log.
var ErrNoStream = errors.New("events: no event log on this NATS server (stream " + Stream + " not found): has a gateway, a deliverer or jetmail serve of this version run against it?")

// lookBack is how much earlier than the first event wanted a read starts
// in the stream: an event is stored with its batch, up to Interval (and a
// few publish tries) after it happened.
const lookBack = time.Minute

// Read calls fn for every event with from <= Time < to, batch by batch in
// the order the batches were stored (each pod's events in order; pods
// interleaved by second). It reads through a short-lived consumer of its
// own, deleted when it returns: no durable consumer is left behind.
func Read(ctx context.Context, js jetstream.JetStream, from, to time.Time, fn func(Event) error) error {
	s, err := js.Stream(ctx, Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return ErrNoStream
	}
	if err != nil {
		return fmt.Errorf("events: stream %s: %w", Stream, err)
	}
	last := s.CachedInfo().State.LastSeq
	if s.CachedInfo().State.Msgs == 0 {
		return nil
	}
	start := from.Add(-lookBack)
	c, err := s.CreateConsumer(ctx, jetstream.ConsumerConfig{
		AckPolicy:         jetstream.AckNonePolicy,
		DeliverPolicy:     jetstream.DeliverByStartTimePolicy,
		OptStartTime:      &start,
		MemoryStorage:     true,
		InactiveThreshold: 30 * time.Second,
	})
	if err != nil {
		return fmt.Errorf("events: read %s: %w", Stream, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = s.DeleteConsumer(dctx, c.CachedInfo().Name)
	}()
	if c.CachedInfo().NumPending == 0 {
		return nil
	}
	for ctx.Err() == nil {
		batch, err := c.Fetch(64, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return err
		}
		n := 0
		for raw := range batch.Messages() {
			n++
			md, err := raw.Metadata()
			if err != nil {
				return err
			}
			if md.Timestamp.After(to.Add(lookBack)) {
				// Stored well after the end: nothing later is wanted.
				return nil
			}
			evs, err := Decode(raw.Data())
			if err != nil {
				return fmt.Errorf("%w (stream sequence %d)", err, md.Sequence.Stream)
			}
			for _, e := range evs {
				if !e.Time.Before(from) && e.Time.Before(to) {
					if err := fn(e); err != nil {
						return err
					}
				}
			}
			if md.Sequence.Stream >= last || md.NumPending == 0 {
				return nil
			}
		}
		if err := batch.Error(); err != nil {
			return err
		}
		if n == 0 {
			// Nothing more within the wait: the rest expired meanwhile.
			return nil
		}
	}
	return ctx.Err()
}

// Follow calls fn for every event stored from start on, as batches
// arrive, until ctx ends (then it returns nil) or fn fails. It reads
// through an ordered consumer, which the client library recreates if the
// server restarts.
func Follow(ctx context.Context, js jetstream.JetStream, start time.Time, fn func(Event) error) error {
	s, err := js.Stream(ctx, Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return ErrNoStream
	}
	if err != nil {
		return fmt.Errorf("events: stream %s: %w", Stream, err)
	}
	c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		DeliverPolicy:     jetstream.DeliverByStartTimePolicy,
		OptStartTime:      &start,
		InactiveThreshold: 30 * time.Second,
	})
	if err != nil {
		return fmt.Errorf("events: follow %s: %w", Stream, err)
	}
	it, err := c.Messages()
	if err != nil {
		return err
	}
	stopped := make(chan struct{})
	defer close(stopped)
	go func() {
		select {
		case <-ctx.Done():
			it.Stop()
		case <-stopped:
		}
	}()
	defer it.Stop()
	for {
		raw, err := it.Next()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return nil
			}
			return err
		}
		evs, err := Decode(raw.Data())
		if err != nil {
			return err
		}
		for _, e := range evs {
			if err := fn(e); err != nil {
				return err
			}
		}
	}
}
