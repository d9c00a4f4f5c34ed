package spool_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/spool"
)

func TestCommitScanReadBodyRoundTripForAnInlineBody(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	body := []byte("Received: from client.example.net\r\nSubject: hi\r\n\r\nHello, Bob.\r\n")
	env := newEnvelope(spool.NewQueueID(time.Now()))
	want := *env

	res := mustCommit(t, sp, env, body, "")
	if res.Duplicate || res.QueueID != env.QueueID || res.Sequence == 0 {
		t.Fatalf("Commit = %+v; want a new mail %s with a sequence", res, env.QueueID)
	}

	msgs := scanAll(t, sp)
	if len(msgs) != 1 {
		t.Fatalf("Scan found %d mails; want 1", len(msgs))
	}
	m := msgs[0]
	if m.Tombstone || m.Sequence != res.Sequence || m.Subject == "" {
		t.Fatalf("scanned message: tombstone %v sequence %d subject %q; want a live mail at sequence %d",
			m.Tombstone, m.Sequence, m.Subject, res.Sequence)
	}
	if m.Envelope.Body.Chunks != 0 {
		t.Fatalf("a %d-octet body was chunked into %d chunks; want inline", len(body), m.Envelope.Body.Chunks)
	}
	sum := sha256.Sum256(body)
	want.Body = spool.BodyRef{ID: m.Envelope.Body.ID, Size: int64(len(body)), SHA256: hex.EncodeToString(sum[:])}
	if !strings.HasPrefix(want.Body.ID, want.QueueID+"-") {
		t.Fatalf("body ID %q is not the queue ID plus a suffix", want.Body.ID)
	}
	if !reflect.DeepEqual(m.Envelope, want) {
		t.Fatalf("envelope read back\n%+v\nwant\n%+v", m.Envelope, want)
	}
	got, err := sp.ReadBody(ctxT(t), m)
	if err != nil {
		t.Fatalf("ReadBody: %v", err)
	}
	sameBytes(t, "inline body", got, body)

	// Get by subject returns the same mail.
	byGet, err := sp.Get(ctxT(t), m.Subject)
	if err != nil {
		t.Fatalf("Get(%s): %v", m.Subject, err)
	}
	if !reflect.DeepEqual(byGet.Envelope, want) || byGet.Sequence != m.Sequence {
		t.Fatalf("Get returned %+v; want the scanned mail", byGet)
	}
}

func TestCommitOfAnEmptyBodyRoundTrips(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	env := newEnvelope(spool.NewQueueID(time.Now()))
	mustCommit(t, sp, env, nil, "")
	m, got := readBack(t, sp, env.QueueID)
	if len(got) != 0 || m.Envelope.Body.Size != 0 {
		t.Fatalf("empty body read back as %d octets, size %d", len(got), m.Envelope.Body.Size)
	}
}

func TestA20MiBBodyIsChunkedAndReadsBackIdentical(t *testing.T) {
	sp, _, nc := newSpool(t, testConfig())
	if nc.MaxPayload() != 1<<20 {
		t.Fatalf("test assumes the default 1 MiB max payload, server says %d", nc.MaxPayload())
	}
	data := pattern(20<<20, 7)
	env := newEnvelope(spool.NewQueueID(time.Now()))
	mustCommit(t, sp, env, data, "")

	m, got := readBack(t, sp, env.QueueID)
	wantChunks := (20<<20 + sp.Config().ChunkSize - 1) / sp.Config().ChunkSize
	if m.Envelope.Body.Chunks != wantChunks {
		t.Fatalf("20 MiB body stored in %d chunks; want %d of %d octets", m.Envelope.Body.Chunks, wantChunks, sp.Config().ChunkSize)
	}
	sum := sha256.Sum256(data)
	if m.Envelope.Body.SHA256 != hex.EncodeToString(sum[:]) || m.Envelope.Body.Size != int64(len(data)) {
		t.Fatalf("body ref %+v does not describe the 20 MiB written", m.Envelope.Body)
	}
	sameBytes(t, "20 MiB body", got, data)
	if n := streamMsgs(t, sp.JetStream(), spool.BodyStream, "jetmail.body."+env.Body.ID+".>"); n != uint64(wantChunks) {
		t.Fatalf("body stream holds %d chunks of %s; want %d", n, env.QueueID, wantChunks)
	}
}

