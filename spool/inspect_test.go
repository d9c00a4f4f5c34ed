package spool_test

import (
	"errors"
	"testing"
	"time"

	"github.com/jetmail/jetmail/spool"
)

func TestAttachCreatesNothing(t *testing.T) {
	s := startNATS(t, t.TempDir(), -1)
	nc := connect(t, s)
	if _, err := spool.Attach(ctxT(t), nc); !errors.Is(err, spool.ErrNoQueue) {
		t.Fatalf("Attach on an empty server = %v; want ErrNoQueue", err)
	}
	if n := streamMsgs(t, openSpool(t, nc, testConfig()).JetStream(), spool.QueueStream, ""); n != 0 {
		t.Fatalf("queue holds %d records", n)
	}
}

func TestAttachReadsWhatOpenWrote(t *testing.T) {
	cfg := testConfig()
	cfg.MaxQueueBytes = 1 << 30
	sp, _, nc := newSpool(t, cfg)
	next := queueIDs()
	plain := newEnvelope(next())
	mustCommit(t, sp, plain, []byte("Subject: plain\r\n\r\nx\r\n"), "")
	guarded := newEnvelope(next())
	mustCommit(t, sp, guarded, []byte("Subject: guarded\r\n\r\ny\r\n"), guardFor(1))
	gone := newEnvelope(next())
	mustCommit(t, sp, gone, []byte("z\r\n"), guardFor(2))
	if err := sp.Complete(ctxT(t), findQueued(t, sp, gone.QueueID)); err != nil {
		t.Fatal(err)
	}
	if err := sp.SaveState(ctxT(t), &spool.DeliveryState{QueueID: guarded.QueueID, Attempts: 1,
		Rcpts: []spool.RcptState{{Addr: "bob@example.org", Status: spool.RcptDeferred, Text: "greylisted"}}}); err != nil {
		t.Fatal(err)
	}

	ro, err := spool.Attach(ctxT(t), nc)
	if err != nil {
		t.Fatal(err)
	}
	if got := ro.Config(); got.MaxQueueBytes != 1<<30 || got.Replicas != 1 {
		t.Errorf("Attach config: max queue bytes %d, replicas %d", got.MaxQueueBytes, got.Replicas)
	}
	for _, qid := range []string{plain.QueueID, guarded.QueueID} {
		m, err := ro.Find(ctxT(t), qid)
		if err != nil || m.Envelope.QueueID != qid {
			t.Fatalf("Find(%s) = %v, %v", qid, m, err)
		}
	}
	if _, err := ro.Find(ctxT(t), gone.QueueID); !errors.Is(err, spool.ErrNoSuchMessage) {
		t.Errorf("Find of a delivered mail = %v; want ErrNoSuchMessage", err)
	}
	if _, err := ro.Find(ctxT(t), spool.NewQueueID(time.Now())); !errors.Is(err, spool.ErrNoSuchMessage) {
		t.Errorf("Find of an unknown ID = %v; want ErrNoSuchMessage", err)
	}

	st, err := ro.Stats(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	// No deliverer has run: every record (two envelopes, one tombstone) waits.
	if st.Consumer || st.Records != 3 || st.NotHandedOut != 3 || st.States != 1 || st.Oldest != plain.QueueID {
		t.Errorf("Stats = %+v", st)
	}
	var states []string
	if err := ro.States(ctxT(t), func(s *spool.DeliveryState) error {
		states = append(states, s.QueueID+":"+s.Rcpts[0].Text)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(states) != 1 || states[0] != guarded.QueueID+":greylisted" {
		t.Errorf("States = %v", states)
	}

	var from []string
	if err := ro.ScanFrom(ctxT(t), 2, func(m *spool.Message) error {
		from = append(from, m.Envelope.QueueID)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(from) != 1 || from[0] != guarded.QueueID {
		t.Errorf("ScanFrom(2) = %v; want [%s]", from, guarded.QueueID)
	}
}

func TestByStateTakesTheStatesBeyondTheConsumerForParkedMail(t *testing.T) {
	for _, c := range []struct {
		name                      string
		st                        spool.QueueStats
		newMail, active, def, hld uint64
	}{
		{"nothing", spool.QueueStats{}, 0, 0, 0, 0},
		{"in the consumer: 1 new, 3 handed out of which 2 deferred", spool.QueueStats{NotHandedOut: 1, HandedOut: 3, States: 2}, 1, 1, 2, 0},
		{"all parked", spool.QueueStats{States: 1000}, 0, 0, 1000, 0},
		// An estimate: 10 handed out are taken for 10 of the states, so 10
		// first attempts (no state yet) beside 1,000 parked count 1,000.
		{"parked, and 10 handed out", spool.QueueStats{HandedOut: 10, States: 1000}, 0, 0, 1000, 0},
		{"a held record replaced (new) with its state", spool.QueueStats{NotHandedOut: 2, HandedOut: 2, States: 2, Held: 1}, 2, 0, 1, 1},
	} {
		n, a, d, h := c.st.ByState()
		if n != c.newMail || a != c.active || d != c.def || h != c.hld {
			t.Errorf("%s: new %d active %d deferred %d held %d; want %d %d %d %d", c.name, n, a, d, h, c.newMail, c.active, c.def, c.hld)
		}
		if m := c.st.Messages(); m != n+a+d+h {
			t.Errorf("%s: Messages %d", c.name, m)
		}
	}
}
