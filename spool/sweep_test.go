package spool_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/spool"
)

// bodyChunks counts the body chunks stored for the mail with queue ID qid.
func bodyChunks(t *testing.T, js jetstream.JetStream, qid string) uint64 {
	t.Helper()
	st, err := js.Stream(ctxT(t), spool.BodyStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctxT(t), jetstream.WithSubjectFilter("jetmail.body.>"))
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for subj, c := range info.State.Subjects {
		if strings.HasPrefix(subj, "jetmail.body."+qid+"-") {
			n += c
		}
	}
	return n
}

func TestSweepBodiesDeletesOnlyOrphansOldEnough(t *testing.T) {
	sp, _, nc := newSpool(t, testConfig())
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	big := pattern(3*sp.InlineMax(), 7)
	now := time.Now()
	old := now.Add(-3 * time.Hour)

	// More than one fetch of records ahead of it, some of them tombstones.
	next := queueIDs()
	for i := range 300 {
		env := newEnvelope(next())
		mustCommit(t, sp, env, []byte(fmt.Sprintf("Subject: filler %d\r\n\r\nsmall\r\n", i)), "")
		if i%3 == 0 {
			if err := sp.Complete(ctxT(t), findQueued(t, sp, env.QueueID)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Queued three hours ago with a chunked body, not delivered yet: kept.
	queued := newEnvelope(spool.NewQueueID(old))
	mustCommit(t, sp, queued, big, "")
	// Written three hours ago, envelope never published (the gateway
	// died): an orphan.
	orphan := spool.NewQueueID(old.Add(time.Millisecond))
	if _, err := writeBody(t, sp, orphan, big, 64<<10); err != nil {
		t.Fatal(err)
	}
	// Began a minute ago: its client may still be sending it.
	recent := spool.NewQueueID(now.Add(-time.Minute))
	if _, err := writeBody(t, sp, recent, big, 64<<10); err != nil {
		t.Fatal(err)
	}
	for _, qid := range []string{queued.QueueID, orphan, recent} {
		if bodyChunks(t, js, qid) == 0 {
			t.Fatalf("%s: no chunks written", qid)
		}
	}

	// An envelope from before HeaderBodyID: the sweeper cannot tell what
	// it uses, so it deletes nothing.
	legacy := &nats.Msg{Subject: "jetmail.queue.qlegacy", Header: nats.Header{}, Data: []byte("{}\n")}
	legacy.Header.Set(spool.HeaderQueueID, "legacy")
	if _, err := js.PublishMsg(ctxT(t), legacy); err != nil {
		t.Fatal(err)
	}
	if n, err := sp.SweepBodies(ctxT(t), 2*time.Hour, now); err == nil || n != 0 {
		t.Errorf("sweep beside an envelope without a body header: %d deleted, err %v; want an error and none", n, err)
	}
	if bodyChunks(t, js, orphan) == 0 {
		t.Fatal("the orphan was deleted although the queue could not be read completely")
	}
	q, err := js.Stream(ctxT(t), spool.QueueStream)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Purge(ctxT(t), jetstream.WithPurgeSubject(legacy.Subject)); err != nil {
		t.Fatal(err)
	}

	n, err := sp.SweepBodies(ctxT(t), 2*time.Hour, now)
	if err != nil || n != 1 {
		t.Fatalf("sweep: %d deleted, err %v; want 1", n, err)
	}
	if c := bodyChunks(t, js, orphan); c != 0 {
		t.Errorf("the orphan still has %d chunks", c)
	}
	if bodyChunks(t, js, recent) == 0 {
		t.Error("a body begun a minute ago was swept")
	}
	_, got := readBack(t, sp, queued.QueueID)
	sameBytes(t, "the queued mail's body after the sweep", got, big)

	// Nothing left to do: the queue is not even read.
	if n, err := sp.SweepBodies(ctxT(t), 2*time.Hour, now); err != nil || n != 0 {
		t.Errorf("second sweep: %d deleted, err %v", n, err)
	}
}
