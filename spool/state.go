package spool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// RcptStatus is what became of a recipient: the one vocabulary of the
// delivery state, the deliverer's results, the delivery log lines
// (status=...) and the metrics (jetmail_delivery_attempts_total{result}).
type RcptStatus string

// Delivery states of a recipient.
const (
	// RcptQueued: not attempted yet.
	RcptQueued RcptStatus = "queued"
	// RcptDelivered: the next hop accepted the message for the recipient.
	RcptDelivered RcptStatus = "delivered"
	// RcptDeferred: try again later.
	RcptDeferred RcptStatus = "deferred"
	// RcptFailed: the recipient is bounced.
	RcptFailed RcptStatus = "failed"
)

// Pending tells whether a recipient in this status is still to deliver.
func (s RcptStatus) Pending() bool { return s == RcptQueued || s == RcptDeferred }

// DeliveryState is what deliverers know about a queued message beyond its
// envelope: attempts and per-recipient results. It lives in JETMAIL_STATE
// under the queue ID, so the queue tools can read it without asking a
// deliverer. A message delivered at the first attempt never gets one.
type DeliveryState struct {
	QueueID     string      `json:"queueId"`
	Attempts    int         `json:"attempts"`
	LastAttempt time.Time   `json:"lastAttempt,omitempty"`
	NextAttempt time.Time   `json:"nextAttempt,omitempty"`
	DelayWarned bool        `json:"delayWarned,omitempty"`
	Rcpts       []RcptState `json:"rcpts"`
	// Bounced is set once the failure notice for Failed recipients has
	// been queued, so a redelivered message does not send it twice.
	Bounced []string `json:"bounced,omitempty"`
	// Claim is set while an attempt of a redelivered message runs (see
	// Spool.Claim).
	Claim *Claim `json:"claim,omitempty"`

	// revision is the bucket revision this state was read at (0: none
	// stored), for Claim's compare-and-set.
	revision uint64
	// record is the subject of the message's queue record (SetRecord),
	// carried by every write in HeaderStateRecord.
	record string
	// park is how it was parked, if it was (see park.go).
	park *Park
}

// HeaderStateRecord names, on a delivery state record, the subject of its
// message's queue record: a walk of the states' headers can then tell a
// state whose mail left the queue (see ClearIfLeft).
const HeaderStateRecord = "Jetmail-Record"

// SetRecord says which queue record (its subject) the state belongs to;
// every write of the state says so from then on.
func (st *DeliveryState) SetRecord(subject string) { st.record = subject }

// header is what a write of st carries besides park headers.
func (st *DeliveryState) header() nats.Header {
	if st.record == "" {
		return nil
	}
	return nats.Header{HeaderStateRecord: []string{st.record}}
}

// Parked is how the state was parked when it was read (nil: not parked).
func (st *DeliveryState) Parked() *Park { return st.park }

// Unpark forgets how the state was parked: an attempt of mail the consumer
// handed out (not woken) saves its state unparked.
func (st *DeliveryState) Unpark() { st.park = nil }

// Clone is a copy of st that shares nothing with it.
func (st *DeliveryState) Clone() *DeliveryState {
	c := *st
	c.Rcpts = slices.Clone(st.Rcpts)
	for i := range c.Rcpts {
		c.Rcpts[i].History = slices.Clone(c.Rcpts[i].History)
	}
	c.Bounced = slices.Clone(st.Bounced)
	if st.Claim != nil {
		cl := *st.Claim
		c.Claim = &cl
	}
	return &c
}

// Claim says that one attempt holds a message until a time. JetStream
// hands a message to one consumer at a time, but after a consumer leader
// change the new leader may hand out again a message that an attempt
// still holds (it was seen to, 12 s into a 30 s ack wait, while the holder
// was recording a delivery). An attempt of a redelivered message therefore
// claims it first, with a compare-and-set on the state, and an attempt
// that finds a live claim of another leaves the message alone.
type Claim struct {
	// Token names the attempt (random per attempt); Holder the process,
	// for people.
	Token  string    `json:"token"`
	Holder string    `json:"holder,omitempty"`
	Until  time.Time `json:"until"`
}