func TestABodyJustOverTheInlineLimitIsChunked(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	for name, size := range map[string]int{
		"a body of exactly InlineMax octets stays inline": sp.InlineMax(),
		"a body one octet over InlineMax is chunked":      sp.InlineMax() + 1,
	} {
		t.Run(name, func(t *testing.T) {
			data := pattern(size, 3)
			env := newEnvelope(spool.NewQueueID(time.Now()))
			mustCommit(t, sp, env, data, "")
			m, got := readBack(t, sp, env.QueueID)
			if chunked := m.Envelope.Body.Chunks > 0; chunked != (size > sp.InlineMax()) {
				t.Fatalf("%d octets (InlineMax %d): %d chunks", size, sp.InlineMax(), m.Envelope.Body.Chunks)
			}
			sameBytes(t, "body", got, data)
		})
	}
}

// commitChunked queues a 3 MiB body of at least 4 chunks.
func commitChunked(t *testing.T, sp *spool.Spool, seed byte) (*spool.Message, []byte) {
	t.Helper()
	data := pattern(3<<20, seed)
	env := newEnvelope(spool.NewQueueID(time.Now()))
	mustCommit(t, sp, env, data, "")
	m, _ := readBack(t, sp, env.QueueID)
	if m.Envelope.Body.Chunks < 4 {
		t.Fatalf("3 MiB body has %d chunks; the test needs at least 4", m.Envelope.Body.Chunks)
	}
	return m, data
}

func TestACorruptedChunkFailsTheDigestCheck(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	m, _ := commitChunked(t, sp, 11)

	// Same length, one flipped octet: only the digest can tell.
	subj := fmt.Sprintf("jetmail.body.%s.%d", m.Envelope.Body.ID, 2)
	orig, err := getLast(t, sp, spool.BodyStream, subj)
	if err != nil {
		t.Fatalf("read chunk %s: %v", subj, err)
	}
	bad := append([]byte(nil), orig.Data...)
	bad[len(bad)/2] ^= 0x20
	if _, err := sp.JetStream().Publish(ctxT(t), subj, bad); err != nil {
		t.Fatalf("overwrite chunk %s: %v", subj, err)
	}
	if n := streamMsgs(t, sp.JetStream(), spool.BodyStream, subj); n != 1 {
		t.Fatalf("chunk subject holds %d messages after overwrite; want 1 (MaxMsgsPerSubject)", n)
	}

	_, err = sp.ReadBody(ctxT(t), m)
	if !errors.Is(err, spool.ErrBodyCorrupt) {
		t.Fatalf("ReadBody of a corrupted chunk = %v; want ErrBodyCorrupt", err)
	}

	// A chunk that is gone is an error too, never a short body.
	if err := purgeSubject(t, sp, subj); err != nil {
		t.Fatal(err)
	}
	if body, err := sp.ReadBody(ctxT(t), m); err == nil {
		t.Fatalf("ReadBody with a missing chunk returned %d octets and no error", len(body))
	}
}

