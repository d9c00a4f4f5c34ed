package deliverer

import (
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/internal/natstest"
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
