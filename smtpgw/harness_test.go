package smtpgw

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// testNATS is a real NATS server with JetStream, in process, on a random
// loopback port with its store in a temporary folder.
type testNATS struct {
	srv *server.Server
	dir string
}

func startNATS(t testing.TB) *testNATS {
	t.Helper()
	dir := t.TempDir()
	return startNATSAt(t, dir, -1)
}

func startNATSAt(t testing.TB, dir string, port int) *testNATS {
	t.Helper()
	return &testNATS{srv: natstest.Start(t, natstest.Options{Dir: dir, Port: port}), dir: dir}
}

func (n *testNATS) connect(t testing.TB, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(n.srv.ClientURL(), append(spool.NATSOptions(), opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func (n *testNATS) spool(t testing.TB, mut ...func(*spool.Config)) *spool.Spool {
	t.Helper()
	cfg := spool.DefaultConfig()
	cfg.PublishTimeout = 3 * time.Second
	for _, m := range mut {
		m(&cfg)
	}
	sp, err := spool.Open(context.Background(), n.connect(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

// testGateway is a gateway serving on 127.0.0.1:0.
type testGateway struct {
	*Gateway
	addr string
	sp   *spool.Spool
	reg  *prometheus.Registry
	src  *policy.Source
}

// setPolicy puts p in force through the gateway's Source, as the
// configuration watchers do on every change.
func (g *testGateway) setPolicy(p *policy.Relay) {
	g.src.Set(&policy.Config{Relay: p, Delivery: policy.DefaultDelivery()}, g.src.Revision()+1)
}

type gwOption func(*Config)

func startGateway(t testing.TB, sp *spool.Spool, pol *policy.Relay, opts ...gwOption) *testGateway {
	t.Helper()
	if pol == nil {
		pol = policy.Default()
	}
	cfg := Config{Hostname: "mx.test", ShutdownGrace: 2 * time.Second}
	for _, o := range opts {
		o(&cfg)
	}
	var log *zap.Logger
	if tt, ok := t.(*testing.T); ok {
		log = zaptest.NewLogger(tt, zaptest.Level(zap.WarnLevel))
	} else {
		log = zap.NewNop()
	}
	reg := prometheus.NewRegistry()
	src := policy.NewSource(&policy.Config{Relay: pol, Delivery: policy.DefaultDelivery()}, 1)
	g := New(cfg, sp, src, log, reg)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { g.Serve(l); close(done) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		g.Shutdown(ctx)
		<-done
	})
	return &testGateway{Gateway: g, addr: l.Addr().String(), sp: sp, reg: reg, src: src}
}

// compile builds a relay policy from RelayPolicy YAML.
func compile(t testing.TB, yaml string) *policy.Relay {
	t.Helper()
	dir := t.TempDir()
	path := dir + "/policy.yaml"
	if err := writeFile(path, yaml); err != nil {
		t.Fatal(err)
	}
	objs, err := policy.LoadFiles([]string{path})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := objs.Compile(policy.CompileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return cfg.Relay
}

// queued lists the mail in the spool.
func queued(t testing.TB, sp *spool.Spool) []*spool.Message {
	t.Helper()
	var out []*spool.Message
	if err := sp.Scan(context.Background(), func(m *spool.Message) error {
		out = append(out, m)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sessionEnd waits for the gateway to end the session: it says nothing, or
// (busy) sends a NOOP every 100 ms so the session is never idle, until a
// reply other than 250 comes or limit passes. It returns that reply, or
// "still open".
func sessionEnd(c *smtptest.Client, busy bool, limit time.Duration) string {
	end := time.Now().Add(limit)
	for time.Now().Before(end) {
		wait := time.Until(end)
		if busy {
			c.Send("NOOP\r\n")
			wait = time.Second
		}
		lines, err := c.ReplyLines(wait)
		if err != nil {
			break
		}
		if last := lines[len(lines)-1]; !strings.HasPrefix(last, "250") {
			return last
		}
		time.Sleep(100 * time.Millisecond)
	}
	return "still open"
}

// queueIDOf extracts the queue ID from "250 2.0.0 Ok: queued as ID".
func queueIDOf(t testing.TB, reply string) string {
	t.Helper()
	i := strings.LastIndex(reply, "queued as ")
	if i < 0 {
		t.Fatalf("no queue ID in %q", reply)
	}
	return reply[i+len("queued as "):]
}

// simpleMessage is a well-formed message with a Message-ID.
func simpleMessage(id, body string) string {
	return "From: a@example.org\r\nTo: b@example.net\r\nSubject: test\r\nMessage-ID: <" + id + "@example.org>\r\n\r\n" + body + "\r\n"
}
