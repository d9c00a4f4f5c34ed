package spool_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/jetmail/jetmail/spool"
)

func TestQueuedMailSurvivesAServerRestart(t *testing.T) {
	dir := t.TempDir()
	s := startNATS(t, dir, -1)
	nc := connect(t, s)
	sp := openSpool(t, nc, testConfig())
	next := queueIDs()
	mails := map[string][]byte{
		next(): []byte("Subject: small\r\n\r\ninline body\r\n"),
		next(): pattern(3<<20, 42), // chunked
	}
	guard := guardFor(400)
	var guardedQID string
	for qid, data := range mails {
		g := ""
		if len(data) > 1<<20 {
			g, guardedQID = guard, qid
		}
		mustCommit(t, sp, newEnvelope(qid), data, g)
	}
	nc.Close()
	stopNATS(s)

	s2 := startNATS(t, dir, -1)
	sp2 := openSpool(t, connect(t, s2), testConfig())
	msgs := scanAll(t, sp2)
	if len(msgs) != len(mails) {
		t.Fatalf("after restart the queue holds %d mails; want %d", len(msgs), len(mails))
	}
	for _, m := range msgs {
		want, ok := mails[m.Envelope.QueueID]
		if !ok {
			t.Fatalf("unexpected mail %s after restart", m.Envelope.QueueID)
		}
		got, err := sp2.ReadBody(ctxT(t), m)
		if err != nil {
			t.Fatalf("body of %s after restart: %v", m.Envelope.QueueID, err)
		}
		sameBytes(t, m.Envelope.QueueID, got, want)
	}
	// The duplicate guard survives the restart too.
	r := mustCommit(t, sp2, newEnvelope(next()), mails[guardedQID], guard)
	if !r.Duplicate || r.QueueID != guardedQID {
		t.Fatalf("retransmission after restart = %+v; want a duplicate of %s", r, guardedQID)
	}
}

func TestRunEmbedded(t *testing.T) {
	for name, tc := range map[string]struct {
		listen string
		noSync bool
	}{
		"a loopback listener on a random port fsyncs every write": {"127.0.0.1:0", false},
		"no listener serves in-process clients only":              {"", false},
		"NoSync turns fsync-before-ack off":                       {"127.0.0.1:0", true},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			keyFile, userKey, err := spool.LoadOrCreateUserKey(dir)
			if err != nil {
				t.Fatal(err)
			}
			s, err := spool.RunEmbedded(spool.EmbeddedOptions{DataDir: dir, Listen: tc.listen, NoSync: tc.noSync, UserKey: userKey})
			if err != nil {
				t.Fatalf("RunEmbedded: %v", err)
			}
			t.Cleanup(func() { stopNATS(s) })
			if !s.JetStreamEnabled() {
				t.Fatal("embedded server has JetStream off")
			}
			if got := s.JetStreamConfig().SyncAlways; got != !tc.noSync {
				t.Fatalf("SyncAlways = %v with NoSync %v", got, tc.noSync)
			}

			sign, err := nats.NkeyOptionFromSeed(keyFile)
			if err != nil {
				t.Fatal(err)
			}
			var nc *nats.Conn
			if tc.listen == "" {
				if s.Addr() != nil {
					t.Fatalf("in-process-only server listens on %v", s.Addr())
				}
				nc, err = nats.Connect("", append(spool.NATSOptions(), nats.InProcessServer(s), sign)...)
			} else {
				// Without the key nobody gets in.
				if anon, err := nats.Connect(s.ClientURL(), nats.MaxReconnects(0)); err == nil {
					anon.Close()
					t.Fatal("the embedded server let in a client without the key")
				}
				nc, err = nats.Connect(s.ClientURL(), append(spool.NATSOptions(), sign)...)
			}
			if err != nil {
				t.Fatalf("connect: %v", err)
			}
			t.Cleanup(nc.Close)

			sp := openSpool(t, nc, spool.DefaultConfig())
			env := newEnvelope(spool.NewQueueID(time.Now()))
			mustCommit(t, sp, env, []byte("embedded\r\n"), "")
			if _, got := readBack(t, sp, env.QueueID); string(got) != "embedded\r\n" {
				t.Fatalf("read back %q", got)
			}
		})
	}
}

func TestRunEmbeddedRefusesABadListenAddress(t *testing.T) {
	for name, listen := range map[string]string{
		"an address without a port is refused": "127.0.0.1",
		"a named port is refused":              "127.0.0.1:nats",
	} {
		t.Run(name, func(t *testing.T) {
			s, err := spool.RunEmbedded(spool.EmbeddedOptions{DataDir: t.TempDir(), Listen: listen})
			if err == nil {
				stopNATS(s)
				t.Fatalf("RunEmbedded(Listen %q) started a server", listen)
			}
		})
	}
}

func TestRunEmbeddedReopensItsStore(t *testing.T) {
	dir := t.TempDir()
	run := func() (*server.Server, *spool.Spool) {
		s, err := spool.RunEmbedded(spool.EmbeddedOptions{DataDir: dir})
		if err != nil {
			t.Fatalf("RunEmbedded: %v", err)
		}
		nc, err := nats.Connect("", append(spool.NATSOptions(), nats.InProcessServer(s))...)
		if err != nil {
			stopNATS(s)
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close(); stopNATS(s) })
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		sp, err := spool.Open(ctx, nc, spool.DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		return s, sp
	}
	s, sp := run()
	env := newEnvelope(spool.NewQueueID(time.Now()))
	mustCommit(t, sp, env, []byte("kept\r\n"), "")
	stopNATS(s)

	_, sp2 := run()
	if _, got := readBack(t, sp2, env.QueueID); string(got) != "kept\r\n" {
		t.Fatalf("after restart read back %q", got)
	}
}

func TestRunEmbeddedListensOnlyWithAUserKey(t *testing.T) {
	if s, err := spool.RunEmbedded(spool.EmbeddedOptions{DataDir: t.TempDir(), Listen: "127.0.0.1:0"}); err == nil {
		stopNATS(s)
		t.Fatal("RunEmbedded opened a TCP listener that lets anyone in")
	}
}

func TestUserKeyIsCreatedOnceAndKeptPrivate(t *testing.T) {
	dir := t.TempDir()
	path, pub, err := spool.LoadOrCreateUserKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file %v, %v; want mode 0600", fi, err)
	}
	if _, pub2, err := spool.LoadOrCreateUserKey(dir); err != nil || pub2 != pub {
		t.Fatalf("second start: key %s, %v; want the same key %s", pub2, err, pub)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := spool.LoadOrCreateUserKey(dir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a key readable by others: %v, want a refusal", err)
	}
}
