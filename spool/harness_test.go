package spool_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/spool"
)

// startNATS runs a real NATS server with JetStream in process, on loopback,
// storing in dir. port -1 picks a free port. The server is shut down when the
// test ends (shutting down twice is harmless).
func startNATS(t testing.TB, dir string, port int) *server.Server {
	t.Helper()
	return natstest.Start(t, natstest.Options{Dir: dir, Port: port})
}

// stopNATS shuts s down and waits until its store is closed.
func stopNATS(s *server.Server) { natstest.Stop(s) }

// connect opens a client connection to s, closed when the test ends.
func connect(t testing.TB, s *server.Server, opts ...nats.Option) *nats.Conn {
	t.Helper()
	return natstest.Connect(t, s, append(spool.NATSOptions(), opts...)...)
}

// testConfig is the embedded default with timeouts a test can live with.
func testConfig() spool.Config {
	c := spool.DefaultConfig()
	c.PublishTimeout = 5 * time.Second
	return c
}

// openSpool opens a spool on nc or fails the test.
func openSpool(t testing.TB, nc *nats.Conn, cfg spool.Config) *spool.Spool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sp, err := spool.Open(ctx, nc, cfg)
	if err != nil {
		t.Fatalf("open spool: %v", err)
	}
	return sp
}

// newSpool is a fresh server, connection and spool with cfg.
func newSpool(t testing.TB, cfg spool.Config) (*spool.Spool, *server.Server, *nats.Conn) {
	t.Helper()
	s := startNATS(t, t.TempDir(), -1)
	nc := connect(t, s)
	return openSpool(t, nc, cfg), s, nc
}

// ctxT is a context bounded well within the test timeout.
func ctxT(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// queueIDs returns a generator of distinct, increasing queue IDs.
func queueIDs() func() string {
	next := time.Now()
	return func() string {
		next = next.Add(time.Millisecond)
		return spool.NewQueueID(next)
	}
}

func newEnvelope(qid string) *spool.Envelope {
	return &spool.Envelope{
		QueueID:  qid,
		Received: time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC),
		Gateway:  "gw-0",
		ClientIP: "192.0.2.10",
		Helo:     "client.example.net",
		TLS:      true,
		AuthUser: "alice",
		From:     "alice@example.net",
		Mail:     spool.MailParams{Size: 1234, Body: "8BITMIME", SMTPUTF8: true, Ret: "HDRS", EnvID: "env-1"},
		Rcpts: []spool.Rcpt{
			{Addr: "bob@example.org", Notify: []string{"SUCCESS", "FAILURE"}, ORcpt: "rfc822;bob@example.org"},
			{Addr: "carol@example.org"},
		},
	}
}

// writeBody writes data into a new Body in pieces of at most piece octets.
func writeBody(t testing.TB, sp *spool.Spool, qid string, data []byte, piece int) (*spool.Body, error) {
	t.Helper()
	b := sp.NewBody(ctxT(t), qid)
	for off := 0; off < len(data); off += piece {
		end := min(off+piece, len(data))
		n, err := b.Write(data[off:end])
		if err != nil {
			return b, err
		}
		if n != end-off {
			t.Fatalf("Body.Write wrote %d of %d octets without an error", n, end-off)
		}
	}
	return b, nil
}

// commit writes data as the body of env and commits it under guard.
func commit(t testing.TB, sp *spool.Spool, env *spool.Envelope, data []byte, guard string) (spool.Result, error) {
	t.Helper()
	b, err := writeBody(t, sp, env.QueueID, data, 64<<10)
	if err != nil {
		b.Discard()
		return spool.Result{}, err
	}
	return sp.Commit(ctxT(t), env, b, guard)
}

// mustCommit commits and fails the test on error.
func mustCommit(t testing.TB, sp *spool.Spool, env *spool.Envelope, data []byte, guard string) spool.Result {
	t.Helper()
	res, err := commit(t, sp, env, data, guard)
	if err != nil {
		t.Fatalf("commit %s: %v", env.QueueID, err)
	}
	return res
}

// scanAll returns every queued mail.
func scanAll(t testing.TB, sp *spool.Spool) []*spool.Message {
	t.Helper()
	var out []*spool.Message
	if err := sp.Scan(ctxT(t), func(m *spool.Message) error {
		out = append(out, m)
		return nil
	}); err != nil {
		t.Fatalf("scan: %v", err)
	}
	return out
}

// findQueued returns the queued mail with queue ID qid, or nil.
func findQueued(t testing.TB, sp *spool.Spool, qid string) *spool.Message {
	t.Helper()
	for _, m := range scanAll(t, sp) {
		if m.Envelope.QueueID == qid {
			return m
		}
	}
	return nil
}

// streamMsgs is the number of messages stored in stream name, optionally
// only those on subject filter.
func streamMsgs(t testing.TB, js jetstream.JetStream, name, filter string) uint64 {
	t.Helper()
	st, err := js.Stream(ctxT(t), name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	var opts []jetstream.StreamInfoOpt
	if filter != "" {
		opts = append(opts, jetstream.WithSubjectFilter(filter))
	}
	info, err := st.Info(ctxT(t), opts...)
	if err != nil {
		t.Fatalf("stream %s info: %v", name, err)
	}
	if filter == "" {
		return info.State.Msgs
	}
	var n uint64
	for _, c := range info.State.Subjects {
		n += c
	}
	return n
}

// eventually polls cond every 50ms until it holds or the deadline passes.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true within %s", what, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pattern returns n deterministic, non-repeating-looking octets.
func pattern(n int, seed byte) []byte {
	out := make([]byte, n)
	x := uint32(seed) + 1
	for i := range out {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		out[i] = byte(x)
	}
	return out
}

// readBack scans for qid and returns its body, checked.
func readBack(t testing.TB, sp *spool.Spool, qid string) (*spool.Message, []byte) {
	t.Helper()
	m := findQueued(t, sp, qid)
	if m == nil {
		t.Fatalf("%s is not in the queue", qid)
	}
	body, err := sp.ReadBody(ctxT(t), m)
	if err != nil {
		t.Fatalf("read body of %s: %v", qid, err)
	}
	return m, body
}

func sameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: %d octets read, %d written, first difference at %d", what, len(got), len(want), i)
	}
}

func guardFor(i int) string {
	return spool.Fingerprint(fmt.Sprintf("sender%d@example.net", i), []string{"rcpt@example.org"}, []byte("digest"))
}
