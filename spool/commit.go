package spool

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Result is the outcome of a Commit.
type Result struct {
	// QueueID is the queue ID to give the client: the new mail's, or for a
	// duplicate the original's.
	QueueID string
	// Duplicate is set when the mail was already queued (or recently
	// delivered) and was not stored again.
	Duplicate bool
	// Sequence is the queue stream sequence of the stored (or original)
	// envelope.
	Sequence uint64
	// Batch is how many queue records were stored in the same write as
	// this one (group commit, group.go); 0 when nothing was stored.
	Batch int
}

// Message is a queued mail as stored.
type Message struct {
	Envelope Envelope
	// Subject and Sequence locate the envelope in the queue stream.
	Subject  string
	Sequence uint64
	// Tombstone is set when the mail has left the queue and only its
	// duplicate-guard record remains; Removed when an administrator
	// removed it.
	Tombstone, Removed bool
	// Held is when the mail was put on hold (zero: not held), RetryAt
	// the time of the last retry or release, Requeued the time this
	// record replaced an earlier one of the same mail (see admin.go).
	Held, RetryAt, Requeued time.Time

	inline []byte
	// hdr and raw are the record as stored, for a replacement.
	hdr nats.Header
	raw []byte
}

// Commit stores env with body durably. guard is the duplicate-guard
// fingerprint (see Fingerprint), or "" for mail that must not be guarded.
// It returns after JetStream has acknowledged the envelope: only then may the
// caller answer 250. On an error the mail was not queued, unless the error
// is a timeout: then its fate is unknown (it may have been stored just as
// the server stalled), and a retransmission of a guarded mail finds it.
func (s *Spool) Commit(ctx context.Context, env *Envelope, body *Body, guard string) (Result, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.PublishTimeout)
	defer cancel()
	ref, inline, err := body.finish()
	if err != nil {
		body.Discard()
		return Result{}, err
	}
	env.Body = ref
	head, err := json.Marshal(env)
	if err != nil {
		body.Discard()
		return Result{}, fmt.Errorf("spool: encode envelope %s: %w", env.QueueID, err)
	}
	payload := make([]byte, 0, len(head)+1+len(inline))
	payload = append(payload, head...)
	payload = append(payload, '\n')
	payload = append(payload, inline...)

	key := "q" + env.QueueID
	if guard != "" {
		key = "g" + guard
	}
	msg := &nats.Msg{Subject: queueSubject(key), Header: nats.Header{}, Data: payload}
	msg.Header.Set(HeaderQueueID, env.QueueID)
	msg.Header.Set(HeaderBodyID, ref.ID)

	ack, batch, err := s.store(ctx, msg, ref.ID)
	if err == nil {
		return Result{QueueID: env.QueueID, Sequence: ack.Sequence, Batch: batch}, nil
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
		// Somebody stored this subject first.
		orig, gerr := s.queue.GetLastMsgForSubject(ctx, msg.Subject)
		for tries := 0; errors.Is(gerr, jetstream.ErrMsgNotFound) && tries < 3; tries++ {
			// The record that held the subject is gone already: a
			// tombstone reached the end of the duplicate window between
			// the two requests. The subject is free; store again.
			if ack, err = s.publish(ctx, msg, ref.ID); err == nil {
				return Result{QueueID: env.QueueID, Sequence: ack.Sequence, Batch: 1}, nil
			}
			orig, gerr = s.queue.GetLastMsgForSubject(ctx, msg.Subject)
		}
		if gerr != nil {
			// Whose it is is unknown, so the chunks stay: if the envelope
			// is ours they are its body; if not, the sweeper takes them.
			return Result{}, fmt.Errorf("spool: read original of duplicate %s: %w", env.QueueID, gerr)
		}
		if orig.Header.Get(HeaderBodyID) == ref.ID {
			// It was us: an earlier try of this publish was stored but its
			// acknowledgement was lost (a stream leader changed, a server
			// stalled). JetStream checks the subject before the message
			// ID, so the retry is told "wrong last sequence" instead of
			// "duplicate". The mail is queued; the body is its own.
			return Result{QueueID: env.QueueID, Sequence: orig.Sequence}, nil
		}
		body.Discard()
		if guard == "" {
			return Result{}, fmt.Errorf("spool: queue ID %s already in use", env.QueueID)
		}
		// For a guarded mail that is the original transmission.
		return Result{QueueID: orig.Header.Get(HeaderQueueID), Duplicate: true, Sequence: orig.Sequence}, nil
	}
	if !isTemporaryPublishError(err) {
		// A refusal (the stream is full, ...): nothing was stored.
		body.Discard()
	}
	// Otherwise the envelope's fate is unknown: it may have been stored
	// after all, and then its chunks are its body. They stay; if the
	// envelope never landed, the body sweeper deletes them later.
	return Result{}, fmt.Errorf("spool: publish %s: %w", env.QueueID, err)
}

