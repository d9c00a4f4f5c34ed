package spool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Parking: mail that waits for a retry leaves the deliverers' consumer.
//
// A negative acknowledgement with a delay keeps a message in the consumer:
// the server holds an entry for it and hands it out again when the delay
// is over, reading the record (and the store block around it) back each
// time, whether or not its destination can take it. With a large backlog
// that is one read per message per retry interval, spread over the whole
// queue stream.
//
// A deferred message is parked instead: the deliverer saves its delivery
// state with the park headers below (the one write a deferral made
// anyway), then acknowledges it. The state says where the message is
// going and when it is due. One deliverer at a time, the waker, holds the
// lease below and hands parked mail to a deliverer when it is due, over
// core NATS (WakeSubject): that deliverer reads the record (ParkedRecord)
// and attempts it as if the consumer had handed it out again. A
// destination that is down is woken one message at a time (the probe)
// until it takes mail again; its other parked mail is not touched
// meanwhile.
//
// A woken message is claimed before its attempt, and a claim of a parked
// state keeps it parked, due when the claim runs out (Claim): a deliverer
// that dies during the attempt leaves it to the waker, as the consumer's
// ack wait would have. The attempt ends by parking it again or by
// completing it; it never leaves a woken message unparked.
//
// A message is acknowledged only after its state was stored parked, so a
// crash between the two leaves a record the consumer hands out again
// (after the ack wait), and the attempt parks it again.
const (
	// HeaderParkDest is the destination (a recipient domain) whose retry
	// the parked message waits for: its earliest due pending recipient's.
	HeaderParkDest = "Jetmail-Park-Dest"
	// HeaderParkDue is when the message is due, in Unix milliseconds.
	HeaderParkDue = "Jetmail-Park-Due"
	// HeaderParkDeadline is when it must be handed out even if its
	// destination is still down (the end of its queue lifetime, or its
	// delay warning), likewise.
	HeaderParkDeadline = "Jetmail-Park-Deadline"
	// HeaderParkDown is set when the destination was down (every next
	// hop failed, or it was left alone as down).
	HeaderParkDown = "Jetmail-Park-Down"
	// HeaderParkSubject and HeaderParkSeq locate the queue record that was
	// parked; Wake replaces only that record.
	HeaderParkSubject = "Jetmail-Park-Subject"
	HeaderParkSeq     = "Jetmail-Park-Seq"
	// HeaderParkClaimed marks the park a claim of woken mail keeps (see
	// Claim): the message is in an attempt, due only if that dies.
	HeaderParkClaimed = "Jetmail-Park-Claimed"
)

// Park is where and until when a deferred message waits.
type Park struct {
	QueueID string
	Dest    string
	Due     time.Time
	// Deadline is when it is woken even if its destination is still
	// down: the end of its queue lifetime, or its delay warning.
	Deadline time.Time
	Down     bool
	// Subject and Seq are the queue record that was parked.
	Subject string
	Seq     uint64
	// Claimed is set while a woken message is in an attempt: Due is when
	// its claim runs out.
	Claimed bool `json:",omitempty"`
}

func (p *Park) header() nats.Header {
	h := nats.Header{}
	h.Set(HeaderParkDest, p.Dest)
	h.Set(HeaderParkDue, strconv.FormatInt(p.Due.UnixMilli(), 10))
	h.Set(HeaderParkDeadline, strconv.FormatInt(p.Deadline.UnixMilli(), 10))
	if p.Down {
		h.Set(HeaderParkDown, "1")
	}
	if p.Claimed {
		h.Set(HeaderParkClaimed, "1")
	}
	h.Set(HeaderParkSubject, p.Subject)
	h.Set(HeaderParkSeq, strconv.FormatUint(p.Seq, 10))
	return h
}

// parkFrom reads the park headers of a state record; nil if it is not
// parked (a claim, a save during an attempt, a deletion).
func parkFrom(qid string, h nats.Header) *Park {
	dest := h.Get(HeaderParkDest)
	if dest == "" {
		return nil
	}
	due, err1 := strconv.ParseInt(h.Get(HeaderParkDue), 10, 64)
	seq, err2 := strconv.ParseUint(h.Get(HeaderParkSeq), 10, 64)
	exp, err3 := strconv.ParseInt(h.Get(HeaderParkDeadline), 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return nil
	}
	return &Park{QueueID: qid, Dest: dest, Due: time.UnixMilli(due), Deadline: time.UnixMilli(exp), Down: h.Get(HeaderParkDown) != "",
		Subject: h.Get(HeaderParkSubject), Seq: seq, Claimed: h.Get(HeaderParkClaimed) != ""}
}

// ParkState stores st with p's park headers, in the one write a deferral
// makes: after it the message may be acknowledged.
func (s *Spool) ParkState(ctx context.Context, st *DeliveryState, p *Park) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	msg := &nats.Msg{Subject: stateSubject(st.QueueID), Header: p.header(), Data: b}
	_, grouped, err := s.grouped(ctx, stateStream, msg, nil, 0)
	if !grouped {
		_, err = s.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(stateStream))
	}
	if err != nil {
		return fmt.Errorf("spool: park %s: %w", st.QueueID, err)
	}
	st.park = p
	return nil
}