// Held tells whether another attempt than token holds the claim at now.
func (c *Claim) Held(token string, now time.Time) bool {
	return c != nil && c.Token != token && now.Before(c.Until)
}

// ErrClaimed is Claim's answer when the state changed since it was read:
// another attempt claimed or recorded the message first.
var ErrClaimed = errors.New("spool: the message was claimed by another attempt")

// RcptState is one recipient's delivery state.
type RcptState struct {
	Addr        string     `json:"addr"`
	Status      RcptStatus `json:"status"`
	Attempts    int        `json:"attempts,omitempty"`
	Code        int        `json:"code,omitempty"`
	Enhanced    string     `json:"enhanced,omitempty"`
	Text        string     `json:"text,omitempty"`
	RemoteMTA   string     `json:"remoteMta,omitempty"`
	LastAttempt time.Time  `json:"lastAttempt,omitempty"`
	// NextAttempt is when a deferred recipient is due again, from its own
	// attempt count and the retry schedule.
	NextAttempt time.Time `json:"nextAttempt,omitempty"`
	// History holds the results of the recipient's earlier attempts,
	// oldest first, the last MaxRcptHistory of them (the latest result is
	// the fields above). It costs no write of its own: it travels in the
	// state each deferral writes anyway.
	History []AttemptResult `json:"history,omitempty"`
}

// MaxRcptHistory is how many earlier results a recipient's state keeps.
const MaxRcptHistory = 10

// AttemptResult is the result of one attempt for one recipient.
type AttemptResult struct {
	At       time.Time  `json:"at"`
	Status   RcptStatus `json:"status"`
	Code     int        `json:"code,omitempty"`
	Enhanced string     `json:"enhanced,omitempty"`
	Text     string     `json:"text,omitempty"`
	Relay    string     `json:"relay,omitempty"`
}

// Remember moves the recipient's latest result into its history, before
// a new result replaces it.
func (rs *RcptState) Remember() {
	if rs.Attempts == 0 {
		return
	}
	rs.History = append(rs.History, AttemptResult{At: rs.LastAttempt, Status: rs.Status, Code: rs.Code,
		Enhanced: rs.Enhanced, Text: rs.Text, Relay: rs.RemoteMTA})
	if n := len(rs.History); n > MaxRcptHistory {
		rs.History = slices.Clone(rs.History[n-MaxRcptHistory:])
	}
}

// LoadState returns the delivery state of qid, or nil if it has none.
//
// It asks the bucket's stream leader, not any replica as a KV Get does
// (direct get): a replica that is behind would miss the state another
// deliverer saved a moment ago (recipients it has served) and the message
// would reach them twice.
func (s *Spool) LoadState(ctx context.Context, qid string) (*DeliveryState, error) {
	hdr, data, seq, err := s.leaderGet(ctx, "KV_"+StateBucket, "$KV."+StateBucket+"."+qid)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("spool: load state of %s: %w", qid, err)
	}
	if op := hdr.Get("KV-Operation"); op == "DEL" || op == "PURGE" {
		return nil, nil
	}
	var st DeliveryState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("spool: decode state of %s: %w", qid, err)
	}
	st.revision = seq
	st.park = parkFrom(qid, hdr)
	st.record = recordOf(hdr)
	return &st, nil
}

