package deliverer

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/spool"
)

// A NATS server that stalls just as the remote accepts a message, and comes
// back with the reply to our record lost (as the stream leader did when it
// was SIGSTOPped under load in the cluster run), must not make the message
// go out twice: the outcome is tried again until it lands, the message
// staying ours meanwhile. Before, the record was given up after one try and
// the message came back to be sent again.
func TestAnOutcomeWhoseRecordWasLostIsRecordedAgainNotDeliveredAgain(t *testing.T) {
	defer func(d time.Duration) { recordTry = d }(recordTry)
	recordTry = time.Second
	e := newE2E(t)
	stall := natstest.NewStall(t, strings.TrimPrefix(e.url, "nats://"))
	e.dns.Add(t, "stall.test. 60 IN MX 10 mx.stall.test.", "mx.stall.test. 60 IN A "+e2eMX1)
	mx := e.startMX(e2eMX1, &mxtest.MX{Data: func(n int) error {
		if n == 1 {
			// The remote has the message; NATS goes quiet before our
			// record of it, and what it held is lost when it returns.
			stall.Stop()
			time.AfterFunc(2500*time.Millisecond, stall.Cut)
		}
		return nil
	}})
	r := e.startDeliverer(e2eVia(stall.URL()), e2eAckWaitOf(20*time.Second))
	e.enqueue(e2eSender, "dave@stall.test")
	e.waitEmpty(15 * time.Second)
	if n := len(mx.Transactions()); n != 1 {
		t.Fatalf("the remote got %d copies; want 1", n)
	}
	if n := e2eCount(t, r.d.metrics.recordRetries); n < 1 {
		t.Errorf("record retries counted %v; the stall should have cost at least one", n)
	}
	// Long enough for a message given back to come round again.
	time.Sleep(3 * time.Second)
	if n := len(mx.Transactions()); n != 1 {
		t.Fatalf("the remote got %d copies after the queue emptied; want 1", n)
	}
	r.stop(t)
}

// handedMsg is a queue message as the consumer hands it out, with the
// delivery count the test wants, recording what the attempt answers.
type handedMsg struct {
	raw       *jetstream.RawStreamMsg
	delivered uint64

	mu      sync.Mutex
	answers []string
}

func (h *handedMsg) Metadata() (*jetstream.MsgMetadata, error) {
	return &jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: h.raw.Sequence}, NumDelivered: h.delivered}, nil
}
func (h *handedMsg) Subject() string                  { return h.raw.Subject }
func (h *handedMsg) Headers() nats.Header             { return h.raw.Header }
func (h *handedMsg) Data() []byte                     { return h.raw.Data }
func (h *handedMsg) Ack() error                       { return h.answer("ack") }
func (h *handedMsg) InProgress() error                { return nil }
func (h *handedMsg) Term() error                      { return h.answer("term") }
func (h *handedMsg) NakWithDelay(time.Duration) error { return h.answer("nak") }
func (h *handedMsg) answer(a string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.answers = append(h.answers, a)
	return nil
}
func (h *handedMsg) said() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return strings.Join(h.answers, ",")
}

// After a consumer leader change, JetStream was seen to hand out again a
// redelivered message that an attempt still held (the cluster run: 14
// copies after a SIGSTOP of the leader). The attempt of a redelivered
// message claims it first, so the second hand-out finds the claim and
// leaves the message alone. Without the claim the remote gets two copies.
func TestARedeliveredMessageHandedOutTwiceAtOnceGoesOutOnce(t *testing.T) {
	e := newE2E(t)
	inData, release := make(chan struct{}), make(chan struct{})
	mx := e.startMXOf("claim.test", &mxtest.MX{Data: func(n int) error {
		if n == 1 {
			close(inData)
			<-release
		}
		return nil
	}})
	r := e.startDeliverer(e2eIdle())
	qid := e.enqueue(e2eSender, "erin@claim.test")
	str, err := e.sp.JetStream().Stream(context.Background(), spool.QueueStream)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := str.GetLastMsgForSubject(context.Background(), "jetmail.queue.q"+qid)
	if err != nil {
		t.Fatal(err)
	}
	first := &handedMsg{raw: raw, delivered: 2}
	second := &handedMsg{raw: raw, delivered: 3}
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.d.handle(context.Background(), first)
	}()
	select {
	case <-inData:
	case <-time.After(10 * time.Second):
		t.Fatal("the first attempt never reached DATA")
	}
	r.d.handle(context.Background(), second)
	close(release)
	<-done
	if got := second.said(); got != "nak" {
		t.Errorf("the second hand-out answered %q; want nak (held by the first attempt)", got)
	}
	if got := first.said(); got != "ack" {
		t.Errorf("the first attempt answered %q; want ack", got)
	}
	if n := len(mx.Transactions()); n != 1 {
		t.Fatalf("the remote got %d copies; want 1", n)
	}
	if st, err := e.sp.LoadState(context.Background(), qid); err != nil || st != nil {
		t.Errorf("state after delivery: %+v (%v); want none (claim cleared with the rest)", st, err)
	}
}

// A message for several domains records each destination's deliveries as
// soon as its session ends, not after the slowest one: a deliverer killed
// while another destination is still in session does not send them again.
func TestADeliveryIsRecordedWhileAnotherDestinationIsStillInSession(t *testing.T) {
	e := newE2E(t)
	release := make(chan struct{})
	e.dns.Add(t, "quick.test. 60 IN MX 10 mx.quick.test.", "mx.quick.test. 60 IN A "+e2eMX1)
	e.dns.Add(t, "slow.test. 60 IN MX 10 mx.slow.test.", "mx.slow.test. 60 IN A "+e2eMX2)
	quick := e.startMX(e2eMX1, &mxtest.MX{})
	slow := e.startMX(e2eMX2, &mxtest.MX{Data: func(int) error {
		<-release
		return nil
	}})
	r := e.startDeliverer()
	qid := e.enqueue(e2eSender, "fay@quick.test", "gus@slow.test")
	st := e.waitState(qid, 10*time.Second, "the quick destination's delivery recorded", func(st *spool.DeliveryState) bool {
		return e2eRcptState(st, "fay@quick.test").Status == spool.RcptDelivered
	})
	if rs := e2eRcptState(st, "gus@slow.test"); rs.Status == spool.RcptDelivered {
		t.Fatalf("the slow recipient is recorded delivered while its session is held: %+v", rs)
	}
	close(release)
	e.waitEmpty(10 * time.Second)
	if len(quick.Transactions()) != 1 || len(slow.Transactions()) != 1 {
		t.Fatalf("copies: quick %d, slow %d; want 1 each", len(quick.Transactions()), len(slow.Transactions()))
	}
	// The queue is empty once the completion is stored; the state is
	// cleared just after it. Run returns when its attempts have ended.
	r.stop(t)
	if st, err := e.sp.LoadState(context.Background(), qid); err != nil || st != nil {
		t.Errorf("state after delivery: %+v (%v); want none", st, err)
	}
}
