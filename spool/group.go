package spool

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"
)

// Group commit: the queue records of concurrent Commits (and the
// tombstones of concurrent Completes) share one write; so do concurrent
// writes to the state bucket (parks, claims, states), in a group of their
// own, since an atomic batch holds the messages of one stream.
//
// With fsync on every write (the embedded server's sync_interval: always),
// the disk's fsync rate caps intake: twenty sessions finishing DATA at
// once wait for twenty fsyncs in a row. Databases answer that with group
// commit, and so does the spool: while one record (or batch) is being
// stored, the records that arrive queue up, and the next write takes all
// of them as one JetStream atomic batch. nats-server stores an atomic
// batch of a single-replica file stream with one sync for the whole batch
// (and a replicated stream as one Raft entry), and applies each record's
// conditions (the duplicate guard's expected subject sequence, the
// message ID) as for a single publish, all or nothing.
//
// There is no goroutine of its own: the first Commit to find nobody
// writing leads, stores the batch it finds queued (its own record first),
// hands the lead to the next one waiting and returns. So a lone session
// pays nothing, and a batch grows with the number of sessions waiting.
//
// A batch that fails, for any reason (one retransmission among them hits
// the duplicate guard, the stream is full, the server did not answer in
// time), changes nothing on its own: each of its records is then stored
// alone, on the single-record path with its retries, message ID and
// duplicate handling. A batch whose fate is unknown (a timeout) is safe
// to follow that way: a record the batch did store answers its retry as
// "wrong last sequence" with its own body ID, which Commit takes as
// stored (see Commit).
const (
	// groupMax and groupMaxBytes bound one batch.
	groupMax      = 64
	groupMaxBytes = 8 << 20
	// groupMin is the smallest batch sent as an atomic batch. A batch is
	// staged on the server before its commit, in a store of its own that
	// is synced too, so two records gain nothing from it; they are
	// stored one by one, concurrently.
	groupMin = 3
	// groupLimit is nats-server's default limit on an atomic batch.
	groupLimit = 1000
)

// errGroupFailed marks a record whose batch failed: store it alone.
var errGroupFailed = errors.New("spool: group commit failed")

type groupCommit struct {
	mu      sync.Mutex
	queue   []*groupReq
	leading bool
}

type groupReq struct {
	ctx context.Context
	// msg carries its conditions as headers (see conditioned).
	msg   *nats.Msg
	size  int
	ack   *jetstream.PubAck
	batch int
	err   error
	// done says true to the request that leads next, false to one whose
	// result is in.
	done chan bool
}

// conditioned is a copy of msg with the headers of a publish to stream:
// stored only if the subject's last sequence is *expect (0: the subject is
// empty) when expect is set, with msgID for deduplication and ttl when
// they are set.
func conditioned(msg *nats.Msg, stream, msgID string, expect *uint64, ttl time.Duration) *nats.Msg {
	m := *msg
	m.Header = make(nats.Header, len(msg.Header)+4)
	for k, v := range msg.Header {
		m.Header[k] = v
	}
	if msgID != "" {
		m.Header.Set(jetstream.MsgIDHeader, msgID)
	}
	m.Header.Set(jetstream.ExpectedStreamHeader, stream)
	if expect != nil {
		m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(*expect, 10))
	}
	if ttl > 0 {
		m.Header.Set(jetstream.MsgTTLHeader, ttl.String())
	}
	return &m
}

// store writes msg (a queue record, stored only if its subject is empty)
// together with the records of concurrent Commits; batch is how many
// records shared the write. It falls back to storing msg alone (publish).
func (s *Spool) store(ctx context.Context, msg *nats.Msg, msgID string) (ack *jetstream.PubAck, batch int, err error) {
	var empty uint64
	ack, batch, ok, err := s.groupWrite(ctx, QueueStream, msg, msgID, &empty, 0)
	if ok {
		return ack, batch, err
	}
	ack, err = s.publish(ctx, msg, msgID)
	return ack, 1, err
}

// fallBack tells the errors of a grouped write after which the record is
// stored alone: its batch failed, or its fate is unknown.
func fallBack(err error) bool {
	return errors.Is(err, errGroupFailed) || isTemporaryPublishError(err)
}

// grouped writes msg to stream, conditioned as conditioned says, with
// the writes of concurrent callers (the queue's group, or the state
// bucket's). ok is false when the caller must write msg alone itself: group
// commit is off, its batch failed, or its fate is unknown. A conditional
// write that finds another record in place fails its batch, so it is
// always told on the caller's own path.
func (s *Spool) grouped(ctx context.Context, stream string, msg *nats.Msg, expect *uint64, ttl time.Duration) (ack *jetstream.PubAck, ok bool, err error) {
	ack, _, ok, err = s.groupWrite(ctx, stream, msg, "", expect, ttl)
	return ack, ok, err
}

