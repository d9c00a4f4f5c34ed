package spool_test

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/jetmail/jetmail/spool"
)

func TestAFullQueueRefusesNewMailAndKeepsWhatIsQueued(t *testing.T) {
	cfg := testConfig()
	cfg.MaxQueueBytes = 64 << 10
	sp, _, _ := newSpool(t, cfg)
	next := queueIDs()

	stored := map[string][]byte{}
	var full error
	for i := 0; i < 100 && full == nil; i++ {
		env := newEnvelope(next())
		data := pattern(2<<10, byte(i))
		res, err := commit(t, sp, env, data, guardFor(100+i))
		if err != nil {
			full = err
			if res.QueueID != "" || res.Sequence != 0 {
				t.Fatalf("failed commit returned a result %+v", res)
			}
			if findQueued(t, sp, env.QueueID) != nil {
				t.Fatalf("commit of %s failed (%v) yet it is queued", env.QueueID, err)
			}
			break
		}
		stored[env.QueueID] = data
	}
	if full == nil {
		t.Fatalf("100 mails of 2 KiB fit in a 64 KiB queue")
	}
	if len(stored) < 10 {
		t.Fatalf("the 64 KiB queue was full after %d mails of 2 KiB: %v", len(stored), full)
	}
	if errors.Is(full, spool.ErrBodyCorrupt) {
		t.Fatalf("a full queue reported a corrupt body: %v", full)
	}

	msgs := scanAll(t, sp)
	if len(msgs) != len(stored) {
		t.Fatalf("full queue lists %d mails; %d were committed", len(msgs), len(stored))
	}
	for _, m := range msgs {
		body, err := sp.ReadBody(ctxT(t), m)
		if err != nil {
			t.Fatalf("mail %s unreadable in a full queue: %v", m.Envelope.QueueID, err)
		}
		sameBytes(t, m.Envelope.QueueID, body, stored[m.Envelope.QueueID])
	}

	// A full queue must still drain: delivering a mail replaces its envelope
	// by a smaller tombstone, which must not be refused for lack of room.
	if err := sp.Complete(ctxT(t), msgs[0]); err != nil {
		t.Fatalf("Complete in a full queue: %v", err)
	}
	if findQueued(t, sp, msgs[0].Envelope.QueueID) != nil {
		t.Fatalf("%s still queued after Complete", msgs[0].Envelope.QueueID)
	}
}

func TestAFullBodyStreamRefusesTheMailAndLeavesNothingBehind(t *testing.T) {
	cfg := testConfig()
	cfg.MaxBodyBytes = 512 << 10
	sp, _, _ := newSpool(t, cfg)
	env := newEnvelope(spool.NewQueueID(time.Now()))
	data := pattern(3<<20, 1)

	b, werr := writeBody(t, sp, env.QueueID, data, 64<<10)
	res, cerr := sp.Commit(ctxT(t), env, b, guardFor(200))
	if werr == nil && cerr == nil {
		t.Fatalf("a 3 MiB body was committed into a 512 KiB body stream: %+v", res)
	}
	if cerr == nil {
		t.Fatalf("Body.Write failed (%v) but Commit then succeeded: %+v", werr, res)
	}
	if werr != nil {
		if _, err := b.Write([]byte("more")); err == nil {
			t.Fatal("Body.Write succeeded after an earlier write failed")
		}
	}
	if n := len(scanAll(t, sp)); n != 0 {
		t.Fatalf("%d mails queued after a failed commit", n)
	}
	if n := streamMsgs(t, sp.JetStream(), spool.BodyStream, ""); n != 0 {
		t.Fatalf("%d chunks left in the body stream after a failed commit", n)
	}
	if n := streamMsgs(t, sp.JetStream(), spool.QueueStream, ""); n != 0 {
		t.Fatalf("%d records left in the queue stream after a failed commit", n)
	}

	// The guard was not taken by the failed attempt: a retry that fits works.
	small := newEnvelope(spool.NewQueueID(time.Now().Add(time.Second)))
	if r := mustCommit(t, sp, small, pattern(300<<10, 2), guardFor(200)); r.Duplicate {
		t.Fatalf("the retry after a failed commit is a duplicate of %s", r.QueueID)
	}
}

