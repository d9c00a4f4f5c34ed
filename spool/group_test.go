package spool_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jetmail/jetmail/spool"
)

// commitHeld commits the mails envs (with bodies and guards) concurrently
// while the spool's group commit is held, so that they are all queued when
// it is released and go out as one batch (or as many as GroupCommit allows).
func commitHeld(t *testing.T, sp *spool.Spool, envs []*spool.Envelope, bodies [][]byte, guards []string, ctxs []context.Context) ([]spool.Result, []error) {
	t.Helper()
	bs := make([]*spool.Body, len(envs))
	for i, e := range envs {
		b, err := writeBody(t, sp, e.QueueID, bodies[i], 64<<10)
		if err != nil {
			t.Fatalf("body of %s: %v", e.QueueID, err)
		}
		bs[i] = b
	}
	waitQueued, release := spool.HoldGroupCommit(t, sp, false)
	res, errs := make([]spool.Result, len(envs)), make([]error, len(envs))
	var wg sync.WaitGroup
	for i := range envs {
		ctx := ctxT(t)
		if ctxs != nil && ctxs[i] != nil {
			ctx = ctxs[i]
		}
		wg.Go(func() { res[i], errs[i] = sp.Commit(ctx, envs[i], bs[i], guards[i]) })
	}
	waitQueued(len(envs))
	release()
	wg.Wait()
	return res, errs
}