// groupWrite is grouped with a message ID, and tells how many records
// shared the write.
func (s *Spool) groupWrite(ctx context.Context, stream string, msg *nats.Msg, msgID string, expect *uint64, ttl time.Duration) (ack *jetstream.PubAck, batch int, ok bool, err error) {
	if s.cfg.GroupCommit <= 1 {
		return nil, 0, false, nil
	}
	g := &s.group
	if stream != QueueStream {
		g = &s.stateGroup
	}
	ack, batch, err = g.commit(s, ctx, conditioned(msg, stream, msgID, expect, ttl))
	if cerr := ctx.Err(); err != nil && cerr != nil {
		// Given up: whatever the batch said may be another record's
		// error.
		return nil, 0, true, errors.Join(cerr, err)
	}
	if err != nil && fallBack(err) {
		return nil, 0, false, nil
	}
	return ack, batch, true, err
}

func (g *groupCommit) commit(s *Spool, ctx context.Context, msg *nats.Msg) (*jetstream.PubAck, int, error) {
	r := &groupReq{ctx: ctx, msg: msg, size: len(msg.Data) + len(msg.Subject) + 256, done: make(chan bool, 1)}
	g.mu.Lock()
	g.queue = append(g.queue, r)
	if g.leading {
		g.mu.Unlock()
		// Bounded, though not by ctx: the batch this request is in
		// ends within PublishTimeout/3, and so does every batch before
		// it. A request whose ctx ended meanwhile is not sent.
		if lead := <-r.done; !lead {
			return r.ack, r.batch, r.err
		}
		g.mu.Lock()
	}
	g.leading = true
	// This request is the first queued: take it and what follows.
	n, size := 0, 0
	for n < len(g.queue) && n < s.cfg.GroupCommit && (n == 0 || size+g.queue[n].size <= groupMaxBytes) {
		size += g.queue[n].size
		n++
	}
	batch := make([]*groupReq, n)
	copy(batch, g.queue)
	g.queue = append(g.queue[:0], g.queue[n:]...)
	g.mu.Unlock()

	defer func() {
		// Even if the write panicked: the others must not wait forever.
		g.mu.Lock()
		if len(g.queue) > 0 {
			g.queue[0].done <- true
		} else {
			g.leading = false
		}
		g.mu.Unlock()
		for _, o := range batch[1:] {
			o.done <- false
		}
	}()
	s.writeGroup(batch)
	return r.ack, r.batch, r.err
}

// writeGroup stores the records of batch, setting each one's result.
func (s *Spool) writeGroup(batch []*groupReq) {
	live := batch[:0:0]
	for _, r := range batch {
		if err := r.ctx.Err(); err != nil {
			// Its caller gave up while it waited: never sent.
			r.err = err
			continue
		}
		live = append(live, r)
	}
	if len(live) < groupMin {
		var wg sync.WaitGroup
		for _, r := range live {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(r.ctx, s.cfg.PublishTimeout/3)
				defer cancel()
				r.ack, r.err = s.js.PublishMsg(ctx, r.msg, jetstream.WithRetryAttempts(0))
				r.batch = 1
			})
		}
		wg.Wait()
		return
	}
	msgs := make([]*nats.Msg, len(live))
	for i, r := range live {
		msgs[i] = r.msg
	}
	// The batch's own deadline: not the leader's context, whose end would
	// fail the others' records with it.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(live[0].ctx), s.cfg.PublishTimeout/3)
	defer cancel()
	ack, err := jetstreamext.PublishMsgBatch(ctx, s.js, msgs, jetstreamext.BatchFlowControl{AckFirst: false})
	for i, r := range live {
		if err != nil {
			// Flattened: the batch's error may be another record's
			// (a conflict), which this one's caller must not take
			// for its own.
			if isTemporaryPublishError(err) {
				// Fate unknown (no conflict in it): kept, so that a
				// Commit keeps the body of a record that may be stored.
				r.err = fmt.Errorf("%w: %w", errGroupFailed, err)
			} else {
				r.err = fmt.Errorf("%w: %v", errGroupFailed, err)
			}
			continue
		}
		// An atomic batch is stored contiguously; the ack names its last.
		r.ack = &jetstream.PubAck{Stream: ack.Stream, Domain: ack.Domain, Sequence: ack.Sequence - uint64(len(live)-1-i)}
		r.batch = len(live)
	}
}
