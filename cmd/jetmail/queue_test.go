package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/spool"
)

// The queue tools' clock in these tests.
var qNow = time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)

func init() { queueNow = func() time.Time { return qNow } }

type queueFixture struct {
	url string
	sp  *spool.Spool
	seq uint64 // distinct queue IDs
}

func newQueueFixture(t *testing.T) *queueFixture {
	t.Helper()
	ns := natstest.Start(t, natstest.Options{})
	nc := natstest.Connect(t, ns, spool.NATSOptions()...)
	cfg := spool.DefaultConfig()
	cfg.PublishTimeout = 5 * time.Second
	sp, err := spool.Open(testCtx(t), nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	// The event log, where the queue tools record what they change.
	if _, err := events.OpenStream(testCtx(t), sp.JetStream(), events.StreamConfig{Replicas: 1, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	return &queueFixture{url: ns.ClientURL(), sp: sp}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// enqueue queues a message that arrived age before qNow; guarded mail
// (with a Message-ID) is stored under its fingerprint.
func (f *queueFixture) enqueue(t *testing.T, age time.Duration, from string, body string, guarded bool, rcpts ...string) *spool.Envelope {
	t.Helper()
	f.seq++
	received := qNow.Add(-age)
	env := &spool.Envelope{QueueID: spool.NewQueueID(received.Add(time.Duration(f.seq) * time.Microsecond)),
		Received: received, Gateway: "gw-0", ClientIP: "192.0.2.7", Helo: "client.example", From: from}
	for _, r := range rcpts {
		env.Rcpts = append(env.Rcpts, spool.Rcpt{Addr: r})
	}
	guard := ""
	if guarded {
		guard = spool.Fingerprint(from, rcpts, []byte(body))
	}
	if _, err := f.sp.Enqueue(testCtx(t), env, []byte(body), guard); err != nil {
		t.Fatal(err)
	}
	return env
}

func (f *queueFixture) saveState(t *testing.T, st *spool.DeliveryState) {
	t.Helper()
	if err := f.sp.SaveState(testCtx(t), st); err != nil {
		t.Fatal(err)
	}
}

// runQueue runs `jetmail queue args...` in process and returns its output.
func runQueue(t *testing.T, url string, args ...string) (string, error) {
	t.Helper()
	cmd := queueCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(append(args, "--nats-url", url))
	err := cmd.ExecuteContext(testCtx(t))
	return out.String(), err
}

func mustRunQueue(t *testing.T, url string, args ...string) string {
	t.Helper()
	out, err := runQueue(t, url, args...)
	if err != nil {
		t.Fatalf("queue %v: %v\n%s", args, err, out)
	}
	return out
}

// queueOfFour holds one message in each state:
//
//	active   handed to a deliverer, no state
//	deferred greylisted, next attempt in 20 minutes (a guarded mail)
//	mixed    one recipient failed (bounced), one deferred
//	new      queued after the deliverers took the others
type queueOfFour struct {
	*queueFixture
	active, deferred, mixed, fresh *spool.Envelope
}

func newQueueOfFour(t *testing.T) *queueOfFour {
	f := &queueOfFour{queueFixture: newQueueFixture(t)}
	f.active = f.enqueue(t, 3*time.Minute, "alice@example.net", "Subject: active\r\n\r\nhi\r\n", false, "bob@example.org")
	f.deferred = f.enqueue(t, 2*time.Hour, "carol@example.net", "Message-ID: <d@example.net>\r\nSubject: deferred\r\n\r\nhello\r\n", true, "dave@grey.example")
	f.mixed = f.enqueue(t, 30*time.Minute, "", "Subject: bounce\r\n\r\nreport\r\n", false, "gone@example.org", "eve@grey.example")

	// A deliverer takes the three and keeps them (no acknowledgement).
	cons, err := f.sp.DeliveryConsumer(testCtx(t), time.Hour, 100)
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(3, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for range batch.Messages() {
		n++
	}
	if n != 3 {
		t.Fatalf("the deliverer got %d messages, want 3", n)
	}
	f.fresh = f.enqueue(t, 10*time.Second, "frank@example.net", "Subject: new\r\nX-Test: 1\r\n\r\nnew\r\n", false, "grace@example.org", "heidi@example.org")

	next := qNow.Add(20 * time.Minute)
	f.saveState(t, &spool.DeliveryState{QueueID: f.deferred.QueueID, Attempts: 3, LastAttempt: qNow.Add(-10 * time.Minute), NextAttempt: next,
		Rcpts: []spool.RcptState{{Addr: "dave@grey.example", Status: spool.RcptDeferred, Attempts: 3, Code: 451, Enhanced: "4.7.1",
			Text: "greylisted, try again later", RemoteMTA: "mx.grey.example", LastAttempt: qNow.Add(-10 * time.Minute), NextAttempt: next,
			History: []spool.AttemptResult{
				{At: qNow.Add(-110 * time.Minute), Status: spool.RcptDeferred, Code: 421, Enhanced: "4.4.2", Text: "timeout after greeting", Relay: "mx2.grey.example"},
				{At: qNow.Add(-40 * time.Minute), Status: spool.RcptDeferred, Code: 451, Enhanced: "4.7.1", Text: "greylisted, try again later", Relay: "mx.grey.example"},
			}}}})
	f.saveState(t, &spool.DeliveryState{QueueID: f.mixed.QueueID, Attempts: 1, LastAttempt: qNow.Add(-5 * time.Minute), NextAttempt: qNow.Add(5 * time.Minute),
		Bounced: []string{"gone@example.org"},
		Rcpts: []spool.RcptState{
			{Addr: "gone@example.org", Status: spool.RcptFailed, Attempts: 1, Code: 550, Enhanced: "5.1.1", Text: "no such user", RemoteMTA: "mx.example.org", LastAttempt: qNow.Add(-5 * time.Minute)},
			{Addr: "eve@grey.example", Status: spool.RcptDeferred, Attempts: 1, Code: 451, Enhanced: "4.7.1", Text: "greylisted, try again later", RemoteMTA: "mx.grey.example", LastAttempt: qNow.Add(-5 * time.Minute), NextAttempt: qNow.Add(5 * time.Minute)},
		}})
	return f
}

func TestQueueLsListsEachMessageWithItsRecipientsStates(t *testing.T) {
	f := newQueueOfFour(t)
	got := mustRunQueue(t, f.url, "ls")
	size := func(e *spool.Envelope) int64 { return e.Body.Size }
	want := fmt.Sprintf(`QUEUE ID              SIZE  ARRIVED               STATE     SENDER
%s  %10d  2026-12-02 11:57:00Z  active    alice@example.net
    bob@example.org  queued  0 attempts  next: now

%s  %10d  2026-12-02 10:00:00Z  deferred  carol@example.net
    dave@grey.example  deferred  3 attempts  next: 2026-12-02 12:20:00Z  451 4.7.1 greylisted, try again later

%s  %10d  2026-12-02 11:30:00Z  deferred  <>
    gone@example.org  failed    1 attempt  -                           550 5.1.1 no such user
    eve@grey.example  deferred  1 attempt  next: 2026-12-02 12:05:00Z  451 4.7.1 greylisted, try again later

%s  %10d  2026-12-02 11:59:50Z  new       frank@example.net
    grace@example.org  queued  0 attempts  next: now
    heidi@example.org  queued  0 attempts  next: now

-- 4 messages, %d bytes
`, f.active.QueueID, size(f.active), f.deferred.QueueID, size(f.deferred), f.mixed.QueueID, size(f.mixed),
		f.fresh.QueueID, size(f.fresh), size(f.active)+size(f.deferred)+size(f.mixed)+size(f.fresh))
	if got != want {
		t.Fatalf("queue ls:\n%s\nwant:\n%s", got, want)
	}

	// JSON: one object per line, the same facts.
	lines := strings.Split(strings.TrimSpace(mustRunQueue(t, f.url, "ls", "-o", "json")), "\n")
	if len(lines) != 4 {
		t.Fatalf("ls -o json: %d lines, want 4:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	var m lsMessage
	if err := json.Unmarshal([]byte(lines[2]), &m); err != nil {
		t.Fatal(err)
	}
	if m.QueueID != f.mixed.QueueID || m.State != "deferred" || m.From != "" || m.Attempts != 1 || len(m.Rcpts) != 2 ||
		m.Rcpts[0].Status != spool.RcptFailed || m.Rcpts[0].Code != 550 || m.Rcpts[0].Reply != "no such user" || m.Rcpts[0].Relay != "mx.example.org" ||
		m.Rcpts[1].Status != spool.RcptDeferred || !m.Rcpts[1].NextAttempt.Equal(qNow.Add(5*time.Minute)) || !m.Received.Equal(f.mixed.Received) {
		t.Errorf("ls -o json, third line:\n%s\ndecoded %+v", lines[2], m)
	}
	var fresh map[string]any
	if err := json.Unmarshal([]byte(lines[3]), &fresh); err != nil {
		t.Fatal(err)
	}
	if fresh["state"] != "new" || fresh["queueId"] != f.fresh.QueueID || fresh["nextAttempt"] != nil {
		t.Errorf("ls -o json, the new message: %s", lines[3])
	}
}

func TestQueueLsFilters(t *testing.T) {
	f := newQueueOfFour(t)
	ids := func(args ...string) string {
		var out []string
		for _, l := range strings.Split(strings.TrimSpace(mustRunQueue(t, f.url, append([]string{"ls", "-o", "json"}, args...)...)), "\n") {
			if l == "" {
				continue
			}
			var m lsMessage
			if err := json.Unmarshal([]byte(l), &m); err != nil {
				t.Fatal(err)
			}
			out = append(out, m.QueueID)
		}
		return strings.Join(out, " ")
	}
	a, d, m, n := f.active.QueueID, f.deferred.QueueID, f.mixed.QueueID, f.fresh.QueueID
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, strings.Join([]string{a, d, m, n}, " ")},
		{[]string{"--sender", "CAROL@example.net"}, d},
		{[]string{"--sender", "<>"}, m},
		{[]string{"--rcpt", "heidi@example.org"}, n},
		{[]string{"--domain", "grey.example"}, d + " " + m},
		{[]string{"--domain", "example.org"}, a + " " + m + " " + n},
		{[]string{"--state", "new"}, n},
		{[]string{"--state", "active"}, a},
		{[]string{"--state", "deferred"}, d + " " + m},
		{[]string{"--state", "failed"}, m},
		{[]string{"--state", "queued"}, a + " " + n},
		{[]string{"--error", "GREYLISTED"}, d + " " + m},
		{[]string{"--error", "no such user"}, m},
		// The recipient filters hold for one same recipient.
		{[]string{"--domain", "grey.example", "--error", "no such user"}, ""},
		{[]string{"--domain", "example.org", "--state", "failed"}, m},
		{[]string{"--min-age", "1h"}, d},
		{[]string{"--max-age", "5m"}, a + " " + n},
		{[]string{"--min-age", "1m", "--max-age", "1h"}, a + " " + m},
		{[]string{"--limit", "2"}, a + " " + d},
	} {
		if got := ids(c.args...); got != c.want {
			t.Errorf("ls %v = [%s]; want [%s]", c.args, got, c.want)
		}
	}
	if _, err := runQueue(t, f.url, "ls", "--state", "bogus"); err == nil || !strings.Contains(err.Error(), "--state bogus") {
		t.Errorf("ls --state bogus: %v", err)
	}
}

func TestQueueStatCountsByState(t *testing.T) {
	f := newQueueOfFour(t)
	// Info only: 3 handed out, 2 with a state, 1 new.
	out := mustRunQueue(t, f.url, "stat", "-o", "json")
	var st statOutput
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatal(err)
	}
	if st.Messages != 4 || st.New != 1 || st.Active != 1 || st.Deferred != 2 || st.Exact || !st.Consumer ||
		st.Oldest != f.active.QueueID || st.QueueBytes == 0 || st.Bytes != st.QueueBytes+st.BodyBytes || len(st.Destinations) != 0 {
		t.Errorf("stat -o json = %s", out)
	}
	// The oldest by sequence is the first one queued: its ID says 3 minutes.
	if st.OldestAgeSec < 179 || st.OldestAgeSec > 181 {
		t.Errorf("oldest age %.3fs; want 180s", st.OldestAgeSec)
	}

	text := mustRunQueue(t, f.url, "stat", "--scan", "--top", "2")
	want := fmt.Sprintf(`messages  4     exact, from a read of every envelope and delivery state
new       1     not handed to a deliverer yet
active    1     in an attempt now or due
deferred  2     waiting for a retry
held      0     on hold until released (queue release)
bytes     %d  queue %d, large bodies 0
oldest    3m0s  %s, arrived 2026-12-02 11:57:00Z

DESTINATION   RECIPIENTS  MESSAGES
example.org   3           2
grey.example  2           2
`, st.Bytes, st.QueueBytes, f.active.QueueID)
	if text != want {
		t.Errorf("stat --scan:\n%s\nwant:\n%s", text, want)
	}
}

func TestQueueShowPrintsEnvelopeStateAndHeaders(t *testing.T) {
	f := newQueueOfFour(t)
	got := mustRunQueue(t, f.url, "show", f.mixed.QueueID)
	for _, want := range []string{
		"queue id  " + f.mixed.QueueID + " (queue sequence 3)\n",
		"state     deferred\n",
		"arrived   2026-12-02 11:30:00Z (30m0s ago)\n",
		"sender    <>\n",
		"client    192.0.2.7 (HELO client.example)\n",
		"attempts  1, last 2026-12-02 11:55:00Z, next 2026-12-02 12:05:00Z\n",
		"  gone@example.org  failed    1         2026-12-02 11:55:00Z  -                     mx.example.org   550 5.1.1 no such user\n",
		"  eve@grey.example  deferred  1         2026-12-02 11:55:00Z  2026-12-02 12:05:00Z  mx.grey.example  451 4.7.1 greylisted, try again later\n",
		"\nheaders:\nSubject: bounce\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("show lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "report") {
		t.Errorf("show prints the body without --body:\n%s", got)
	}
	// Each recipient's earlier attempts, newest first, under the latest.
	got = mustRunQueue(t, f.url, "show", f.deferred.QueueID)
	want := `  dave@grey.example  deferred  3         2026-12-02 11:50:00Z  2026-12-02 12:20:00Z  mx.grey.example   451 4.7.1 greylisted, try again later
                     deferred            2026-12-02 11:20:00Z                        mx.grey.example   451 4.7.1 greylisted, try again later
                     deferred            2026-12-02 10:10:00Z                        mx2.grey.example  421 4.4.2 timeout after greeting
`
	if !strings.Contains(got, want) {
		t.Errorf("show of a message with history:\n%s\nwant the lines:\n%s", got, want)
	}
	// A guarded mail is found by its ID too; --body is the message as stored.
	if got := mustRunQueue(t, f.url, "show", "--body", strings.ToLower(f.deferred.QueueID)); got != "Message-ID: <d@example.net>\r\nSubject: deferred\r\n\r\nhello\r\n" {
		t.Errorf("show --body = %q", got)
	}
	var js map[string]any
	if err := json.Unmarshal([]byte(mustRunQueue(t, f.url, "show", "-o", "json", f.fresh.QueueID)), &js); err != nil {
		t.Fatal(err)
	}
	if js["state"] != "new" || js["header"] != "Subject: new\r\nX-Test: 1\r\n" || js["delivery"] != nil {
		t.Errorf("show -o json = %v", js)
	}
	if _, err := runQueue(t, f.url, "show", spool.NewQueueID(qNow)); err == nil || !strings.Contains(err.Error(), "no such message") {
		t.Errorf("show of an unknown ID: %v", err)
	}
}

func TestQueueLsPagesThroughAQueueOfThousands(t *testing.T) {
	f := newQueueFixture(t)
	const total = 2500
	for i := range total {
		f.enqueue(t, time.Duration(total-i)*time.Second, fmt.Sprintf("s%d@example.net", i), "x\r\n", false, "r@example.org")
	}
	start := time.Now()
	first := mustRunQueue(t, f.url, "ls", "--limit", "100")
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("ls --limit 100 of %d took %s", total, took)
	}
	if !strings.HasSuffix(first, "-- 100 messages, 300 bytes; more: add --after-seq 100\n") {
		t.Fatalf("first page ends:\n%s", first[max(0, len(first)-300):])
	}
	seen := map[string]bool{}
	after, pages := "0", 0
	for {
		pages++
		var last lsMessage
		n := 0
		for _, l := range strings.Split(strings.TrimSpace(mustRunQueue(t, f.url, "ls", "-o", "json", "--limit", "700", "--after-seq", after)), "\n") {
			if l == "" {
				continue
			}
			if err := json.Unmarshal([]byte(l), &last); err != nil {
				t.Fatal(err)
			}
			if seen[last.QueueID] {
				t.Fatalf("%s listed twice", last.QueueID)
			}
			seen[last.QueueID] = true
			n++
		}
		if n < 700 {
			break
		}
		after = fmt.Sprint(last.Seq)
	}
	if len(seen) != total || pages != 4 {
		t.Fatalf("%d pages listed %d messages; want 4 pages of %d", pages, len(seen), total)
	}
}

func TestQueueToolsSayHowToSignIn(t *testing.T) {
	// At serve's address, the hint names serve's key file.
	qf := &queueFlags{nats: natsFlags{url: serveNATS}}
	if err := qf.connectError(nats.ErrAuthorization); !strings.Contains(err.Error(), "add --nats-nkey ./jetmail-data/nats-user.nk") {
		t.Errorf("authorization error at serve's address: %v", err)
	}
	if err := qf.connectError(nats.ErrNoServers); !strings.Contains(err.Error(), "is jetmail serve running") {
		t.Errorf("nobody at serve's address: %v", err)
	}

	// A real server like serve's, elsewhere: no key, then the key.
	dir := t.TempDir()
	keyFile, pub, err := spool.LoadOrCreateUserKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	ns, err := spool.RunEmbedded(spool.EmbeddedOptions{DataDir: dir, Listen: "127.0.0.1:0", NoSync: true, UserKey: pub})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { natstest.Stop(ns) })
	_, err = runQueue(t, ns.ClientURL(), "stat")
	if err == nil || !strings.Contains(err.Error(), "sign in with --nats-nkey (an NKEY seed file) or --nats-creds") {
		t.Errorf("stat without a key: %v", err)
	}
	_, err = runQueue(t, ns.ClientURL(), "stat", "--nats-nkey", keyFile)
	if err == nil || !strings.Contains(err.Error(), "no jetmail queue on this NATS server") {
		t.Errorf("stat with the key, before any jetmail ran: %v", err)
	}
}

func TestQueueShowBodyOfAMessageStoredInChunks(t *testing.T) {
	f := newQueueFixture(t)
	var big strings.Builder
	big.WriteString("Subject: big\r\n\r\n")
	for i := 0; big.Len() < 1500<<10; i++ {
		fmt.Fprintf(&big, "line %07d of a large message\r\n", i)
	}
	env := f.enqueue(t, time.Minute, "big@example.net", big.String(), true, "r@example.org")
	if env.Body.Chunks == 0 {
		t.Fatalf("a %d-octet body was stored inline", big.Len())
	}
	if got := mustRunQueue(t, f.url, "show", "--body", env.QueueID); got != big.String() {
		t.Fatalf("show --body: %d octets, want the %d stored", len(got), big.Len())
	}
	got := mustRunQueue(t, f.url, "show", env.QueueID)
	if want := fmt.Sprintf("body      %d chunks in JETMAIL_BODY, sha256 %s\n", env.Body.Chunks, env.Body.SHA256); !strings.Contains(got, want) {
		t.Errorf("show lacks %q:\n%s", want, got)
	}
	var st statOutput
	if err := json.Unmarshal([]byte(mustRunQueue(t, f.url, "stat", "-o", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.BodyBytes < uint64(big.Len()) || st.Messages != 1 || st.New != 1 || st.Consumer {
		t.Errorf("stat of one large message, no deliverer: %+v", st)
	}
}
