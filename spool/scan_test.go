package spool_test

import (
	"errors"
	"testing"
	"time"

	"github.com/jetmail/jetmail/spool"
)

func TestScanListsMailOldestFirstAndSkipsTombstones(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	next := queueIDs()
	var qids []string
	for i := 0; i < 300; i++ { // more than one fetch batch of 256
		env := newEnvelope(next())
		mustCommit(t, sp, env, []byte("x\r\n"), "")
		qids = append(qids, env.QueueID)
	}
	msgs := scanAll(t, sp)
	if len(msgs) != len(qids) {
		t.Fatalf("Scan listed %d of %d mails", len(msgs), len(qids))
	}
	for i, m := range msgs {
		if m.Envelope.QueueID != qids[i] {
			t.Fatalf("Scan position %d is %s; want %s (oldest first)", i, m.Envelope.QueueID, qids[i])
		}
	}
	for _, m := range msgs[:150] {
		if err := sp.Complete(ctxT(t), m); err != nil {
			t.Fatal(err)
		}
	}
	rest := scanAll(t, sp)
	if len(rest) != 150 || rest[0].Envelope.QueueID != qids[150] {
		t.Fatalf("after completing 150, Scan lists %d starting at %v", len(rest), rest[0].Envelope.QueueID)
	}
}

func TestScanOfAnEmptyQueueCallsNothing(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	if n := len(scanAll(t, sp)); n != 0 {
		t.Fatalf("empty queue: Scan listed %d", n)
	}
	// Only tombstones left: still nothing.
	env := newEnvelope(spool.NewQueueID(time.Now()))
	mustCommit(t, sp, env, []byte("x\r\n"), "")
	if err := sp.Complete(ctxT(t), findQueued(t, sp, env.QueueID)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if n := len(scanAll(t, sp)); n != 0 {
		t.Fatalf("queue of tombstones: Scan listed %d", n)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("Scan of one tombstone took %s", took)
	}
}

func TestScanStopsAtTheFirstCallbackError(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	next := queueIDs()
	for i := 0; i < 5; i++ {
		mustCommit(t, sp, newEnvelope(next()), []byte("x\r\n"), "")
	}
	stop := errors.New("stop here")
	calls := 0
	err := sp.Scan(ctxT(t), func(*spool.Message) error {
		calls++
		if calls == 2 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || calls != 2 {
		t.Fatalf("Scan = %v after %d calls; want the callback's error after 2", err, calls)
	}
}

// The newest record can disappear on its own: a tombstone expires with the
// duplicate window. Scan stops when it reaches the stream's last sequence,
// which then no longer exists.
func TestScanIsPromptWhenTheNewestRecordHasExpired(t *testing.T) {
	cfg := testConfig()
	cfg.DuplicateWindow = time.Second
	sp, _, _ := newSpool(t, cfg)
	next := queueIDs()
	keep := newEnvelope(next())
	mustCommit(t, sp, keep, []byte("kept\r\n"), "")
	gone := newEnvelope(next())
	mustCommit(t, sp, gone, []byte("delivered\r\n"), "")
	if err := sp.Complete(ctxT(t), findQueued(t, sp, gone.QueueID)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "the tombstone to expire", func() bool {
		return streamMsgs(t, sp.JetStream(), spool.QueueStream, "") == 1
	})

	start := time.Now()
	msgs := scanAll(t, sp)
	took := time.Since(start)
	if len(msgs) != 1 || msgs[0].Envelope.QueueID != keep.QueueID {
		t.Fatalf("Scan listed %d mails; want only %s", len(msgs), keep.QueueID)
	}
	if took > time.Second {
		t.Fatalf("Scan of one mail took %s", took)
	}
}

func TestScanLeavesNoConsumerBehind(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	next := queueIDs()
	for i := 0; i < 3; i++ {
		mustCommit(t, sp, newEnvelope(next()), []byte("x\r\n"), "")
	}
	for i := 0; i < 20; i++ {
		if got := len(scanAll(t, sp)); got != 3 {
			t.Fatalf("Scan listed %d, want 3", got)
		}
	}
	st, err := sp.JetStream().Stream(ctxT(t), spool.QueueStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Consumers != 0 {
		t.Errorf("%d consumers left on the queue stream after 20 scans, want 0", info.State.Consumers)
	}
}