// publish stores msg only if its subject is empty, retrying a publish whose
// fate is unknown with the same message ID, so the retry can never store a
// second copy: JetStream answers it with the first one's acknowledgement
// (or, the subject being taken, "wrong last sequence": see Commit). It
// tries until ctx (PublishTimeout) ends: a stream without a leader for a
// few seconds (an election after a server died) answers "no response"
// at once, and three quick tries would have given up long before the
// client's reply was due.
func (s *Spool) publish(ctx context.Context, msg *nats.Msg, msgID string) (*jetstream.PubAck, error) {
	per := s.cfg.PublishTimeout / 3
	pause := 50 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, per)
		ack, err := s.js.PublishMsg(actx, msg,
			jetstream.WithMsgID(msgID),
			jetstream.WithExpectStream(QueueStream),
			jetstream.WithExpectLastSequencePerSubject(0),
			jetstream.WithRetryAttempts(0))
		cancel()
		if err == nil {
			return ack, nil
		}
		if !isTemporaryPublishError(err) || ctx.Err() != nil {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(pause):
		}
		pause = min(2*pause, time.Second)
	}
}

// Get reads the queued mail stored under subject, for deliverers and tools.
func (s *Spool) Get(ctx context.Context, subject string) (*Message, error) {
	raw, err := s.queue.GetLastMsgForSubject(ctx, subject)
	if err != nil {
		return nil, err
	}
	return decode(raw.Subject, raw.Sequence, raw.Header, raw.Data)
}

// Decode parses a stored queue message, as delivered by a consumer.
func Decode(subject string, seq uint64, hdr nats.Header, data []byte) (*Message, error) {
	return decode(subject, seq, hdr, data)
}

func decode(subject string, seq uint64, hdr nats.Header, data []byte) (*Message, error) {
	m := &Message{Subject: subject, Sequence: seq, Tombstone: hdr.Get(HeaderTombstone) != ""}
	if m.Tombstone {
		m.Envelope.QueueID = hdr.Get(HeaderQueueID)
		m.Removed = hdr.Get(HeaderRemoved) != ""
		return m, nil
	}
	m.Held = parseHeaderTime(hdr.Get(HeaderHeld))
	m.RetryAt = parseHeaderTime(hdr.Get(HeaderRetryAt))
	m.Requeued = parseHeaderTime(hdr.Get(HeaderRequeued))
	m.hdr, m.raw = hdr, data
	i := bytes.IndexByte(data, '\n')
	if i < 0 {
		return nil, fmt.Errorf("spool: malformed envelope at %s seq %d", subject, seq)
	}
	if err := json.Unmarshal(data[:i], &m.Envelope); err != nil {
		return nil, fmt.Errorf("spool: decode envelope at %s seq %d: %w", subject, seq, err)
	}
	m.inline = data[i+1:]
	return m, nil
}