func TestGroupCommit(t *testing.T) {
	next := queueIDs()
	mails := func(n int, guard func(i int) string) ([]*spool.Envelope, [][]byte, []string) {
		envs, bodies, guards := make([]*spool.Envelope, n), make([][]byte, n), make([]string, n)
		for i := range envs {
			envs[i] = newEnvelope(next())
			bodies[i] = pattern(1000+i*37, byte(i))
			guards[i] = guard(i)
		}
		return envs, bodies, guards
	}
	// checkStored fails unless every mail i with want[i] is queued once,
	// under its own queue ID, at the sequence its Result names, with its
	// own body.
	checkStored := func(t *testing.T, sp *spool.Spool, envs []*spool.Envelope, bodies [][]byte, res []spool.Result) {
		t.Helper()
		for i, e := range envs {
			m, body := readBack(t, sp, e.QueueID)
			if m.Sequence != res[i].Sequence {
				t.Errorf("%s: stored at sequence %d; its commit said %d", e.QueueID, m.Sequence, res[i].Sequence)
			}
			sameBytes(t, e.QueueID, body, bodies[i])
		}
	}

	t.Run("concurrent commits are stored in one write, each at the sequence it is told", func(t *testing.T) {
		sp, _, _ := newSpool(t, testConfig())
		envs, bodies, guards := mails(20, guardFor)
		res, errs := commitHeld(t, sp, envs, bodies, guards, nil)
		for i, err := range errs {
			if err != nil {
				t.Fatalf("commit %d: %v", i, err)
			}
			if res[i].Duplicate || res[i].QueueID != envs[i].QueueID || res[i].Batch != len(envs) {
				t.Fatalf("commit %d = %+v; want %s stored in a batch of %d", i, res[i], envs[i].QueueID, len(envs))
			}
		}
		checkStored(t, sp, envs, bodies, res)
		if n := len(scanAll(t, sp)); n != len(envs) {
			t.Fatalf("%d mails queued; want %d", n, len(envs))
		}
	})

	t.Run("a batch is cut at GroupCommit records", func(t *testing.T) {
		cfg := testConfig()
		cfg.GroupCommit = 4
		sp, _, _ := newSpool(t, cfg)
		envs, bodies, guards := mails(10, guardFor)
		res, errs := commitHeld(t, sp, envs, bodies, guards, nil)
		sizes := map[int]int{}
		for i, err := range errs {
			if err != nil {
				t.Fatalf("commit %d: %v", i, err)
			}
			sizes[res[i].Batch]++
		}
		// 10 queued: batches of 4, 4 and 2 (two go out one by one).
		if sizes[4] != 8 || sizes[1] != 2 {
			t.Fatalf("records per batch size = %v; want 8 in batches of 4 and 2 alone", sizes)
		}
		checkStored(t, sp, envs, bodies, res)
	})

	t.Run("a retransmission in a batch is answered with the original; the others are stored once", func(t *testing.T) {
		sp, _, _ := newSpool(t, testConfig())
		orig := newEnvelope(next())
		first := mustCommit(t, sp, orig, []byte("original\r\n"), guardFor(100))
		envs, bodies, guards := mails(8, func(i int) string { return guardFor(200 + i) })
		guards[3] = guardFor(100) // the retransmission
		res, errs := commitHeld(t, sp, envs, bodies, guards, nil)
		for i, err := range errs {
			if err != nil {
				t.Fatalf("commit %d: %v", i, err)
			}
		}
		if !res[3].Duplicate || res[3].QueueID != orig.QueueID || res[3].Sequence != first.Sequence {
			t.Fatalf("retransmission = %+v; want a duplicate of %s at %d", res[3], orig.QueueID, first.Sequence)
		}
		if findQueued(t, sp, envs[3].QueueID) != nil {
			t.Fatalf("the retransmission %s was queued", envs[3].QueueID)
		}
		for i := range envs {
			if i == 3 {
				continue
			}
			if res[i].Duplicate || res[i].QueueID != envs[i].QueueID {
				t.Fatalf("commit %d = %+v; want %s stored", i, res[i], envs[i].QueueID)
			}
		}
		if n := len(scanAll(t, sp)); n != 8 {
			t.Fatalf("%d mails queued; want 8 (the original and 7 new)", n)
		}
	})

	t.Run("two transmissions of one mail in the same batch are queued once", func(t *testing.T) {
		// A retransmission racing its original, both waiting for the same
		// write: the batch must not store both (the second would replace
		// the first, whose client was told 250).
		sp, _, _ := newSpool(t, testConfig())
		envs, bodies, guards := mails(6, func(i int) string { return guardFor(300 + i) })
		guards[4] = guards[1]
		res, errs := commitHeld(t, sp, envs, bodies, guards, nil)
		for i, err := range errs {
			if err != nil {
				t.Fatalf("commit %d: %v", i, err)
			}
		}
		a, b := res[1], res[4]
		if a.Duplicate == b.Duplicate {
			t.Fatalf("results %+v and %+v; want exactly one duplicate", a, b)
		}
		winner, loser := 1, 4
		if a.Duplicate {
			winner, loser = 4, 1
		}
		if res[loser].QueueID != envs[winner].QueueID || res[loser].Sequence != res[winner].Sequence {
			t.Fatalf("duplicate answered %+v; want %s at %d", res[loser], envs[winner].QueueID, res[winner].Sequence)
		}
		if findQueued(t, sp, envs[loser].QueueID) != nil {
			t.Fatalf("both transmissions are queued")
		}
		m, body := readBack(t, sp, envs[winner].QueueID)
		if m.Sequence != res[winner].Sequence {
			t.Fatalf("original stored at %d; told %d", m.Sequence, res[winner].Sequence)
		}
		sameBytes(t, "original", body, bodies[winner])
		if n := len(scanAll(t, sp)); n != 5 {
			t.Fatalf("%d mails queued; want 5", n)
		}
	})

	t.Run("a commit that gave up while it waited is not stored; the others are", func(t *testing.T) {
		sp, _, _ := newSpool(t, testConfig())
		envs, bodies, guards := mails(5, guardFor)
		gone, cancel := context.WithCancel(context.Background())
		cancel()
		ctxs := make([]context.Context, 5)
		ctxs[2] = gone
		res, errs := commitHeld(t, sp, envs, bodies, guards, ctxs)
		if errs[2] == nil {
			t.Fatalf("the abandoned commit succeeded: %+v", res[2])
		}
		if findQueued(t, sp, envs[2].QueueID) != nil {
			t.Fatalf("the abandoned commit's mail %s was queued", envs[2].QueueID)
		}
		for i, err := range errs {
			if i != 2 && err != nil {
				t.Fatalf("commit %d: %v", i, err)
			}
		}
		if n := len(scanAll(t, sp)); n != 4 {
			t.Fatalf("%d mails queued; want 4", n)
		}
	})

	t.Run("a full queue refuses the batch's records one by one and stores nothing twice", func(t *testing.T) {
		cfg := testConfig()
		cfg.MaxQueueBytes = 20 << 10
		sp, _, _ := newSpool(t, cfg)
		envs, bodies, guards := mails(12, guardFor)
		for i := range bodies {
			bodies[i] = pattern(3000, byte(i))
		}
		res, errs := commitHeld(t, sp, envs, bodies, guards, nil)
		stored := 0
		for i, err := range errs {
			if err == nil {
				stored++
				if res[i].QueueID != envs[i].QueueID || res[i].Duplicate {
					t.Fatalf("commit %d = %+v", i, res[i])
				}
				continue
			}
			if findQueued(t, sp, envs[i].QueueID) != nil {
				t.Fatalf("commit %d failed (%v) but %s is queued", i, err, envs[i].QueueID)
			}
		}
		if stored == 0 || stored == len(envs) {
			t.Fatalf("%d of %d stored; want the queue to fill part way", stored, len(envs))
		}
		if n := len(scanAll(t, sp)); n != stored {
			t.Fatalf("%d mails queued; %d commits succeeded", n, stored)
		}
		t.Logf("%d of %d stored before the queue was full", stored, len(envs))
	})
}

