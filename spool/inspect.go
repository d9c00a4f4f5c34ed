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

// What the queue tools read. Nothing here writes: Attach looks the
// resources up instead of creating or updating them, so a tool run with
// another idea of the limits or replicas than the gateways' changes
// nothing.

// ErrNoQueue is Attach's answer when the NATS server has no jetmail queue.
var ErrNoQueue = errors.New("spool: no jetmail queue on this NATS server (stream " + QueueStream + " not found): has a gateway or jetmail serve run against it?")

// Attach returns a spool on the existing queue resources, for tools that
// read: it creates and updates nothing. Its Config is read back from the
// queue stream.
func Attach(ctx context.Context, nc *nats.Conn) (*Spool, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	s := &Spool{nc: nc, js: js}
	s.queue, err = js.Stream(ctx, QueueStream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, ErrNoQueue
	}
	if err != nil {
		return nil, fmt.Errorf("spool: stream %s: %w", QueueStream, err)
	}
	if s.bodies, err = js.Stream(ctx, BodyStream); err != nil {
		return nil, fmt.Errorf("spool: stream %s: %w", BodyStream, err)
	}
	if s.state, err = js.KeyValue(ctx, StateBucket); err != nil {
		return nil, fmt.Errorf("spool: bucket %s: %w", StateBucket, err)
	}
	qc := s.queue.CachedInfo().Config
	s.cfg = DefaultConfig()
	s.cfg.Replicas, s.cfg.Storage, s.cfg.MaxQueueBytes = qc.Replicas, qc.Storage, qc.MaxBytes
	s.cfg.MaxBodyBytes = s.bodies.CachedInfo().Config.MaxBytes
	s.inlineMax = int(min(nc.MaxPayload()-64<<10, 4<<20))
	return s, nil
}

// QueueStats is what the queue's stream and consumer information tell
// without reading any message: the figures of `jetmail queue stat`.
type QueueStats struct {
	// Records is the number of records in the queue stream: queued mail
	// plus the tombstones that keep the duplicate guard of mail that left.
	Records uint64
	// QueueBytes and BodyBytes are the stored sizes of the queue stream
	// (envelopes, inline bodies, tombstones) and of the body stream.
	QueueBytes, BodyBytes uint64
	// Consumer is false when the deliverers' consumer does not exist yet
	// (no deliverer has run): then every record is waiting for one.
	Consumer bool
	// NotHandedOut is the consumer's pending count: records no deliverer
	// has been given yet (new mail, and for a moment the tombstones of
	// mail that just left).
	NotHandedOut uint64
	// HandedOut is the consumer's acknowledgement-pending count: mail in
	// an attempt now or waiting for its next one.
	HandedOut uint64
	// Redelivered is how many of HandedOut were handed out more than once.
	Redelivered uint64
	// HandedUpTo is the last queue sequence handed to a deliverer.
	HandedUpTo uint64
	// States is the number of records in the delivery-state bucket: mail
	// whose attempt left recipients waiting (or that a redelivery
	// claimed), plus, for a minute, the deletion markers of states of
	// mail that left the queue.
	States uint64
	// Oldest is the queue ID of the first record not acknowledged by the
	// deliverers (by stream sequence), "" when none.
	Oldest string
	// Held is the number of held-mail markers (see Spool.Hold): mail on
	// hold, which the deliverers hold too (HandedOut counts it).
	Held uint64
}

// ByState splits the queued mail by state, as the cluster gauges and
// `jetmail queue stat` count it: new is not handed to a deliverer yet;
// held (Held) is taken out of the handed-out mail first; deferred is the
// delivery states (an estimate: a state outlives its mail by a minute).
// Deferred mail is either in the consumer (a short wait, a negative
// acknowledgement) or parked (acknowledged, see park.go): the states
// beyond every record the consumer holds are taken for parked mail, the
// others for handed-out mail. Active is what is left of the handed-out
// mail, in an attempt now or due.
func (st *QueueStats) ByState() (newMail, active, deferred, held uint64) {
	parked := st.States - min(st.States, st.NotHandedOut+st.HandedOut)
	held = min(st.Held, st.HandedOut)
	rest := st.HandedOut - held
	waiting := min(st.States-parked, rest)
	return st.NotHandedOut, rest - waiting, waiting + parked, held
}