// The deliverer sends bodies with OpenBody: one chunk in memory at a time,
// and a body that is not the one stored never reaches io.EOF, so a sender
// that waits for io.EOF before its final dot never delivers it.
func TestOpenBodyReadsAChunkAtATimeAndEndsInErrBodyCorruptForABadBody(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	m, data := commitChunked(t, sp, 5)
	n := m.Envelope.Body.Chunks

	r, err := sp.OpenBody(ctxT(t), m)
	if err != nil {
		t.Fatal(err)
	}
	if r.Size() != int64(len(data)) {
		t.Fatalf("Size = %d; want %d", r.Size(), len(data))
	}
	var pieces recorder
	if _, err := r.WriteTo(&pieces); err != nil {
		t.Fatalf("WriteTo: %v", err)
	}
	sameBytes(t, "streamed body", pieces.buf.Bytes(), data)
	if pieces.writes != n || pieces.largest > sp.Config().ChunkSize {
		t.Fatalf("WriteTo made %d writes of up to %d octets; want %d, one per chunk of at most %d", pieces.writes, pieces.largest, n, sp.Config().ChunkSize)
	}

	// Read with a small buffer, as io.Copy into a network connection does.
	r, err = sp.OpenBody(ctxT(t), m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(io.LimitReader(struct{ io.Reader }{r}, 1<<30))
	if err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "read body", got, data)

	// One flipped octet in the third chunk: every octet can be read, and
	// the end is ErrBodyCorrupt, not io.EOF.
	subj := fmt.Sprintf("jetmail.body.%s.%d", m.Envelope.Body.ID, 2)
	orig, err := getLast(t, sp, spool.BodyStream, subj)
	if err != nil {
		t.Fatal(err)
	}
	bad := append([]byte(nil), orig.Data...)
	bad[7] ^= 1
	if _, err := sp.JetStream().Publish(ctxT(t), subj, bad); err != nil {
		t.Fatal(err)
	}
	r, err = sp.OpenBody(ctxT(t), m)
	if err != nil {
		t.Fatal(err)
	}
	copied, err := io.Copy(io.Discard, struct{ io.Reader }{r})
	if !errors.Is(err, spool.ErrBodyCorrupt) || copied != int64(len(data)) {
		t.Fatalf("copy of a body with a flipped octet: %d octets, %v; want all %d and ErrBodyCorrupt", copied, err, len(data))
	}

	// A chunk longer than it was: refused as soon as the body outgrows
	// its size, before the rest is read.
	last := fmt.Sprintf("jetmail.body.%s.%d", m.Envelope.Body.ID, n-1)
	lm, err := getLast(t, sp, spool.BodyStream, last)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sp.JetStream().Publish(ctxT(t), last, append(lm.Data, 'x')); err != nil {
		t.Fatal(err)
	}
	if _, err := sp.JetStream().Publish(ctxT(t), subj, orig.Data); err != nil {
		t.Fatal(err)
	}
	r, err = sp.OpenBody(ctxT(t), m)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, struct{ io.Reader }{r}); !errors.Is(err, spool.ErrBodyCorrupt) {
		t.Fatalf("copy of a body with an octet too many = %v; want ErrBodyCorrupt", err)
	}

	// A missing middle chunk is an error after the chunks before it; a
	// missing first chunk fails the open, before anything was read.
	if err := purgeSubject(t, sp, subj); err != nil {
		t.Fatal(err)
	}
	r, err = sp.OpenBody(ctxT(t), m)
	if err != nil {
		t.Fatal(err)
	}
	copied, err = io.Copy(io.Discard, struct{ io.Reader }{r})
	if err == nil || errors.Is(err, spool.ErrBodyCorrupt) || copied != 2*int64(sp.Config().ChunkSize) {
		t.Fatalf("copy with chunk 2 missing: %d octets, %v; want the 2 chunks before it and a read error", copied, err)
	}
	if err := purgeSubject(t, sp, fmt.Sprintf("jetmail.body.%s.0", m.Envelope.Body.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := sp.OpenBody(ctxT(t), m); err == nil {
		t.Fatal("OpenBody with chunk 0 missing succeeded")
	}
}

func TestReadHeadReadsUpToTheHeaderSectionNotTheBody(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	head := "Subject: big\r\nX-Pad: " + strings.Repeat("h", 300<<10) + "\r\n\r\n"
	cases := map[string]struct {
		body       string
		limit      int
		wantAtMost int
	}{
		// The header section ends in the second chunk: two chunks read.
		"a 3 MiB body whose headers span two chunks": {head + strings.Repeat("b", 3<<20), 1 << 20, 2 * sp.Config().ChunkSize},
		// No empty line at all: the limit stops it, at the chunk that
		// crosses it.
		"a 3 MiB body without an empty line": {strings.Repeat("h", 3<<20), 600 << 10, 3 * sp.Config().ChunkSize},
		"an inline body is returned whole":   {"Subject: x\r\n\r\nsmall\r\n", 1 << 20, 100},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			env := newEnvelope(spool.NewQueueID(time.Now()))
			mustCommit(t, sp, env, []byte(tc.body), "")
			m, _ := readBack(t, sp, env.QueueID)
			got, err := sp.ReadHead(ctxT(t), m, tc.limit)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) > tc.wantAtMost || !strings.HasPrefix(tc.body, string(got)) {
				t.Fatalf("ReadHead returned %d octets (a prefix: %v); want a prefix of at most %d", len(got), strings.HasPrefix(tc.body, string(got)), tc.wantAtMost)
			}
			if strings.Contains(tc.body, "\r\n\r\n") && !strings.Contains(string(got), "\r\n\r\n") {
				t.Fatalf("ReadHead returned %d octets without the end of the header section", len(got))
			}
			if !strings.Contains(tc.body, "\r\n\r\n") && len(got) < tc.limit {
				t.Fatalf("ReadHead returned %d octets of a body without an empty line; want at least the limit %d", len(got), tc.limit)
			}
		})
	}
}