// recordOf is the queue record's subject a state record names, if it
// does (states written before 2026-12-03 without a park do not).
func recordOf(h nats.Header) string {
	if r := h.Get(HeaderStateRecord); r != "" {
		return r
	}
	return h.Get(HeaderParkSubject)
}

func stateSubject(qid string) string { return "$KV." + StateBucket + "." + qid }

// stateStream is the state bucket's stream.
const stateStream = "KV_" + StateBucket

// ParkEvent is a write to the state bucket as the waker follows it.
type ParkEvent struct {
	QueueID string
	// Park is set when the message was parked by this write.
	Park *Park
	// Gone is set when the state was deleted: the message left the queue.
	Gone bool
}

// parkEventOf reads one state bucket record (headers only); ok is false for
// keys that are not a message's state.
func parkEventOf(raw jetstream.Msg) (ParkEvent, bool) {
	qid := strings.TrimPrefix(raw.Subject(), "$KV."+StateBucket+".")
	if strings.Contains(qid, ".") {
		return ParkEvent{}, false // held.<id>, lease.<name>
	}
	h := raw.Headers()
	if op := h.Get("KV-Operation"); op == "DEL" || op == "PURGE" {
		return ParkEvent{QueueID: qid, Gone: true}, true
	}
	return ParkEvent{QueueID: qid, Park: parkFrom(qid, h)}, true
}

// StateHead is what the headers of a message's delivery state say.
type StateHead struct {
	QueueID string
	// Park is how the message is parked; nil if it is not.
	Park *Park
	// Record is the subject of the message's queue record, "" if the
	// state does not say (see HeaderStateRecord).
	Record string
	Stored time.Time
	// Held is set for the marker of held mail (Spool.Hold), not a state.
	Held bool
}

// StateHeads calls fn for every message's delivery state, reading the
// state bucket's headers only (no state is decoded, no queue record read).
func (s *Spool) StateHeads(ctx context.Context, fn func(StateHead) error) error {
	ks, err := s.js.Stream(ctx, "KV_"+StateBucket)
	if err != nil {
		return fmt.Errorf("spool: bucket %s: %w", StateBucket, err)
	}
	err = s.walk(ctx, ks, walkFrom{headersOnly: true}, func(raw jetstream.Msg, md *jetstream.MsgMetadata) error {
		if qid, ok := strings.CutPrefix(raw.Subject(), stateSubject(heldPrefix)); ok {
			return fn(StateHead{QueueID: qid, Held: true, Stored: md.Timestamp})
		}
		ev, ok := parkEventOf(raw)
		if !ok || ev.Gone {
			return nil
		}
		return fn(StateHead{QueueID: ev.QueueID, Park: ev.Park, Record: recordOf(raw.Headers()), Stored: md.Timestamp})
	})
	if errors.Is(err, errWalkIncomplete) {
		return nil
	}
	return err
}

// FollowParks calls fn for each write to the state bucket from now on
// (headers only), until ctx ends or the follow fails; it returns the
// error. started is called once the follow is in place: every write
// stored after that is seen. fn runs on one goroutine, in stream order.
func (s *Spool) FollowParks(ctx context.Context, started func(), fn func(ParkEvent)) error {
	ks, err := s.js.Stream(ctx, "KV_"+StateBucket)
	if err != nil {
		return fmt.Errorf("spool: bucket %s: %w", StateBucket, err)
	}
	c, err := ks.CreateConsumer(ctx, jetstream.ConsumerConfig{
		AckPolicy:         jetstream.AckNonePolicy,
		DeliverPolicy:     jetstream.DeliverNewPolicy,
		HeadersOnly:       true,
		MemoryStorage:     true,
		InactiveThreshold: 30 * time.Second,
	})
	if err != nil {
		return err
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = ks.DeleteConsumer(dctx, c.CachedInfo().Name)
	}()
	started()
	for ctx.Err() == nil {
		batch, err := c.Fetch(walkBatch, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return err
		}
		for raw := range batch.Messages() {
			if ev, ok := parkEventOf(raw); ok {
				fn(ev)
			}
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			return err
		}
	}
	return ctx.Err()
}

// ClearIfLeft removes the delivery state of qid if its mail left the
// queue: the record under subject (HeaderStateRecord) is its tombstone,
// another message's, or gone. That mends what a process killed between a
// message's completion (or removal) and the removal of its state left
// behind: a state no attempt would ever remove. left says whether it did.
func (s *Spool) ClearIfLeft(ctx context.Context, qid, subject string) (left bool, err error) {
	queued, _, err := s.StillQueued(ctx, &Message{Subject: subject, Envelope: Envelope{QueueID: qid}})
	if err != nil || queued {
		return false, err
	}
	return true, s.ClearState(ctx, qid)
}