// Messages is the queued mail: the sum of ByState.
func (st *QueueStats) Messages() uint64 {
	n, a, d, h := st.ByState()
	return n + a + d + h
}

// Stats reads QueueStats from the queue, body and state streams and the
// deliverers' consumer: a handful of requests, whatever the queue holds.
func (s *Spool) Stats(ctx context.Context) (*QueueStats, error) {
	qi, err := s.queue.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("spool: stream %s: %w", QueueStream, err)
	}
	bi, err := s.bodies.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("spool: stream %s: %w", BodyStream, err)
	}
	ks, err := s.js.Stream(ctx, "KV_"+StateBucket)
	if err != nil {
		return nil, fmt.Errorf("spool: bucket %s: %w", StateBucket, err)
	}
	st := &QueueStats{
		Records:    qi.State.Msgs,
		QueueBytes: qi.State.Bytes,
		BodyBytes:  bi.State.Bytes,
		States:     ks.CachedInfo().State.Msgs,
	}
	from := qi.State.FirstSeq
	ci, err := s.queue.Consumer(ctx, DeliveryConsumerName)
	switch {
	case errors.Is(err, jetstream.ErrConsumerNotFound):
		st.NotHandedOut = qi.State.Msgs
	case err != nil:
		return nil, fmt.Errorf("spool: consumer %s: %w", DeliveryConsumerName, err)
	default:
		info := ci.CachedInfo()
		st.Consumer = true
		st.NotHandedOut = info.NumPending
		st.HandedOut = uint64(info.NumAckPending)
		st.Redelivered = uint64(info.NumRedelivered)
		st.HandedUpTo = info.Delivered.Stream
		from = info.AckFloor.Stream + 1
	}
	if st.States > 0 {
		// Parked mail is acknowledged: the oldest may lie below the ack
		// floor. The stream's first record is the oldest not woken since
		// (unless more than a few tombstones come first).
		st.Oldest, _ = s.firstQueued(ctx, qi.State.FirstSeq)
	}
	if st.Oldest == "" && st.NotHandedOut+st.HandedOut > 0 {
		st.Oldest, _ = s.firstQueued(ctx, from)
	}
	// Held mail: the number of marker subjects, from the stream info.
	hi, err := ks.Info(ctx, jetstream.WithSubjectFilter("$KV."+StateBucket+"."+heldPrefix+">"))
	if err != nil {
		return nil, fmt.Errorf("spool: bucket %s: %w", StateBucket, err)
	}
	st.Held = uint64(len(hi.State.Subjects))
	// The markers live in the state bucket too, and so do leases.
	li, err := ks.Info(ctx, jetstream.WithSubjectFilter("$KV."+StateBucket+"."+leasePrefix+">"))
	if err != nil {
		return nil, fmt.Errorf("spool: bucket %s: %w", StateBucket, err)
	}
	st.States -= min(st.States, st.Held+uint64(len(li.State.Subjects)))
	return st, nil
}

// firstQueued returns the queue ID and sequence of the first envelope at
// or after sequence from, skipping tombstones (a few: acknowledged ones
// are skipped by starting at the ack floor).
func (s *Spool) firstQueued(ctx context.Context, from uint64) (string, uint64) {
	for try := 0; try < 64; try++ {
		raw, err := s.queue.GetMsg(ctx, from, jetstream.WithGetMsgSubject(queuePrefix+">"))
		if err != nil {
			return "", 0
		}
		if raw.Header.Get(HeaderTombstone) == "" {
			return raw.Header.Get(HeaderQueueID), raw.Sequence
		}
		from = raw.Sequence + 1
	}
	return "", 0
}