// recorder counts the writes made to it.
type recorder struct {
	buf             bytes.Buffer
	writes, largest int
}

func (w *recorder) Write(p []byte) (int, error) {
	w.writes++
	w.largest = max(w.largest, len(p))
	return w.buf.Write(p)
}

func TestACorruptedInlineBodyFailsTheDigestCheck(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	env := newEnvelope(spool.NewQueueID(time.Now()))
	mustCommit(t, sp, env, []byte("Subject: x\r\n\r\nThe body.\r\n"), "")
	m, _ := readBack(t, sp, env.QueueID)
	raw, err := getLast(t, sp, spool.QueueStream, m.Subject)
	if err != nil {
		t.Fatal(err)
	}
	for name, tamper := range map[string]func([]byte) []byte{
		"a flipped octet in the body": func(d []byte) []byte { d[len(d)-3] ^= 1; return d },
		"a truncated body":            func(d []byte) []byte { return d[:len(d)-1] },
		"an extra octet":              func(d []byte) []byte { return append(d, 'x') },
	} {
		t.Run(name, func(t *testing.T) {
			data := tamper(append([]byte(nil), raw.Data...))
			dm, err := spool.Decode(raw.Subject, raw.Sequence, raw.Header, data)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if _, err := sp.ReadBody(ctxT(t), dm); !errors.Is(err, spool.ErrBodyCorrupt) {
				t.Fatalf("ReadBody = %v; want ErrBodyCorrupt", err)
			}
		})
	}
	if _, err := spool.Decode(raw.Subject, raw.Sequence, raw.Header, []byte(`{"queueId":"x"}`)); err == nil {
		t.Fatal("Decode of an envelope without its newline separator succeeded")
	}
}

func TestDuplicateGuard(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	next := queueIDs()
	guardA := spool.Fingerprint("a@example.net", []string{"b@example.org"}, []byte("d1"))
	guardB := spool.Fingerprint("a@example.net", []string{"b@example.org"}, []byte("d2"))
	for name, tc := range map[string]struct {
		first, second string
		duplicate     bool
	}{
		"a second commit with the same guard is a duplicate": {guardA, guardA, true},
		"commits with different guards are both stored":      {guardA + "0", guardB, false},
		"an empty guard never deduplicates":                  {"", "", false},
	} {
		t.Run(name, func(t *testing.T) {
			before := len(scanAll(t, sp))
			e1, e2 := newEnvelope(next()), newEnvelope(next())
			r1 := mustCommit(t, sp, e1, []byte("same body\r\n"), tc.first)
			r2 := mustCommit(t, sp, e2, []byte("same body\r\n"), tc.second)
			if r1.Duplicate || r1.QueueID != e1.QueueID {
				t.Fatalf("first commit = %+v; want new mail %s", r1, e1.QueueID)
			}
			added := len(scanAll(t, sp)) - before
			if tc.duplicate {
				if !r2.Duplicate || r2.QueueID != e1.QueueID || r2.Sequence != r1.Sequence {
					t.Fatalf("second commit = %+v; want duplicate of %s at %d", r2, e1.QueueID, r1.Sequence)
				}
				if added != 1 {
					t.Fatalf("%d mails queued for two commits of one transmission; want 1", added)
				}
				if findQueued(t, sp, e2.QueueID) != nil {
					t.Fatalf("the duplicate %s is in the queue", e2.QueueID)
				}
				return
			}
			if r2.Duplicate || r2.QueueID != e2.QueueID {
				t.Fatalf("second commit = %+v; want new mail %s", r2, e2.QueueID)
			}
			if added != 2 {
				t.Fatalf("%d mails queued; want 2", added)
			}
		})
	}
}

