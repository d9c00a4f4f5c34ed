package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/jetmail/jetmail/spool"
)

// TestServeKilledWhileCommittingInGroupsKeepsEvery250 sends from 20
// sessions at once, so that their queue records are committed in groups
// (spool/group.go: one atomic batch, one fsync), SIGKILLs serve while they
// are, restarts it, and checks that every message answered 250 is queued
// exactly once with its own body, and nothing else is but messages whose
// reply the kill cut off. Three rounds, on the same data directory; at
// the end the cut-off messages are sent again, and each must be queued
// once, under the queue ID its new answer names.
func TestServeKilledWhileCommittingInGroupsKeepsEvery250(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	dataDir := t.TempDir()
	acked := map[string]string{}  // queue ID -> Message-ID
	inFlight := map[string]bool{} // Message-IDs sent without a reply
	for round := range 3 {
		p := startServe(t, bin, dataDir, "--no-deliver")
		var (
			mu      sync.Mutex
			n       atomic.Int64
			stop    = make(chan struct{})
			wg      sync.WaitGroup
			batched atomic.Bool
		)
		for s := range 20 {
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					mid := fmt.Sprintf("r%d-s%d-m%d@kill.test", round, s, i)
					mu.Lock()
					inFlight[mid] = true
					mu.Unlock()
					qid, err := sendOne(p.smtp, mid)
					mu.Lock()
					if err == nil {
						delete(inFlight, mid)
						acked[qid] = mid
						n.Add(1)
					}
					mu.Unlock()
					if err != nil {
						return // the kill
					}
				}
			})
		}
		// Kill once the sessions have had 200+ replies and records were
		// seen sharing writes.
		deadline := time.Now().Add(60 * time.Second)
		for n.Load() < int64(200+100*round) || !batched.Load() {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: %d replies in 60s, batched %v; log:\n%s", round, n.Load(), batched.Load(), p.log)
			}
			if sum, count := batchMetric(t, p.metrics); sum > count {
				batched.Store(true)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := p.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		p.cmd.Wait()
		close(stop)
		wg.Wait()
		t.Logf("round %d: killed after %d replies; %d sends without one", round, n.Load(), len(inFlight))
	}

	p := startServe(t, bin, dataDir, "--no-deliver")
	// The clients whose reply the kills cut off send again, as clients do:
	// a message the kill had stored is answered with its queue ID and not
	// queued twice; one it had not is queued now.
	resent := map[string]string{} // Message-ID -> queue ID answered
	for mid := range inFlight {
		qid, err := sendOne(p.smtp, mid)
		if err != nil {
			t.Fatalf("resending %s: %v", mid, err)
		}
		resent[mid] = qid
	}
	sp := serveSpool(t, p, dataDir)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	seen := map[string]int{}
	byMID := map[string]int{}
	qidOf := map[string]string{} // Message-ID -> queue ID stored
	if err := sp.Scan(ctx, func(m *spool.Message) error {
		body, err := sp.ReadBody(ctx, m)
		if err != nil {
			return fmt.Errorf("%s: %w", m.Envelope.QueueID, err)
		}
		seen[m.Envelope.QueueID]++
		for _, line := range strings.Split(string(body), "\r\n") {
			if mid, ok := strings.CutPrefix(line, "Message-ID: <"); ok {
				mid = strings.TrimSuffix(mid, ">")
				byMID[mid]++
				qidOf[mid] = m.Envelope.QueueID
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for qid, mid := range acked {
		if seen[qid] != 1 {
			t.Errorf("%s (%s) answered 250 but is queued %d times", qid, mid, seen[qid])
		}
		if byMID[mid] != 1 {
			t.Errorf("%s answered 250; its body is queued %d times", mid, byMID[mid])
		}
	}
	for mid, qid := range resent {
		if byMID[mid] != 1 || qidOf[mid] != qid {
			t.Errorf("%s, sent again after the kill: answered %s; queued %d times, as %s", mid, qid, byMID[mid], qidOf[mid])
		}
	}
	ackedMID := map[string]bool{}
	for _, mid := range acked {
		ackedMID[mid] = true
	}
	for mid, c := range byMID {
		if c > 1 {
			t.Errorf("%s queued %d times", mid, c)
		}
		if !inFlight[mid] && !ackedMID[mid] {
			t.Errorf("%s is queued but was never sent", mid)
		}
	}
	t.Logf("%d answered 250, all queued once; %d whose reply the kills cut off sent again, each queued once", len(acked), len(resent))
	p.stop(t)
}

// sendOne sends one message with Message-ID mid and returns its queue ID.
func sendOne(addr, mid string) (string, error) {
	c, err := smtp.Dial(addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.Mail("alice@example.org", nil); err != nil {
		return "", err
	}
	if err := c.Rcpt("bob@example.net", nil); err != nil {
		return "", err
	}
	w, err := c.Data()
	if err != nil {
		return "", err
	}
	if _, err := io.WriteString(w, "Subject: kill\r\nMessage-ID: <"+mid+">\r\n\r\n"+strings.Repeat("body of "+mid+"\r\n", 20)); err != nil {
		return "", err
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", err
	}
	_, qid, ok := strings.Cut(resp.StatusText, "Ok: queued as ")
	if !ok {
		return "", fmt.Errorf("reply %q", resp.StatusText)
	}
	c.Quit()
	return qid, nil
}

// batchMetric reads jetmail_spool_commit_batch_records' sum and count.
func batchMetric(t *testing.T, addr string) (sum, count float64) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "jetmail_spool_commit_batch_records_sum "); ok {
			sum, _ = strconv.ParseFloat(v, 64)
		}
		if v, ok := strings.CutPrefix(line, "jetmail_spool_commit_batch_records_count "); ok {
			count, _ = strconv.ParseFloat(v, 64)
		}
	}
	return sum, count
}