func TestGroupCommitOfStates(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	next := queueIDs()
	ctx := ctxT(t)
	// Ten messages with a state, read at their current revision; the
	// state of the fourth changes after it was read.
	var states []*spool.DeliveryState
	for range 10 {
		qid := next()
		if err := sp.SaveState(ctx, &spool.DeliveryState{QueueID: qid, Attempts: 1}); err != nil {
			t.Fatal(err)
		}
		st, err := sp.LoadState(ctx, qid)
		if err != nil || st == nil {
			t.Fatalf("load %s: %v, %v", qid, st, err)
		}
		states = append(states, st)
	}
	claimHeld := func(states []*spool.DeliveryState, token string) []error {
		waitQueued, release := spool.HoldGroupCommit(t, sp, true)
		errs := make([]error, len(states))
		var wg sync.WaitGroup
		for i, st := range states {
			wg.Go(func() {
				errs[i] = sp.Claim(ctx, st, spool.Claim{Token: fmt.Sprintf("%s%d", token, i), Until: time.Now().Add(time.Minute)})
			})
		}
		waitQueued(len(states))
		release()
		wg.Wait()
		return errs
	}
	// Claims without a conflict go out in one batch, and each learns the
	// revision it was stored at: claiming again from it works.
	for round, token := range []string{"first", "again"} {
		for i, err := range claimHeld(states, token) {
			if err != nil {
				t.Fatalf("round %d, claim %d (%s): %v", round, i, states[i].QueueID, err)
			}
		}
	}
	// They did go out as one batch (the fallback would store the same).
	kvs, err := sp.JetStream().Stream(ctx, "KV_"+spool.StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range states {
		raw, err := kvs.GetLastMsgForSubject(ctx, "$KV."+spool.StateBucket+"."+st.QueueID)
		if err != nil {
			t.Fatal(err)
		}
		if raw.Header.Get("Nats-Batch-Id") == "" {
			t.Fatalf("the claim of %s was stored alone, not in a batch (headers %v)", st.QueueID, raw.Header)
		}
	}
	if err := sp.SaveState(ctx, &spool.DeliveryState{QueueID: states[3].QueueID, Attempts: 2}); err != nil {
		t.Fatal(err)
	}
	// Two attempts of a message without a state, racing to claim it in a
	// batch of their own (with two other new ones), so that the race is
	// decided inside the batch.
	race := next()
	racing := []*spool.DeliveryState{{QueueID: race}, {QueueID: race}, {QueueID: next()}, {QueueID: next()}}
	rerrs := claimHeld(racing, "r")
	if (rerrs[0] == nil) == (rerrs[1] == nil) {
		t.Fatalf("two claims of one new state in one batch: %v and %v; want exactly one to win", rerrs[0], rerrs[1])
	}
	for i, err := range rerrs {
		if err != nil && (i > 1 || !errors.Is(err, spool.ErrClaimed)) {
			t.Errorf("claim %d of the racing batch: %v", i, err)
		}
	}
	winner := racing[0]
	if rerrs[0] != nil {
		winner = racing[1]
	}
	if got, _ := sp.LoadState(ctx, race); got == nil || got.Claim == nil || got.Claim.Token != winner.Claim.Token {
		t.Errorf("state of the raced message: %+v; want the winner's claim %s", got, winner.Claim.Token)
	}

	// A stale claim among fresh ones: the batch fails, each is then
	// claimed alone.
	errs := claimHeld(states, "t")
	for i, err := range errs {
		if i != 3 && err != nil {
			t.Errorf("claim %d (%s): %v", i, states[i].QueueID, err)
		}
	}
	if !errors.Is(errs[3], spool.ErrClaimed) {
		t.Errorf("a claim of a state that changed since it was read: %v; want ErrClaimed", errs[3])
	}
	for i, st := range states {
		if errs[i] != nil {
			continue
		}
		got, err := sp.LoadState(ctx, st.QueueID)
		if err != nil || got == nil || got.Claim == nil || got.Claim.Token != st.Claim.Token {
			t.Errorf("state of %s after its claim: %+v, %v; want claim %s", st.QueueID, got, err, st.Claim.Token)
		}
	}
	// The stale state kept the write that came between.
	if got, _ := sp.LoadState(ctx, states[3].QueueID); got == nil || got.Attempts != 2 || got.Claim != nil {
		t.Errorf("state changed under a claim: %+v", got)
	}
}

func TestAClaimWhoseAnswerWasLostIsNotRefusedByItself(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	ctx := ctxT(t)
	qid := queueIDs()()
	if err := sp.SaveState(ctx, &spool.DeliveryState{QueueID: qid, Attempts: 1}); err != nil {
		t.Fatal(err)
	}
	st, err := sp.LoadState(ctx, qid)
	if err != nil {
		t.Fatal(err)
	}
	c := spool.Claim{Token: "mine", Until: time.Now().Add(time.Minute).Round(time.Millisecond)}
	// The first try is stored, but its answer is lost: the caller still
	// holds the state at the old revision and tries again.
	if err := sp.Claim(ctx, st.Clone(), c); err != nil {
		t.Fatal(err)
	}
	retry := st.Clone()
	if err := sp.Claim(ctx, retry, c); err != nil {
		t.Fatalf("the retry of a stored claim: %v; want it taken as done", err)
	}
	// ... and it holds the revision of what is stored: it can extend.
	c.Until = c.Until.Add(time.Minute)
	if err := sp.Claim(ctx, retry, c); err != nil {
		t.Fatalf("extending after the retry: %v", err)
	}
	// Another attempt's claim, or a different one of ours, is refused.
	for _, other := range []spool.Claim{{Token: "theirs", Until: c.Until}, {Token: "mine", Until: c.Until.Add(time.Hour)}} {
		if err := sp.Claim(ctx, st.Clone(), other); !errors.Is(err, spool.ErrClaimed) {
			t.Errorf("claim %+v from a stale state: %v; want ErrClaimed", other, err)
		}
	}
}

func TestGroupCommitNeedsNATSServer212(t *testing.T) {
	for v, want := range map[string]bool{"2.15.2": true, "2.12.0": true, "2.11.9": false, "3.0.0": true, "1.99.0": false, "": false, "garbage": false} {
		if got := spool.ServerAtLeast(v, 2, 12); got != want {
			t.Errorf("serverAtLeast(%q, 2, 12) = %v; want %v", v, got, want)
		}
	}
}