func TestADuplicateOfAChunkedMailLeavesNoChunksBehind(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	next := queueIDs()
	data := pattern(2<<20, 5)
	guard := guardFor(1)
	e1, e2 := newEnvelope(next()), newEnvelope(next())
	mustCommit(t, sp, e1, data, guard)
	r2 := mustCommit(t, sp, e2, data, guard)
	if !r2.Duplicate || r2.QueueID != e1.QueueID {
		t.Fatalf("second commit = %+v; want duplicate of %s", r2, e1.QueueID)
	}
	if n := streamMsgs(t, sp.JetStream(), spool.BodyStream, "jetmail.body."+e2.Body.ID+".>"); n != 0 {
		t.Fatalf("%d chunks of the refused duplicate %s remain", n, e2.QueueID)
	}
	_, got := readBack(t, sp, e1.QueueID)
	sameBytes(t, "original body", got, data)
}

func TestEightGatewaysCommittingTheSameTransmissionQueueItOnce(t *testing.T) {
	sp, s, _ := newSpool(t, testConfig())
	const n = 8
	// One connection and spool handle per "gateway", as in a cluster.
	spools := make([]*spool.Spool, n)
	for i := range spools {
		spools[i] = openSpool(t, connect(t, s), testConfig())
	}
	guard := guardFor(8)
	next := queueIDs()
	envs := make([]*spool.Envelope, n)
	bodies := make([]*spool.Body, n)
	for i := range envs {
		envs[i] = newEnvelope(next())
		var err error
		bodies[i], err = writeBody(t, spools[i], envs[i].QueueID, []byte("racing body\r\n"), 1024)
		if err != nil {
			t.Fatal(err)
		}
	}
	results := make([]spool.Result, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			results[i], errs[i] = spools[i].Commit(ctxT(t), envs[i], bodies[i], guard)
		}()
	}
	close(start)
	wg.Wait()

	winner := -1
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			t.Fatalf("commit %d: %v", i, errs[i])
		}
		if !results[i].Duplicate {
			if winner >= 0 {
				t.Fatalf("commits %d and %d both stored the transmission", winner, i)
			}
			winner = i
		}
	}
	if winner < 0 {
		t.Fatal("every commit reported a duplicate; none stored the transmission")
	}
	for i, r := range results {
		if r.QueueID != envs[winner].QueueID {
			t.Fatalf("commit %d answered queue ID %s; the stored one is %s", i, r.QueueID, envs[winner].QueueID)
		}
	}
	msgs := scanAll(t, sp)
	if len(msgs) != 1 || msgs[0].Envelope.QueueID != envs[winner].QueueID {
		t.Fatalf("queue holds %d mails after the race; want only %s", len(msgs), envs[winner].QueueID)
	}
}

