package smtpgw

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

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
	opts := &server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: dir, NoSigs: true, NoLog: true}
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("NATS server did not start")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return &testNATS{srv: s, dir: dir}
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
	g := New(cfg, sp, pol, log, reg)
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
	return &testGateway{Gateway: g, addr: l.Addr().String(), sp: sp, reg: reg}
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
	cfg, err := objs.Compile("")
	if err != nil {
		t.Fatal(err)
	}
	return cfg.Relay
}

// client scripts an SMTP session line by line over real TCP.
type client struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

func dial(t testing.TB, addr string) *client {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{t: t, conn: c, r: bufio.NewReader(c)}
}

// dialReady connects, checks the greeting and says EHLO.
func dialReady(t testing.TB, addr string) *client {
	c := dial(t, addr)
	c.expect(220)
	c.cmd("EHLO client.test", 250)
	return c
}

// readReply reads one (possibly multi-line) reply and returns its code and
// last line.
func (c *client) readReply() (int, string, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(15 * time.Second))
	var code int
	var text string
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return 0, line, err
		}
		if len(line) < 4 {
			return 0, line, fmt.Errorf("short reply %q", line)
		}
		if _, err := fmt.Sscanf(line[:3], "%d", &code); err != nil {
			return 0, line, err
		}
		text = strings.TrimRight(line, "\r\n")
		if line[3] == ' ' {
			return code, text, nil
		}
	}
}

// expect reads a reply and fails unless its code is want. It returns the
// last line.
func (c *client) expect(want int) string {
	c.t.Helper()
	code, text, err := c.readReply()
	if err != nil {
		c.t.Fatalf("reading reply (want %d): %v (got %q)", want, err, text)
	}
	if code != want {
		c.t.Fatalf("got %q, want code %d", text, want)
	}
	return text
}

// send writes raw bytes.
func (c *client) send(s string) {
	c.t.Helper()
	_ = c.conn.SetWriteDeadline(time.Now().Add(15 * time.Second))
	if _, err := c.conn.Write([]byte(s)); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// cmd sends a command line and expects a reply code; it returns the reply.
func (c *client) cmd(line string, want int) string {
	c.t.Helper()
	c.send(line + "\r\n")
	return c.expect(want)
}

// mail runs one whole transaction and returns the final reply line.
func (c *client) mail(from string, to []string, data string, want int) string {
	c.t.Helper()
	c.cmd("MAIL FROM:<"+from+">", 250)
	for _, r := range to {
		c.cmd("RCPT TO:<"+r+">", 250)
	}
	c.cmd("DATA", 354)
	c.send(data + ".\r\n")
	return c.expect(want)
}

// expectClosed checks that the server closed the connection.
func (c *client) expectClosed() {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := c.r.ReadString('\n'); err == nil {
		c.t.Fatalf("connection still open, got %q", line)
	}
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