// Claim stores st with c as its claim, only if the state stored is still
// the one st was read at (LoadState; a new state for a message that had
// none). It answers ErrClaimed when another write came first.
func (s *Spool) Claim(ctx context.Context, st *DeliveryState, c Claim) error {
	st.Claim = &c
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	var rev uint64
	switch {
	case st.park != nil:
		// A claim of parked mail (a woken message) keeps it parked, due
		// when the claim runs out: if the attempt dies, the waker hands
		// it out again then.
		p := *st.park
		p.Due, p.Claimed = c.Until, true
		msg := &nats.Msg{Subject: stateSubject(st.QueueID), Header: p.header(), Data: b}
		ack, grouped, gerr := s.grouped(ctx, stateStream, msg, &st.revision, 0)
		if err = gerr; !grouped {
			ack, err = s.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(stateStream),
				jetstream.WithExpectLastSequencePerSubject(st.revision))
		}
		if err == nil {
			rev, st.park = ack.Sequence, &p
		}
	default:
		// A new state (revision 0: the subject must be empty) or an
		// update of the one read.
		msg := &nats.Msg{Subject: stateSubject(st.QueueID), Header: st.header(), Data: b}
		ack, grouped, gerr := s.grouped(ctx, stateStream, msg, &st.revision, 0)
		switch {
		case grouped && gerr == nil:
			rev = ack.Sequence
		case grouped:
			err = gerr
		default:
			// Alone, with the same condition (a delete marker left by a
			// version before 2026-12 expires within LimitMarkerTTL).
			var pack *jetstream.PubAck
			pack, err = s.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(stateStream),
				jetstream.WithExpectLastSequencePerSubject(st.revision))
			if err == nil {
				rev = pack.Sequence
			}
		}
	}
	var apiErr *jetstream.APIError
	if errors.Is(err, jetstream.ErrKeyExists) || (errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence) {
		// Another write came first, unless it was this very claim: a
		// try whose answer was lost (a batch or publish that timed out
		// and was stored after all) before the one refused.
		if cur, lerr := s.LoadState(ctx, st.QueueID); lerr == nil && cur != nil && cur.Claim != nil && cur.Claim.Token == c.Token && cur.Claim.Until.Equal(c.Until) {
			st.revision, st.park = cur.revision, cur.park
			return nil
		}
		return fmt.Errorf("spool: claim %s: %w", st.QueueID, ErrClaimed)
	}
	if err != nil {
		return fmt.Errorf("spool: claim %s: %w", st.QueueID, err)
	}
	st.revision = rev
	return nil
}

// SaveState stores the delivery state of a message. A state read parked
// (and not unparked) stays parked as it was read or last claimed (see
// Claim): the mail of a woken attempt is not in the consumer, and must not
// be lost to the waker if the attempt dies.
func (s *Spool) SaveState(ctx context.Context, st *DeliveryState) error {
	if st.park != nil {
		return s.ParkState(ctx, st, st.park)
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	msg := &nats.Msg{Subject: stateSubject(st.QueueID), Header: st.header(), Data: b}
	_, grouped, err := s.grouped(ctx, stateStream, msg, nil, 0)
	if !grouped {
		_, err = s.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(stateStream))
	}
	if err != nil {
		return fmt.Errorf("spool: save state of %s: %w", st.QueueID, err)
	}
	return nil
}

// ClearState removes the delivery state of a finished message, with a
// purge of its subject in the bucket's stream. That leaves nothing behind:
// a KV delete or purge writes a marker, and a marker that expires costs a
// second write and, when it goes, a removal (an fsync each: at a
// deferred message's end that was 3 fsyncs where this is 1).
func (s *Spool) ClearState(ctx context.Context, qid string) error {
	if err := s.purgeSubject(ctx, "KV_"+StateBucket, stateSubject(qid)); err != nil {
		return fmt.Errorf("spool: clear state of %s: %w", qid, err)
	}
	return nil
}

// purgeSubject removes every record of subject from stream.
func (s *Spool) purgeSubject(ctx context.Context, stream, subject string) error {
	return s.purgeSubjectBefore(ctx, stream, subject, 0)
}

// purgeSubjectBefore removes the records of subject from stream whose
// sequence is below before (0: all of them).
func (s *Spool) purgeSubjectBefore(ctx context.Context, stream, subject string, before uint64) error {
	req, err := json.Marshal(struct {
		Filter string `json:"filter"`
		Seq    uint64 `json:"seq,omitempty"`
	}{subject, before})
	if err != nil {
		return err
	}
	msg, err := s.nc.RequestWithContext(ctx, "$JS.API.STREAM.PURGE."+stream, req)
	if err != nil {
		return err
	}
	var resp struct {
		Error   *jetstream.APIError `json:"error"`
		Success bool                `json:"success"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return fmt.Errorf("purge answer from %s: %w", stream, err)
	}
	if resp.Error != nil {
		return resp.Error
	}
	if !resp.Success {
		return fmt.Errorf("purge of %s in %s did not succeed", subject, stream)
	}
	return nil
}