func TestAChunkSizeAboveTheMaxPayloadIsRefusedAtOpen(t *testing.T) {
	_, _, nc := newSpool(t, testConfig())
	cfg := testConfig()
	cfg.ChunkSize = int(nc.MaxPayload()) + 1
	if sp2, err := spool.Open(ctxT(t), nc, cfg); err == nil {
		// If Open accepts it, it must still store a large mail.
		env := newEnvelope(spool.NewQueueID(time.Now()))
		if _, err := commit(t, sp2, env, pattern(3<<20, 1), ""); err != nil {
			t.Fatalf("Open accepted ChunkSize %d > max payload %d and a 3 MiB mail then failed: %v",
				cfg.ChunkSize, nc.MaxPayload(), err)
		}
	}
}

func TestCommitWithoutNATSFailsWithinThePublishTimeout(t *testing.T) {
	for name, kill := range map[string]func(s *server.Server, nc *nats.Conn){
		"the connection is closed":             func(s *server.Server, nc *nats.Conn) { nc.Close() },
		"the server is down and never returns": func(s *server.Server, nc *nats.Conn) { stopNATS(s) },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig()
			cfg.PublishTimeout = time.Second
			dir := t.TempDir()
			s := startNATS(t, dir, -1)
			nc := connect(t, s)
			sp := openSpool(t, nc, cfg)
			env := newEnvelope(spool.NewQueueID(time.Now()))
			b, err := writeBody(t, sp, env.QueueID, []byte("body\r\n"), 64)
			if err != nil {
				t.Fatal(err)
			}
			kill(s, nc)

			start := time.Now()
			res, err := sp.Commit(ctxT(t), env, b, guardFor(300))
			took := time.Since(start)
			if err == nil {
				t.Fatalf("Commit without NATS succeeded: %+v", res)
			}
			if took > cfg.PublishTimeout+500*time.Millisecond {
				t.Fatalf("Commit without NATS took %s; PublishTimeout is %s", took, cfg.PublishTimeout)
			}
			if sp.Ping(ctxT(t)) == nil {
				t.Fatal("Ping says ready without NATS")
			}
		})
	}
}

// A Commit that failed while the server was away must not store the mail
// later: the gateway has answered 4xx, the client will send it again, and an
// unguarded mail would then be queued twice. The gateway connects with
// nats.MaxReconnects(-1) and the default reconnect buffer (cmd/jetmail).
func TestACommitThatFailedDuringAnOutageIsNotStoredWhenTheServerReturns(t *testing.T) {
	cfg := testConfig()
	cfg.PublishTimeout = time.Second
	dir := t.TempDir()
	s := startNATS(t, dir, -1)
	port := s.Addr().(*net.TCPAddr).Port
	// As cmd/jetmail connects the gateway.
	nc := connect(t, s, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	sp := openSpool(t, nc, cfg)
	env := newEnvelope(spool.NewQueueID(time.Now()))
	b, err := writeBody(t, sp, env.QueueID, []byte("body\r\n"), 64)
	if err != nil {
		t.Fatal(err)
	}
	stopNATS(s)
	if _, err := sp.Commit(ctxT(t), env, b, ""); err == nil {
		t.Fatal("Commit succeeded while the server was down")
	}

	s2 := startNATS(t, dir, port)
	eventually(t, 10*time.Second, "the client to reconnect", nc.IsConnected)
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	// A barrier: the stream stores in order, so once a mail published on the
	// same connection afterwards is acknowledged, any buffered publish from
	// the failed commit has been stored too.
	marker := newEnvelope(spool.NewQueueID(time.Now().Add(time.Second)))
	mustCommit(t, sp, marker, []byte("marker\r\n"), "")
	check := openSpool(t, connect(t, s2), cfg)
	if n := streamMsgs(t, check.JetStream(), spool.QueueStream, ""); n != 1 {
		t.Fatalf("a commit that returned an error was stored after the server came back (%d records; want only the marker)", n)
	}
}