func TestCompleteLeavesATombstoneThatKeepsTheGuard(t *testing.T) {
	sp, _, _ := newSpool(t, testConfig())
	next := queueIDs()
	guard := guardFor(2)
	data := pattern(2<<20, 9) // chunked, so Complete has chunks to delete
	e1 := newEnvelope(next())
	mustCommit(t, sp, e1, data, guard)
	other := newEnvelope(next())
	mustCommit(t, sp, other, []byte("unrelated\r\n"), "")

	m := findQueued(t, sp, e1.QueueID)
	if m == nil || m.Envelope.Body.Chunks == 0 {
		t.Fatalf("chunked mail %s not queued as chunked: %+v", e1.QueueID, m)
	}
	if err := sp.Complete(ctxT(t), m); err != nil {
		t.Fatalf("Complete: %v", err)
	}

	if findQueued(t, sp, e1.QueueID) != nil {
		t.Fatalf("Scan still lists %s after Complete", e1.QueueID)
	}
	if findQueued(t, sp, other.QueueID) == nil {
		t.Fatalf("Complete of %s removed the unrelated %s", e1.QueueID, other.QueueID)
	}
	if n := streamMsgs(t, sp.JetStream(), spool.BodyStream, "jetmail.body."+e1.Body.ID+".>"); n != 0 {
		t.Fatalf("%d chunks of %s remain after Complete", n, e1.QueueID)
	}
	tomb, err := sp.Get(ctxT(t), m.Subject)
	if err != nil {
		t.Fatalf("Get tombstone: %v", err)
	}
	if !tomb.Tombstone || tomb.Envelope.QueueID != e1.QueueID {
		t.Fatalf("record after Complete = %+v; want a tombstone naming %s", tomb, e1.QueueID)
	}
	if _, err := sp.ReadBody(ctxT(t), tomb); err == nil {
		t.Fatal("ReadBody of a tombstone succeeded")
	}

	retry := newEnvelope(next())
	r := mustCommit(t, sp, retry, data, guard)
	if !r.Duplicate || r.QueueID != e1.QueueID {
		t.Fatalf("retransmission after delivery = %+v; want a duplicate of %s", r, e1.QueueID)
	}
	if findQueued(t, sp, retry.QueueID) != nil {
		t.Fatalf("the retransmission %s was queued", retry.QueueID)
	}

	// Completing again from the same copy (a retry after a timeout) finds
	// its tombstone: done, and nothing is written over it.
	if err := sp.Complete(ctxT(t), m); err != nil {
		t.Fatalf("a second Complete of the same mail: %v", err)
	}
	if again, err := sp.Get(ctxT(t), m.Subject); err != nil || again.Sequence != tomb.Sequence {
		t.Fatalf("after a second Complete the record is %+v (%v); want the tombstone at %d untouched", again, err, tomb.Sequence)
	}
	// A copy whose record was replaced by something else is not queued.
	stale := *m
	stale.Envelope.QueueID = next()
	if err := sp.Complete(ctxT(t), &stale); !errors.Is(err, spool.ErrNotQueued) {
		t.Fatalf("Complete of a mail whose record is another's tombstone = %v; want ErrNotQueued", err)
	}
}

func TestTheTombstoneExpiresWithTheDuplicateWindow(t *testing.T) {
	cfg := testConfig()
	cfg.DuplicateWindow = time.Second
	sp, _, _ := newSpool(t, cfg)
	next := queueIDs()
	guard := guardFor(3)
	e1 := newEnvelope(next())
	mustCommit(t, sp, e1, []byte("body\r\n"), guard)
	m := findQueued(t, sp, e1.QueueID)
	if err := sp.Complete(ctxT(t), m); err != nil {
		t.Fatalf("Complete: %v", err)
	}
	start := time.Now()
	var fresh spool.Result
	eventually(t, 15*time.Second, "the guard to expire after the duplicate window", func() bool {
		fresh = mustCommit(t, sp, newEnvelope(next()), []byte("body\r\n"), guard)
		return !fresh.Duplicate
	})
	if waited := time.Since(start); waited < 500*time.Millisecond {
		t.Fatalf("the guard expired after %s; the window is %s", waited, cfg.DuplicateWindow)
	}
	if findQueued(t, sp, fresh.QueueID) == nil {
		t.Fatalf("the new transmission %s is not queued", fresh.QueueID)
	}
	if got := len(scanAll(t, sp)); got != 1 {
		t.Fatalf("queue holds %d mails; want only the new transmission", got)
	}
}

