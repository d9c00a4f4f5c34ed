package main

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/spool"
)

// footprint is what the queue's streams hold: messages and bytes as the
// server counts them, and the bytes of their block files on disk.
type footprint struct {
	msgs, bytes map[string]uint64
	disk        map[string]int64
}

// queueStreams are the streams a queued message leaves something in.
var queueStreams = []string{spool.QueueStream, spool.BodyStream, "KV_" + spool.StateBucket}

func measureFootprint(t *testing.T, sp *spool.Spool, dataDir string) footprint {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := footprint{msgs: map[string]uint64{}, bytes: map[string]uint64{}, disk: map[string]int64{}}
	for _, name := range queueStreams {
		s, err := sp.JetStream().Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		info, err := s.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		f.msgs[name], f.bytes[name] = info.State.Msgs, info.State.Bytes
	}
	err := filepath.WalkDir(dataDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".blk") {
			return err
		}
		for _, name := range queueStreams {
			if strings.Contains(path, string(filepath.Separator)+name+string(filepath.Separator)) {
				fi, err := d.Info()
				if err != nil {
					return err
				}
				f.disk[name] += fi.Size()
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// messageStates counts the delivery states in the state bucket (keys that
// are queue IDs, not the lease or hold markers).
func messageStates(t *testing.T, sp *spool.Spool) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := sp.JetStream().Stream(ctx, "KV_"+spool.StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter("$KV."+spool.StateBucket+".>"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for subj, c := range info.State.Subjects {
		if spool.ValidQueueID(strings.TrimPrefix(subj, "$KV."+spool.StateBucket+".")) {
			n += int(c)
		}
	}
	return n
}

// Issue 11, goal 5: tombstones and delivery states expire, so a queue that
// drained returns to its empty footprint within the duplicate window. The
// mail covers every record a message can leave: delivered at once (a
// tombstone), deferred and parked first (a state), bounced (a notice, itself
// queued and delivered), and a body large enough for chunks.
func TestServeReturnsToItsEmptyFootprintWithinTheDuplicateWindow(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	cfg := filepath.Join(dir, "policy.yaml")
	policy := "apiVersion: mail.jetmail.io/v1alpha1\nkind: DeliveryPolicy\nmetadata: {name: fast, namespace: mail}\nspec:\n  retryIntervals: [1s]\n"
	if err := os.WriteFile(cfg, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	seen := map[string]int{}
	sink := mxtest.Start(t, &mxtest.MX{Rcpt: func(to string) error {
		mu.Lock()
		defer mu.Unlock()
		seen[to]++
		switch {
		case strings.HasPrefix(to, "later") && seen[to] == 1:
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "greylisted"}
		case strings.HasPrefix(to, "never"):
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		}
		return nil
	}})
	const window = 3 * time.Second
	// Every deferral is parked (a wait of a second or more).
	p := startServe(t, bin, dataDir, "-f", cfg, "--relayhost", sink.Hop.Addr.String(),
		"--duplicate-window", window.String(), "--park-after", "1s")
	sp := serveSpool(t, p, dataDir)
	empty := measureFootprint(t, sp, dataDir)

	send := func(to, body string) {
		t.Helper()
		msg := fmt.Sprintf("From: alice@example.org\r\nTo: %s\r\nSubject: footprint\r\nMessage-ID: <%s.%d@example.org>\r\n\r\n%s", to, to, time.Now().UnixNano(), body)
		if reply := sendMail(t, p.smtp, "alice@example.org", to, msg); !strings.HasPrefix(reply, "250 ") {
			t.Fatalf("%s: %q", to, reply)
		}
	}
	for i := range 10 {
		send(fmt.Sprintf("now%d@example.net", i), "hello\r\n")
	}
	for i := range 3 {
		send(fmt.Sprintf("later%d@example.net", i), "greylisted once\r\n")
	}
	send("never@example.net", "bounced\r\n")
	send("big@example.net", strings.Repeat(strings.Repeat("b", 78)+"\r\n", 2<<20/80))
	// 10 + 3 + the big one + the notice about never@ to alice@.
	mxtest.Within(t, 60*time.Second, "15 messages at the sink", func() bool { return len(sink.Transactions()) == 15 })
	mu.Lock()
	greylisted := seen["later0@example.net"]
	mu.Unlock()
	notices := 0
	for _, tx := range sink.Transactions() {
		if tx.From == "" && len(tx.Rcpts) == 1 && tx.Rcpts[0] == "alice@example.org" {
			notices++
		}
	}
	if greylisted != 2 || notices != 1 {
		t.Fatalf("later0@ was offered %d times (want 2: deferred, then delivered), %d notices to alice@ (want 1)", greylisted, notices)
	}
	full := measureFootprint(t, sp, dataDir)
	if full.msgs[spool.QueueStream] < 15 {
		t.Fatalf("right after delivery the queue stream holds %d records; want the tombstones of all 15", full.msgs[spool.QueueStream])
	}

	// The tombstones expire with the window, the states went with their
	// mail, the chunks with their delivery.
	var now footprint
	mxtest.Within(t, window+20*time.Second, "the queue's streams to hold what they held empty", func() bool {
		now = measureFootprint(t, sp, dataDir)
		for _, name := range []string{spool.QueueStream, spool.BodyStream} {
			if now.msgs[name] != empty.msgs[name] || now.bytes[name] != empty.bytes[name] {
				return false
			}
		}
		// The bucket keeps the waker's lease, which may have been taken
		// after the empty measure; no message's state may be left.
		return messageStates(t, sp) == 0
	})
	for _, name := range queueStreams {
		t.Logf("%s: empty %d msgs %d B (%d B on disk); after delivery %d msgs %d B (%d B on disk); after the window %d msgs %d B (%d B on disk)",
			name, empty.msgs[name], empty.bytes[name], empty.disk[name], full.msgs[name], full.bytes[name], full.disk[name],
			now.msgs[name], now.bytes[name], now.disk[name])
	}
	// On disk: nats-server deletes a block once every record in it is gone,
	// except the stream's last block, which keeps its removed records'
	// bytes until it is compacted or replaced. So what is left is at most
	// one block per stream (8 MiB at most), whatever the queue held; here,
	// a few KiB.
	for _, name := range queueStreams {
		if now.disk[name] > 8<<20 {
			t.Errorf("%s keeps %d B on disk after the window; want at most one block", name, now.disk[name])
		}
	}
	p.stop(t)
}