// ClearHeldIfReleased removes the marker of held mail qid (see Hold) if
// its mail is not held any more: its record was released, or it left the
// queue. That mends what a process killed between Release's (or Remove's)
// two writes left behind, which `queue stat` would count as held for ever.
// Only the marker as read is removed: one written again meanwhile (held
// again) stays.
func (s *Spool) ClearHeldIfReleased(ctx context.Context, qid string) (cleared bool, err error) {
	subject := stateSubject(heldPrefix + qid)
	_, data, rev, err := s.leaderGet(ctx, stateStream, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var hm HeldMarker
	if err := json.Unmarshal(data, &hm); err != nil || hm.Subject == "" {
		return false, fmt.Errorf("spool: held marker of %s: %q does not name its record", qid, data)
	}
	hdr, _, _, err := s.leaderGet(ctx, QueueStream, hm.Subject)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		return false, err
	case hdr.Get(HeaderQueueID) == qid && hdr.Get(HeaderTombstone) == "" && hdr.Get(HeaderHeld) != "":
		return false, nil // still held
	}
	if err := s.purgeSubjectBefore(ctx, stateStream, subject, rev+1); err != nil {
		return false, fmt.Errorf("spool: held marker of %s: %w", qid, err)
	}
	return true, nil
}

// WakeSubject is where the waker hands parked mail to the deliverers (a
// core NATS request to their queue group, with the Park as JSON). The
// answer says what became of it: WakeTaken, WakeChanged or WakeBusy.
//
// GoneSubject is where a deliverer says, best effort, that mail it was
// handed left the queue (delivered or bounced; the payload is the queue
// ID): the state is then purged from the stream without a marker, so the
// waker would not see it go, and a probe that got through is how it
// learns that a destination is back. A notice lost (no waker listening, a
// waker that just took over) costs a wait: the waker probes again after
// two ack waits without news.
const (
	GoneSubject = "jetmail.wake.gone"
	WakeSubject = "jetmail.wake"
	WakeTaken   = "taken"
	WakeChanged = "changed"
	WakeBusy    = "busy"
)

// ParkedRecord reads the queue record p parked, from the stream leader,
// with the time it was stored: the deliverer a parked message is handed
// to reads it once, as the consumer would have. ErrChanged means it is
// not that record any more (the mail left the queue, or an administrator
// replaced it: held, released, retried), or it is held: there is nothing
// to do, the consumer has what replaced it.
func (s *Spool) ParkedRecord(ctx context.Context, p *Park) (hdr nats.Header, data []byte, stored time.Time, err error) {
	hdr, data, seq, stored, err := s.leaderGetAt(ctx, QueueStream, p.Subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) || (err == nil && seq != p.Seq) {
		return nil, nil, time.Time{}, fmt.Errorf("spool: parked %s: %w", p.QueueID, ErrChanged)
	}
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("spool: parked %s: %w", p.QueueID, err)
	}
	if hdr.Get(HeaderQueueID) != p.QueueID || hdr.Get(HeaderTombstone) != "" || hdr.Get(HeaderHeld) != "" {
		return nil, nil, time.Time{}, fmt.Errorf("spool: parked %s: %w", p.QueueID, ErrChanged)
	}
	return hdr, data, stored, nil
}

// Lease is a named lease in the state bucket (key lease.<name>): one
// holder at a time, for until, renewed by a compare-and-set.
type Lease struct {
	Holder string    `json:"holder"`
	Until  time.Time `json:"until"`
}

const leasePrefix = "lease."

// TakeLease takes (or renews) the lease name for holder until until, if it
// is free, expired, or already holder's; ok is false if another holds it.
func (s *Spool) TakeLease(ctx context.Context, name, holder string, now, until time.Time) (ok bool, err error) {
	key := leasePrefix + name
	cur, err := s.state.Get(ctx, key)
	b, _ := json.Marshal(Lease{Holder: holder, Until: until})
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		_, err = s.state.Create(ctx, key, b)
	case err != nil:
		return false, err
	default:
		var l Lease
		if json.Unmarshal(cur.Value(), &l) == nil && l.Holder != holder && now.Before(l.Until) {
			return false, nil
		}
		_, err = s.state.Update(ctx, key, b, cur.Revision())
	}
	var apiErr *jetstream.APIError
	if errors.Is(err, jetstream.ErrKeyExists) || (errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence) {
		return false, nil // another took it first
	}
	if err != nil {
		return false, fmt.Errorf("spool: lease %s: %w", name, err)
	}
	return true, nil
}

// ReleaseLease gives the lease name up if holder holds it.
func (s *Spool) ReleaseLease(ctx context.Context, name, holder string) error {
	key := leasePrefix + name
	cur, err := s.state.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("spool: lease %s: %w", name, err)
	}
	var l Lease
	if json.Unmarshal(cur.Value(), &l) != nil || l.Holder != holder {
		return nil
	}
	b, _ := json.Marshal(Lease{Holder: holder})
	if _, err := s.state.Update(ctx, key, b, cur.Revision()); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
			return nil // taken meanwhile
		}
		return fmt.Errorf("spool: lease %s: %w", name, err)
	}
	return nil
}