// ScanFrom is Scan starting at queue stream sequence seq (Message.Sequence;
// 0 is the start): a listing goes on after the last sequence it showed.
// What left the queue or expired during the walk is simply not listed.
func (s *Spool) ScanFrom(ctx context.Context, seq uint64, fn func(*Message) error) error {
	err := s.walk(ctx, s.queue, walkFrom{seq: seq}, func(raw jetstream.Msg, md *jetstream.MsgMetadata) error {
		m, err := decode(raw.Subject(), md.Sequence.Stream, raw.Headers(), raw.Data())
		if err != nil {
			return err
		}
		if m.Tombstone {
			return nil
		}
		return fn(m)
	})
	if errors.Is(err, errWalkIncomplete) {
		return nil
	}
	return err
}

// ErrNoSuchMessage is Find's answer for a queue ID that is not queued.
var ErrNoSuchMessage = errors.New("spool: no such message in the queue")

// findSkew is how long before the time in its queue ID a mail may have
// been stored: the gateways' and the NATS servers' clocks differ a little.
const findSkew = 10 * time.Minute

// Find returns the queued mail with queue ID qid. A mail without a
// Message-ID is stored under its queue ID and found with one read; a
// guarded one is stored under its fingerprint, and is looked for in the
// queue's headers from the time its queue ID says on (it cannot have been
// stored much before its ID was minted).
func (s *Spool) Find(ctx context.Context, qid string) (*Message, error) {
	if !ValidQueueID(qid) {
		return nil, fmt.Errorf("spool: %q is not a queue ID (14 characters of Crockford base32)", qid)
	}
	m, err := s.Get(ctx, queueSubject("q"+qid))
	switch {
	case err == nil && !m.Tombstone:
		return m, nil
	case err == nil:
		return nil, fmt.Errorf("%s: %w (it left the queue)", qid, ErrNoSuchMessage)
	case !errors.Is(err, jetstream.ErrMsgNotFound):
		return nil, err
	}
	t, _ := QueueIDTime(qid)
	errFound := errors.New("found")
	subject := ""
	err = s.walk(ctx, s.queue, walkFrom{start: t.Add(-findSkew), headersOnly: true}, func(raw jetstream.Msg, _ *jetstream.MsgMetadata) error {
		h := raw.Headers()
		if h.Get(HeaderQueueID) == qid && h.Get(HeaderTombstone) == "" {
			subject = raw.Subject()
			return errFound
		}
		return nil
	})
	if subject == "" {
		if err != nil && !errors.Is(err, errWalkIncomplete) {
			return nil, err
		}
		return nil, fmt.Errorf("%s: %w", qid, ErrNoSuchMessage)
	}
	m, err = s.Get(ctx, subject)
	if err != nil {
		return nil, err
	}
	if m.Tombstone || m.Envelope.QueueID != qid {
		return nil, fmt.Errorf("%s: %w (it left the queue)", qid, ErrNoSuchMessage)
	}
	return m, nil
}

// States calls fn for every delivery state stored, in the order they were
// last written: one read of the state bucket, not one request per message.
func (s *Spool) States(ctx context.Context, fn func(*DeliveryState) error) error {
	ks, err := s.js.Stream(ctx, "KV_"+StateBucket)
	if err != nil {
		return fmt.Errorf("spool: bucket %s: %w", StateBucket, err)
	}
	err = s.walk(ctx, ks, walkFrom{lastPerSubject: true}, func(raw jetstream.Msg, md *jetstream.MsgMetadata) error {
		if op := raw.Headers().Get("KV-Operation"); op == "DEL" || op == "PURGE" {
			return nil
		}
		if strings.Contains(strings.TrimPrefix(raw.Subject(), "$KV."+StateBucket+"."), ".") {
			return nil // held.<id>, lease.<name>
		}
		var st DeliveryState
		if err := json.Unmarshal(raw.Data(), &st); err != nil {
			return fmt.Errorf("spool: decode state at %s: %w", raw.Subject(), err)
		}
		st.revision = md.Sequence.Stream
		st.park = parkFrom(st.QueueID, raw.Headers())
		st.record = recordOf(raw.Headers())
		return fn(&st)
	})
	if errors.Is(err, errWalkIncomplete) {
		return nil
	}
	return err
}