// Two gateways can mint the same queue ID in the same millisecond (30 random
// bits; at 5,000 mails per second across a cluster that is roughly once a
// day). The package promises that this turns into a retry, never an
// overwrite and never a lost mail.
func TestTwoMailsMintedWithTheSameQueueIDNeverLoseEitherBody(t *testing.T) {
	for name, tc := range map[string]struct {
		guard1, guard2 string
		size           int
	}{
		"two unguarded inline mails":                           {"", "", 1 << 10},
		"two guarded inline mails with different fingerprints": {guardFor(20), guardFor(21), 1 << 10},
		"two unguarded chunked mails":                          {"", "", 2 << 20},
	} {
		t.Run(name, func(t *testing.T) {
			sp, _, _ := newSpool(t, testConfig())
			qid := spool.NewQueueID(time.Now())
			first, second := pattern(tc.size, 1), pattern(tc.size, 2)
			mustCommit(t, sp, newEnvelope(qid), first, tc.guard1)
			r, err := commit(t, sp, newEnvelope(qid), second, tc.guard2)

			var bodies [][]byte
			for _, m := range scanAll(t, sp) {
				b, rerr := sp.ReadBody(ctxT(t), m)
				if rerr != nil {
					t.Fatalf("after the collision, mail %s at %s is unreadable: %v", m.Envelope.QueueID, m.Subject, rerr)
				}
				bodies = append(bodies, b)
			}
			if len(bodies) == 0 || string(bodies[0]) != string(first) {
				t.Fatalf("the first mail is gone or changed after a second commit under its queue ID")
			}
			if err != nil {
				return // refused: the gateway answers 4xx and the client retries
			}
			if r.Duplicate {
				t.Fatalf("a different mail under the same queue ID was reported as a duplicate: %+v", r)
			}
			if len(bodies) != 2 || string(bodies[1]) != string(second) {
				t.Fatalf("second commit under queue ID %s returned success %+v, but the queue holds %d mails and not its body", qid, r, len(bodies))
			}
		})
	}
}

func purgeSubject(t testing.TB, sp *spool.Spool, subj string) error {
	t.Helper()
	st, err := sp.JetStream().Stream(ctxT(t), spool.BodyStream)
	if err != nil {
		return err
	}
	return st.Purge(ctxT(t), jetstream.WithPurgeSubject(subj))
}

func getLast(t testing.TB, sp *spool.Spool, stream, subj string) (*jetstream.RawStreamMsg, error) {
	t.Helper()
	st, err := sp.JetStream().Stream(ctxT(t), stream)
	if err != nil {
		return nil, err
	}
	return st.GetLastMsgForSubject(ctxT(t), subj)
}

// A publish whose acknowledgement was lost (the server stalled, a stream
// leader changed) was stored all the same. Commit's retry of it must
// recognise its own mail, answer with its queue ID and keep its body: not
// call it a duplicate of itself (and delete the body), and not refuse it
// (and have the client send it again).
func TestACommitWhoseAcknowledgementWasLostIsQueuedOnceWithItsBody(t *testing.T) {
	for _, guarded := range []bool{false, true} {
		t.Run(fmt.Sprintf("guarded=%v", guarded), func(t *testing.T) {
			cfg := testConfig()
			cfg.PublishTimeout = 3 * time.Second // three tries of one second
			s := startNATS(t, t.TempDir(), -1)
			stall := natstest.NewStall(t, s.Addr().String())
			nc, err := nats.Connect(stall.URL(), spool.NATSOptions()...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(nc.Close)
			sp := openSpool(t, nc, cfg)
			env := newEnvelope(spool.NewQueueID(time.Now()))
			data := pattern(2<<20, 9) // chunked: a body the envelope depends on
			b, err := writeBody(t, sp, env.QueueID, data, 64<<10)
			if err != nil {
				t.Fatal(err)
			}
			guard := ""
			if guarded {
				guard = guardFor(400)
			}
			// The first try reaches the server only when the stall ends,
			// after it has timed out; a later try then finds it stored.
			stall.Stop()
			time.AfterFunc(1500*time.Millisecond, stall.Resume)
			res, err := sp.Commit(ctxT(t), env, b, guard)
			if err != nil {
				t.Fatalf("Commit after a lost acknowledgement: %v", err)
			}
			if res.Duplicate || res.QueueID != env.QueueID {
				t.Fatalf("Commit = %+v; want %s queued, not a duplicate", res, env.QueueID)
			}
			if n := streamMsgs(t, sp.JetStream(), spool.QueueStream, ""); n != 1 {
				t.Fatalf("queue holds %d records; want 1", n)
			}
			_, got := readBack(t, sp, env.QueueID)
			sameBytes(t, "body after a lost acknowledgement", got, data)
		})
	}
}