// ReadBody returns the whole body of m, checked against the digest in its
// envelope. A mismatch is ErrBodyCorrupt. It holds the body in memory: the
// deliverer sends bodies with OpenBody instead.
func (s *Spool) ReadBody(ctx context.Context, m *Message) ([]byte, error) {
	r, err := s.OpenBody(ctx, m)
	if err != nil {
		return nil, err
	}
	out := bytes.NewBuffer(make([]byte, 0, m.Envelope.Body.Size))
	if _, err := r.WriteTo(out); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// ReadHead returns the start of m's body, read a piece at a time until it
// holds the header section (up to the first empty line), the whole body, or
// at least limit octets: what a notice that returns only the headers needs,
// without the rest of a large body. An inline body is checked against its
// digest; a chunked one cannot be before its end, which is not read.
func (s *Spool) ReadHead(ctx context.Context, m *Message, limit int) ([]byte, error) {
	r, err := s.OpenBody(ctx, m)
	if err != nil {
		return nil, err
	}
	var out []byte
	for len(out) < limit && !hasHeaderEnd(out) {
		p, err := r.next()
		out = append(out, p...)
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// hasHeaderEnd reports whether msg holds an empty line.
func hasHeaderEnd(msg []byte) bool {
	return bytes.HasPrefix(msg, []byte("\r\n")) || bytes.HasPrefix(msg, []byte("\n")) ||
		bytes.Contains(msg, []byte("\n\r\n")) || bytes.Contains(msg, []byte("\n\n"))
}

// ErrNotQueued is Complete's answer when the mail's envelope was replaced
// by something other than its own tombstone (an administrator removed it):
// there is nothing left to complete.
var ErrNotQueued = errors.New("spool: the mail is no longer queued")

// Complete records that m has left the queue (delivered, bounced or
// removed): its envelope is replaced by a tombstone that keeps the duplicate
// guard for DuplicateWindow and then expires by itself, and its body chunks
// are deleted. The replacement is conditional on m still being the latest
// record, so a concurrent update is never lost. Complete may be called again
// after an error of unknown fate (a timeout): this mail's tombstone already
// in place counts as done.
func (s *Spool) Complete(ctx context.Context, m *Message) error {
	msg := &nats.Msg{Subject: m.Subject, Header: nats.Header{}}
	msg.Header.Set(HeaderQueueID, m.Envelope.QueueID)
	msg.Header.Set(HeaderTombstone, "1")
	expect := m.Sequence
	held := !m.Held.IsZero()
	var err error
	for try := 0; ; try++ {
		grouped := false
		if try == 0 {
			// With the records and tombstones of concurrent Commits and
			// Completes (group.go).
			_, grouped, err = s.grouped(ctx, QueueStream, msg, &expect, s.cfg.DuplicateWindow)
		}
		if !grouped {
			_, err = s.js.PublishMsg(ctx, msg,
				jetstream.WithExpectStream(QueueStream),
				jetstream.WithExpectLastSequencePerSubject(expect),
				jetstream.WithMsgTTL(s.cfg.DuplicateWindow))
		}
		var apiErr *jetstream.APIError
		if !errors.As(err, &apiErr) || apiErr.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequence {
			break
		}
		last, gerr := s.queue.GetLastMsgForSubject(ctx, m.Subject)
		mine := gerr == nil && last.Header.Get(HeaderQueueID) == m.Envelope.QueueID
		switch {
		case mine && last.Header.Get(HeaderRemoved) != "":
			return fmt.Errorf("spool: complete %s: %w", m.Envelope.QueueID, ErrRemoved)
		case mine && last.Header.Get(HeaderTombstone) != "":
			err = nil // an earlier try landed
		case mine && try < 8:
			// An administrator replaced the record during the attempt
			// (hold, retry): the mail is still this one.
			expect = last.Sequence
			held = held || last.Header.Get(HeaderHeld) != ""
			continue
		case gerr == nil || errors.Is(gerr, jetstream.ErrMsgNotFound):
			return fmt.Errorf("spool: complete %s: %w", m.Envelope.QueueID, ErrNotQueued)
		default:
			err = gerr
		}
		break
	}
	if err != nil {
		return fmt.Errorf("spool: complete %s: %w", m.Envelope.QueueID, err)
	}
	if m.Envelope.Body.Chunks > 0 {
		if err := s.bodies.Purge(ctx, jetstream.WithPurgeSubject(bodyPrefix+m.Envelope.Body.ID+".>")); err != nil {
			return fmt.Errorf("spool: delete body of %s: %w", m.Envelope.QueueID, err)
		}
	}
	if held {
		// Put on hold while its last attempt ran, which delivered it: the
		// marker goes with it.
		return s.dropHeldMarker(ctx, m.Envelope.QueueID)
	}
	return nil
}

// Scan calls fn for every queued mail (tombstones skipped), oldest first,
// as of the moment Scan starts.
func (s *Spool) Scan(ctx context.Context, fn func(*Message) error) error {
	return s.ScanFrom(ctx, 0, fn)
}

// errWalkIncomplete means a walk of the queue got no more records before
// it reached the last one it saw at the start: they may have left the
// queue meanwhile, or the server may have been away.
var errWalkIncomplete = errors.New("spool: the queue walk ended early")

// walkQueue calls fn for every record of the queue stream (envelopes and
// tombstones), oldest first, as of the moment it starts; with headersOnly
// the records come without their data. It returns errWalkIncomplete when
// a fetch comes back empty before the last record was reached.
func (s *Spool) walkQueue(ctx context.Context, headersOnly bool, fn func(jetstream.Msg, *jetstream.MsgMetadata) error) error {
	return s.walk(ctx, s.queue, walkFrom{headersOnly: headersOnly}, fn)
}

// walkBatch is how many records one pull of a walk asks for.
const walkBatch = 1024

// walkFrom says where a walk starts and what it reads.
type walkFrom struct {
	// seq, when not 0, is the first stream sequence read.
	seq uint64
	// start, when set (and seq is 0), starts at the first record stored
	// at or after it.
	start time.Time
	// lastPerSubject reads only the latest record of each subject (a KV
	// bucket's current values).
	lastPerSubject bool
	headersOnly    bool
}

// walk calls fn for the records of stream from where says, in stream
// order, as of the moment it starts.
func (s *Spool) walk(ctx context.Context, stream jetstream.Stream, from walkFrom, fn func(jetstream.Msg, *jetstream.MsgMetadata) error) error {
	info, err := stream.Info(ctx)
	if err != nil {
		return err
	}
	last := info.State.LastSeq
	if info.State.Msgs == 0 || from.seq > last {
		return nil
	}
	// A plain ephemeral consumer, deleted when the walk is over: an
	// ordered consumer recreates itself when deleted, and the server keeps
	// an idle one for minutes, so frequent walks (queue listings, body
	// sweeps) piled them up to the consumer limit. One fetcher with no
	// acknowledgements gets the records in stream order.
	cc := jetstream.ConsumerConfig{
		AckPolicy:         jetstream.AckNonePolicy,
		DeliverPolicy:     jetstream.DeliverAllPolicy,
		HeadersOnly:       from.headersOnly,
		MemoryStorage:     true,
		InactiveThreshold: 30 * time.Second,
	}
	switch {
	case from.lastPerSubject:
		cc.DeliverPolicy = jetstream.DeliverLastPerSubjectPolicy
		cc.FilterSubjects = info.Config.Subjects
	case from.seq > 0:
		cc.DeliverPolicy, cc.OptStartSeq = jetstream.DeliverByStartSequencePolicy, from.seq
	case !from.start.IsZero():
		t := from.start
		cc.DeliverPolicy, cc.OptStartTime = jetstream.DeliverByStartTimePolicy, &t
	}
	c, err := stream.CreateConsumer(ctx, cc)
	if err != nil {
		return err
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = stream.DeleteConsumer(dctx, c.CachedInfo().Name)
	}()
	if ci := c.CachedInfo(); ci.NumPending == 0 {
		// Nothing from the start point on (all of it expired or left).
		return nil
	}
	// One pull at a time: with two waiting, the server deals the records
	// out between them and the order is lost.
	for {
		batch, err := c.Fetch(walkBatch, jetstream.FetchMaxWait(2*time.Second))
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
			if err := fn(raw, md); err != nil {
				return err
			}
			if md.Sequence.Stream >= last || md.NumPending == 0 {
				return nil
			}
		}
		if err := batch.Error(); err != nil {
			return err
		}
		if n == 0 {
			return errWalkIncomplete
		}
	}
}
