package deliverer

// End-to-end tests of the Deliverer: a real NATS server with JetStream in
// process, the real spool on it, a DNS server on loopback serving the test
// zone, and go-smtp servers as MX hosts, each on its own loopback address
// (127.0.0.2, 127.0.0.3, ...) at one shared port, the DeliveryPolicy port.
// Bounces are mail too: the senders' domain sender.test has an MX that
// captures what it gets, and the tests read the DSNs from there. The MX
// hosts, the connection counting and the polling come from
// internal/mxtest, which the outbound client's tests share.

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/textproto"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/internal/dnstest"
	"github.com/jetmail/jetmail/internal/dsntest"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

const (
	e2eMX1     = "127.0.0.2"
	e2eMX2     = "127.0.0.3"
	e2eCapture = "127.0.0.9"
	e2eSender  = "alice@sender.test"
	e2eHost    = "relay.e2e.test"
	e2eAckWait = 2 * time.Second
)

// e2eIPs are the loopback addresses every environment reserves its port on.
var e2eIPs = []string{e2eMX1, e2eMX2, e2eCapture}

// e2eEnv is one test's world: NATS, spool, DNS, and a port free on every
// address of e2eIPs.
type e2eEnv struct {
	t        *testing.T
	url      string
	spoolCfg spool.Config
	sp       *spool.Spool
	dns      *dnstest.Server
	port     uint16
	src      *policy.Source

	mu   sync.Mutex
	held map[string]net.Listener // reserved, not serving yet
}

func newE2E(t *testing.T) *e2eEnv {
	t.Helper()
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("NATS server did not start")
	}
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	return newE2EAt(t, ns.ClientURL(), spool.DefaultConfig())
}

// newE2EAt is newE2E on the NATS server or cluster at url, with the spool
// set up as cfg says.
func newE2EAt(t *testing.T, url string, cfg spool.Config) *e2eEnv {
	t.Helper()
	e := &e2eEnv{t: t, url: url, spoolCfg: cfg, dns: dnstest.Start(t), held: map[string]net.Listener{}}
	e.sp = e.openSpool(e.connect())
	e.reservePort()
	e.dns.Add(t,
		"sender.test. 60 IN MX 10 mx.sender.test.",
		"mx.sender.test. 60 IN A "+e2eCapture,
	)
	e.setPolicy(nil, nil, nil)
	return e
}

func (e *e2eEnv) connect() *nats.Conn { return e.connectTo(e.url) }

func (e *e2eEnv) connectTo(url string) *nats.Conn {
	nc, err := nats.Connect(url, spool.NATSOptions()...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(nc.Close)
	return nc
}

func (e *e2eEnv) openSpool(nc *nats.Conn) *spool.Spool {
	cfg := e.spoolCfg
	cfg.PublishTimeout = 3 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sp, err := spool.Open(ctx, nc, cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	return sp
}

// reservePort finds a port free on every address of e2eIPs and holds it
// there until a server takes it over (or down gives it up).
func (e *e2eEnv) reservePort() {
	e.t.Helper()
	for range 50 {
		first, err := net.Listen("tcp", e2eIPs[0]+":0")
		if err != nil {
			e.t.Fatal(err)
		}
		port := first.Addr().(*net.TCPAddr).Port
		held := map[string]net.Listener{e2eIPs[0]: first}
		ok := true
		for _, ip := range e2eIPs[1:] {
			ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
			if err != nil {
				ok = false
				break
			}
			held[ip] = ln
		}
		if !ok {
			for _, ln := range held {
				ln.Close()
			}
			continue
		}
		e.port, e.held = uint16(port), held
		e.t.Cleanup(func() {
			e.mu.Lock()
			defer e.mu.Unlock()
			for _, ln := range e.held {
				ln.Close()
			}
		})
		return
	}
	e.t.Fatal("no port free on every test address")
}

// listener returns the reserved listener of ip, or a new one at the port
// if the reservation was given up.
func (e *e2eEnv) listener(ip string) net.Listener {
	e.t.Helper()
	e.mu.Lock()
	ln, ok := e.held[ip]
	delete(e.held, ip)
	e.mu.Unlock()
	if ok {
		return ln
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(int(e.port))))
	if err != nil {
		e.t.Fatalf("listen again on %s:%d: %v", ip, e.port, err)
	}
	return ln
}

// down makes ip refuse connections at the port.
func (e *e2eEnv) down(ip string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ln, ok := e.held[ip]; ok {
		ln.Close()
		delete(e.held, ip)
	}
}

func e2eDur(d time.Duration) *metav1.Duration { return &metav1.Duration{Duration: d} }

// setPolicy compiles the delivery configuration (the test port, a 1s retry
// schedule and short timeouts, changed by mut) and puts it in force
// through the environment's Source, as the configuration watchers do: a
// running deliverer sees it at its next attempt.
func (e *e2eEnv) setPolicy(mut func(*v1alpha1.DeliveryPolicySpec), routes []v1alpha1.MailRoute, secrets policy.Secrets) {
	e.t.Helper()
	port := int32(e.port)
	dp := v1alpha1.DeliveryPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "e2e", Namespace: "mail"},
		Spec: v1alpha1.DeliveryPolicySpec{
			Port:           &port,
			RetryIntervals: []metav1.Duration{{Duration: time.Second}},
			Timeouts: &v1alpha1.OutboundTimeouts{
				Connect: e2eDur(2 * time.Second), Greeting: e2eDur(5 * time.Second),
				Mail: e2eDur(5 * time.Second), Rcpt: e2eDur(5 * time.Second),
				DataInit: e2eDur(5 * time.Second), DataBlock: e2eDur(5 * time.Second),
				DataDone: e2eDur(10 * time.Second), Session: e2eDur(15 * time.Second),
			},
		},
	}
	if mut != nil {
		mut(&dp.Spec)
	}
	d, err := policy.CompileDelivery([]v1alpha1.DeliveryPolicy{dp}, routes, secrets, policy.CompileOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	cfg := &policy.Config{Relay: policy.Default(), Delivery: d}
	if e.src == nil {
		e.src = policy.NewSource(cfg, 1)
		return
	}
	e.src.Set(cfg, e.src.Revision()+1)
}

func (e *e2eEnv) hop(ip string) string { return fmt.Sprintf("[%s]:%d", ip, e.port) }

// e2eReplica is one running Deliverer.
type e2eReplica struct {
	d      *Deliverer
	client *outbound.Client
	nc     *nats.Conn // its own connection, when it has one
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// e2eConn says how a replica reaches NATS: through the environment's
// spool handle, or on its own connection (to url, if set).
type e2eConn struct {
	own bool
	url string
	// idle: New only, no Run; the test hands messages to handle itself.
	idle bool
}

type e2eReplicaOpt func(c *Config, conn *e2eConn)

// e2eOwnConn gives the replica its own NATS connection and spool handle,
// as another pod would have.
func e2eOwnConn() e2eReplicaOpt { return func(_ *Config, conn *e2eConn) { conn.own = true } }

// e2eCountDials counts the connections the replica's client tries.
func e2eCountDials(n *atomic.Int64) e2eReplicaOpt {
	return func(c *Config, _ *e2eConn) {
		var d net.Dialer
		c.Client.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			n.Add(1)
			return d.DialContext(ctx, network, addr)
		}
	}
}

// e2eClock runs the replica on the real clock moved forward by *skew.
func e2eClock(skew *atomic.Int64) e2eReplicaOpt {
	return func(c *Config, _ *e2eConn) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	}
}

// e2eVia gives the replica its own connection to url (a natstest.Stall in
// front of the environment's server) and a spool handle on it.
func e2eVia(url string) e2eReplicaOpt {
	return func(_ *Config, conn *e2eConn) { conn.own, conn.url = true, url }
}

// e2eIdle makes a replica that does not consume: the test calls handle.
func e2eIdle() e2eReplicaOpt { return func(_ *Config, conn *e2eConn) { conn.idle = true } }

// e2eAckWaitOf sets the replica's ack wait.
func e2eAckWaitOf(d time.Duration) e2eReplicaOpt {
	return func(c *Config, _ *e2eConn) { c.AckWait = d }
}

func e2eGrace(g time.Duration) e2eReplicaOpt {
	return func(c *Config, _ *e2eConn) { c.Grace = g }
}

func (e *e2eEnv) startDeliverer(opts ...e2eReplicaOpt) *e2eReplica {
	e.t.Helper()
	r := &e2eReplica{client: &outbound.Client{Hostname: e2eHost, IdleTime: time.Second}, done: make(chan error, 1)}
	cfg := Config{
		Hostname: e2eHost,
		Spool:    e.sp,
		Source:   e.src,
		Resolver: &Resolver{Servers: []string{e.dns.Addr}, Timeout: 2 * time.Second},
		Client:   r.client,
		AckWait:  e2eAckWait,
		Grace:    2 * time.Second,
	}
	var conn e2eConn
	for _, o := range opts {
		o(&cfg, &conn)
	}
	if conn.own {
		r.nc = e.connectTo(cmp.Or(conn.url, e.url))
		cfg.Spool = e.openSpool(r.nc)
	}
	d, err := New(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	r.d = d
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	if conn.idle {
		r.done <- nil
	} else {
		go func() { r.done <- d.Run(ctx) }()
	}
	e.t.Cleanup(func() { r.stop(e.t) })
	return r
}

// stop ends Run, waits for it, closes the client and checks that it has
// no connection left.
func (r *e2eReplica) stop(t *testing.T) {
	t.Helper()
	r.once.Do(func() {
		r.cancel()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(15 * time.Second):
			buf := make([]byte, 1<<20)
			t.Fatalf("Run did not return within 15s of its context ending\n%s", buf[:runtime.Stack(buf, true)])
		}
		mxtest.CheckNoConnLeak(t, r.client)
	})
}

// startMX serves m on ip at the environment's port.
func (e *e2eEnv) startMX(ip string, m *mxtest.MX, mut ...func(*smtp.Server)) *mxtest.MX {
	e.t.Helper()
	return mxtest.Serve(e.t, mxtest.Count(e.listener(ip)), "mx-"+ip+".e2e.test", m, mut...)
}

// holdSlot queues held@slow.test and waits until the tarpit tp, slow.test's
// MX, holds its session.
func (e *e2eEnv) holdSlot(tp *tarpit) {
	e.t.Helper()
	e.enqueue(e2eSender, "held@slow.test")
	mxtest.Within(e.t, 10*time.Second, "the tarpit to hold a session", func() bool { return tp.Accepted.Load() == 1 })
}

// waitSlots waits until cond holds of the replica's session slots.
func (r *e2eReplica) waitSlots(t *testing.T, what string, cond func(d *Deliverer) bool) {
	t.Helper()
	mxtest.Within(t, 10*time.Second, what, func() bool {
		r.d.mu.Lock()
		defer r.d.mu.Unlock()
		return cond(r.d)
	})
}

// startMXOf serves m on e2eMX1 as the one MX host of domain.
func (e *e2eEnv) startMXOf(domain string, m *mxtest.MX) *mxtest.MX {
	e.t.Helper()
	e.dns.Add(e.t, domain+". 60 IN MX 10 mx1."+domain+".", "mx1."+domain+". 60 IN A "+e2eMX1)
	return e.startMX(e2eMX1, m)
}

// e2eNoSuchUser refuses a recipient with 550 5.1.1.
func e2eNoSuchUser(string) error { return e2eSMTPError(550, [3]int{5, 1, 1}, "no such user here") }

// capture is the MX of sender.test, where bounces arrive.
func (e *e2eEnv) capture() *mxtest.MX { return e.startMX(e2eCapture, &mxtest.MX{}) }

// tarpit accepts connections and dribbles a greeting that never ends, one
// byte every 200 ms, until the client goes. It records when each session
// began and when the client was found gone.
type tarpit struct {
	*mxtest.Counter
	mu    sync.Mutex
	spans [][2]time.Time
}

func (e *e2eEnv) startTarpit(ip string) *tarpit {
	ln := mxtest.Count(e.listener(ip))
	tp := &tarpit{Counter: ln.Counter}
	mxtest.ServeScripted(e.t, ln, func(c net.Conn, _ *bufio.Reader) {
		start := time.Now()
		mxtest.Dribble(c, "220-tarpit.e2e.test still thinking\r\n", 200*time.Millisecond)
		tp.mu.Lock()
		tp.spans = append(tp.spans, [2]time.Time{start, time.Now()})
		tp.mu.Unlock()
	})
	return tp
}

func (tp *tarpit) finished() [][2]time.Time {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return append([][2]time.Time(nil), tp.spans...)
}

// enqueue queues a mail from `from` to rcpts, as the gateway would, and
// returns its queue ID.
func (e *e2eEnv) enqueue(from string, rcpts ...string) string {
	e.t.Helper()
	now := time.Now()
	qid := spool.NewQueueID(now)
	env := &spool.Envelope{QueueID: qid, Received: now.UTC(), Gateway: "gw.e2e.test", ClientIP: "192.0.2.10", Helo: "client.e2e.test", From: from}
	for _, r := range rcpts {
		env.Rcpts = append(env.Rcpts, spool.Rcpt{Addr: r})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := e.sp.Enqueue(ctx, env, []byte(e2eBody(qid, from, rcpts)), ""); err != nil {
		e.t.Fatal(err)
	}
	return qid
}

func e2eBody(qid, from string, rcpts []string) string {
	return "From: <" + from + ">\r\nTo: " + strings.Join(rcpts, ", ") + "\r\nSubject: e2e " + qid +
		"\r\nMessage-ID: <" + qid + "@e2e.test>\r\n\r\nHello from the end-to-end test.\r\n"
}

// queued returns the queue IDs of the mail in the queue.
func (e *e2eEnv) queued() []string {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var ids []string
	if err := e.sp.Scan(ctx, func(m *spool.Message) error {
		ids = append(ids, m.Envelope.QueueID)
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	return ids
}

func (e *e2eEnv) waitEmpty(d time.Duration) {
	e.t.Helper()
	mxtest.Within(e.t, d, "the queue to be empty", func() bool { return len(e.queued()) == 0 })
}

// waitState polls the delivery state of qid until cond accepts it.
func (e *e2eEnv) waitState(qid string, d time.Duration, what string, cond func(*spool.DeliveryState) bool) *spool.DeliveryState {
	e.t.Helper()
	var st *spool.DeliveryState
	mxtest.Within(e.t, d, what, func() bool {
		var err error
		st, err = e.sp.LoadState(context.Background(), qid)
		if err != nil {
			e.t.Fatal(err)
		}
		return st != nil && cond(st)
	})
	return st
}

func e2eRcptState(st *spool.DeliveryState, addr string) spool.RcptState {
	for _, r := range st.Rcpts {
		if r.Addr == addr {
			return r
		}
	}
	return spool.RcptState{}
}

// e2eBounce is a DSN as received by the sender's MX.
type e2eBounce struct {
	txn     mxtest.Txn
	parsed  dsntest.Parsed
	message map[string]string   // per-message status fields
	rcpts   []map[string]string // per-recipient status fields
}

// waitBounce waits for the capture server's nth transaction and takes the
// DSN in it apart.
func waitBounce(t *testing.T, capture *mxtest.MX, n int, d time.Duration) e2eBounce {
	t.Helper()
	mxtest.Within(t, d, fmt.Sprintf("%d bounce(s) at the sender's MX", n), func() bool { return len(capture.Transactions()) >= n })
	txn := capture.Transactions()[n-1]
	b := e2eBounce{txn: txn, parsed: dsntest.Parse(t, txn.Body)}
	if got := b.parsed.ContentTypes(); len(got) != 3 || got[1] != "message/delivery-status" {
		t.Fatalf("DSN parts %v", got)
	}
	for i, blk := range dsntest.StatusBlocks(t, b.parsed.Parts[1].Body) {
		fields := map[string]string{}
		for k, v := range blk {
			fields[k] = strings.Join(v, " | ")
		}
		if i == 0 {
			b.message = fields
		} else {
			b.rcpts = append(b.rcpts, fields)
		}
	}
	if txn.From != "" {
		t.Errorf("bounce sent with MAIL FROM:<%s>, want the null reverse path", txn.From)
	}
	if b.message["Reporting-Mta"] != "dns; "+e2eHost {
		t.Errorf("Reporting-MTA %q", b.message["Reporting-Mta"])
	}
	return b
}

// wantRcpt checks fields of the bounce's only recipient block; a value
// ending in "*" is a prefix.
func (b e2eBounce) wantRcpt(t *testing.T, want map[string]string) {
	t.Helper()
	if len(b.rcpts) != 1 {
		t.Fatalf("%d recipient blocks, want 1: %v", len(b.rcpts), b.rcpts)
	}
	got := b.rcpts[0]
	for k, v := range want {
		g, ok := got[textproto.CanonicalMIMEHeaderKey(k)]
		switch {
		case !ok:
			t.Errorf("DSN has no %s (fields %v)", k, got)
		case strings.HasSuffix(v, "*") && strings.HasPrefix(g, strings.TrimSuffix(v, "*")):
		case g != v:
			t.Errorf("DSN %s = %q, want %q", k, g, v)
		}
	}
}

// e2eCount reads a counter.
func e2eCount(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func e2eSMTPError(code int, enh [3]int, text string) error {
	return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode(enh), Message: text}
}

func TestDelivererEndToEnd(t *testing.T) {
	t.Run("a primary MX that refuses connections hands the mail to the secondary, once", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t,
			"fail.test. 60 IN MX 10 mx1.fail.test.", "mx1.fail.test. 60 IN A "+e2eMX1,
			"fail.test. 60 IN MX 20 mx2.fail.test.", "mx2.fail.test. 60 IN A "+e2eMX2)
		e.down(e2eMX1)
		mx2 := e.startMX(e2eMX2, &mxtest.MX{})
		capture := e.capture()
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "bob@fail.test")
		e.waitEmpty(10 * time.Second)
		txns := mx2.Transactions()
		if len(txns) != 1 || txns[0].From != e2eSender || strings.Join(txns[0].Rcpts, ",") != "bob@fail.test" ||
			string(txns[0].Body) != e2eBody(qid, e2eSender, []string{"bob@fail.test"}) {
			t.Fatalf("secondary got %+v", txns)
		}
		if st, _ := e.sp.LoadState(context.Background(), qid); st != nil {
			t.Errorf("a mail delivered at the first attempt has state %+v", st)
		}
		r.stop(t)
		if n := len(capture.Transactions()); n != 0 {
			t.Errorf("%d notices sent for a delivered mail", n)
		}
		mxtest.CheckServersClosed(t, mx2.Counter, capture.Counter)
	})

	t.Run("mail for a domain whose MX hosts are all down is deferred, then delivered when one comes up", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t,
			"down.test. 60 IN MX 10 mx1.down.test.", "mx1.down.test. 60 IN A "+e2eMX1,
			"down.test. 60 IN MX 20 mx2.down.test.", "mx2.down.test. 60 IN A "+e2eMX2)
		e.down(e2eMX1)
		e.down(e2eMX2)
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) { sp.DeadDestinationTime = e2eDur(time.Second) }, nil, nil)
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "carol@down.test")
		st := e.waitState(qid, 10*time.Second, "the first deferral", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
		rs := e2eRcptState(st, "carol@down.test")
		if st.Attempts != 1 || rs.Status != spool.RcptDeferred || rs.Enhanced != "4.4.1" || !st.NextAttempt.After(st.LastAttempt) {
			t.Errorf("state after the first attempt: %+v", st)
		}
		mx2 := e.startMX(e2eMX2, &mxtest.MX{})
		// Parked as down: the waker's probe (a tick, then the attempt,
		// after the destination's second) brings it; 4 s here when idle.
		e.waitEmpty(20 * time.Second)
		if txns := mx2.Transactions(); len(txns) != 1 || txns[0].Rcpts[0] != "carol@down.test" {
			t.Errorf("MX that came up got %+v", txns)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx2.Counter)
	})

	t.Run("a destination found down is left alone for deadDestinationTime, then one attempt probes it", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) { sp.DeadDestinationTime = e2eDur(time.Hour) }, nil, nil)
		e.dns.Add(t, "dead.test. 60 IN MX 10 mx1.dead.test.", "mx1.dead.test. 60 IN A "+e2eMX1)
		e.down(e2eMX1)
		var dials, skew atomic.Int64
		r := e.startDeliverer(e2eCountDials(&dials), e2eClock(&skew))
		first := e.enqueue(e2eSender, "first@dead.test")
		e.waitState(first, 10*time.Second, "the first deferral", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
		tried := dials.Load()
		if tried != 1 {
			t.Errorf("the first attempt tried %d connections, want 1", tried)
		}
		// Later mail is deferred without a connection while the
		// destination is down, and parked.
		var later []string
		for i := range 3 {
			later = append(later, e.enqueue(e2eSender, fmt.Sprintf("later%d@dead.test", i)))
		}
		for _, qid := range later {
			st := e.waitState(qid, 10*time.Second, "a suspended deferral", func(st *spool.DeliveryState) bool {
				return strings.HasPrefix(e2eRcptState(st, st.Rcpts[0].Addr).Text, "delivery temporarily suspended: ")
			})
			if rs := st.Rcpts[0]; rs.Status != spool.RcptDeferred || rs.Enhanced != "4.4.1" || rs.Code != 451 {
				t.Errorf("%s: %+v, want deferred 451 4.4.1", qid, rs)
			}
		}
		// Parked mail of a destination that is down is not handed out
		// message by message at each retry (every second here): one
		// message at a time probes it, the others wait.
		attempts := func() (sum int, unchanged int) {
			for _, qid := range append(later, first) {
				st, err := e.sp.LoadState(context.Background(), qid)
				if err != nil || st == nil {
					t.Fatalf("state of %s: %+v, %v", qid, st, err)
				}
				if p := st.Parked(); p == nil || !p.Down || p.Dest != "dead.test" {
					t.Errorf("%s is not parked as waiting for dead.test, which is down: %+v", qid, p)
				}
				sum += st.Attempts
				if st.Attempts == 1 {
					unchanged++
				}
			}
			return sum, unchanged
		}
		before, _ := attempts()
		probes0 := e2eCount(t, r.d.metrics.woken.WithLabelValues("probe"))
		mxtest.Within(t, 10*time.Second, "two probes", func() bool {
			return e2eCount(t, r.d.metrics.woken.WithLabelValues("probe")) >= probes0+2
		})
		after, unchanged := attempts()
		if woken := e2eCount(t, r.d.metrics.woken.WithLabelValues("due")); woken != 0 {
			t.Errorf("%v messages of a destination that is down woken as due", woken)
		}
		if probes := int(e2eCount(t, r.d.metrics.woken.WithLabelValues("probe")) - probes0); after-before > probes+1 || unchanged < 2 {
			t.Errorf("attempts went from %d to %d over %d probes; %d of 4 messages not attempted again", before, after, probes, unchanged)
		}
		if n := dials.Load(); n != tried {
			t.Errorf("%d connections tried while the destination was known down", n-tried)
		}
		// The hour is over but the destination is still down: one attempt
		// probes it, fails, and the destination is left alone again.
		skew.Store(int64(time.Hour + time.Second))
		mxtest.Within(t, 10*time.Second, "one probe", func() bool { return dials.Load() == tried+1 })
		probes := e2eCount(t, r.d.metrics.suspended)
		mxtest.Within(t, 10*time.Second, "more suspended deferrals", func() bool { return e2eCount(t, r.d.metrics.suspended) >= probes+2 })
		// The deferrals by class: the refused connections, then the
		// suspended recipients, one each.
		// The counters are read while retries go on (one a second), and the
		// two suspended counts are bumped one after the other: they must
		// agree at some read, not at every one.
		var c, sus, n float64
		agree := func() bool {
			c, sus, n = e2eCount(t, r.d.metrics.deferrals.WithLabelValues("connect")), e2eCount(t, r.d.metrics.deferrals.WithLabelValues("suspended")),
				e2eCount(t, r.d.metrics.suspended)
			return c >= 1 && sus == n
		}
		deadline := time.Now().Add(5 * time.Second)
		for !agree() && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if c < 1 || sus != n {
			t.Errorf("deferrals: connect %v, suspended %v (suspended recipients %v)", c, sus, n)
		}
		if n := dials.Load(); n != tried+1 {
			t.Errorf("%d connections tried after the first hour, want the one probe", n-tried)
		}
		// The destination comes back; once the next hour is over one
		// attempt probes it and the rest follow.
		mx := e.startMX(e2eMX1, &mxtest.MX{})
		skew.Store(int64(2*time.Hour + 2*time.Second))
		e.waitEmpty(20 * time.Second)
		got := map[string]int{}
		for _, txn := range mx.Transactions() {
			for _, rc := range txn.Rcpts {
				got[rc]++
			}
		}
		if len(got) != 4 || got["first@dead.test"] != 1 || got["later0@dead.test"] != 1 || got["later2@dead.test"] != 1 {
			t.Errorf("deliveries per recipient after the destination came back: %v", got)
		}
		// The probe that got through brought the rest at once, not one
		// probe at a time.
		if n := e2eCount(t, r.d.metrics.woken.WithLabelValues("due")); n < 2 {
			t.Errorf("%v messages woken as due after the destination came back, want the rest (2 or 3)", n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("bodies no queued mail refers to are swept once old enough", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		ctx := context.Background()
		chunks := func(qid string) int {
			st, err := e.sp.JetStream().Stream(ctx, spool.BodyStream)
			if err != nil {
				t.Fatal(err)
			}
			info, err := st.Info(ctx, jetstream.WithSubjectFilter("jetmail.body.>"))
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for subj := range info.State.Subjects {
				if strings.HasPrefix(subj, "jetmail.body."+qid+"-") {
					n++
				}
			}
			return n
		}
		// A body written two hours ago whose envelope never came (its
		// gateway died), and one begun just now.
		big := bytes.Repeat([]byte("orphan body line\r\n"), 3*e.sp.InlineMax()/18)
		orphan, fresh := spool.NewQueueID(time.Now().Add(-2*time.Hour)), spool.NewQueueID(time.Now())
		for _, qid := range []string{orphan, fresh} {
			if _, err := e.sp.NewBody(ctx, qid).Write(big); err != nil {
				t.Fatal(err)
			}
			if chunks(qid) == 0 {
				t.Fatalf("%s: no chunk written", qid)
			}
		}
		r := e.startDeliverer(func(c *Config, _ *e2eConn) { c.SweepEvery, c.OrphanAge = 100*time.Millisecond, time.Hour })
		mxtest.Within(t, 10*time.Second, "the orphan to be swept", func() bool { return chunks(orphan) == 0 })
		if chunks(fresh) == 0 {
			t.Error("a body begun just now was swept")
		}
		r.stop(t)
	})

	t.Run("a 4xx to MAIL FROM defers the message but does not mark the destination down", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
			sp.RetryIntervals = []metav1.Duration{{Duration: time.Hour}}
			sp.DeadDestinationTime = e2eDur(time.Hour)
		}, nil, nil)
		e.dns.Add(t, "grey.test. 60 IN MX 10 mx1.grey.test.", "mx1.grey.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{Mail: func(from string) error {
			if from == "limited@sender.test" {
				return e2eSMTPError(451, [3]int{4, 7, 1}, "sender rate limited, try later")
			}
			return nil
		}})
		r := e.startDeliverer()
		limited := e.enqueue("limited@sender.test", "x@grey.test")
		st := e.waitState(limited, 10*time.Second, "the deferral", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
		if rs := st.Rcpts[0]; rs.Status != spool.RcptDeferred || rs.Code != 451 || strings.Contains(rs.Text, "suspended") {
			t.Errorf("limited sender's recipient: %+v, want deferred with the remote's 451", rs)
		}
		e.enqueue(e2eSender, "y@grey.test")
		mxtest.Within(t, 10*time.Second, "another sender's mail to be delivered at once", func() bool { return mx.RcptCount("y@grey.test") == 1 })
		if n := e2eCount(t, r.d.metrics.suspended); n != 0 {
			t.Errorf("%v recipients suspended, want none", n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("a null MX bounces with 5.1.10", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "nullmx.test. 60 IN MX 0 .")
		capture := e.capture()
		r := e.startDeliverer()
		e.enqueue(e2eSender, "dave@nullmx.test")
		b := waitBounce(t, capture, 1, 10*time.Second)
		if strings.Join(b.txn.Rcpts, ",") != e2eSender {
			t.Errorf("bounce went to %v", b.txn.Rcpts)
		}
		b.wantRcpt(t, map[string]string{"Action": "failed", "Status": "5.1.10", "Final-Recipient": "rfc822; dave@nullmx.test"})
		e.waitEmpty(10 * time.Second)
		r.stop(t)
		mxtest.CheckServersClosed(t, capture.Counter)
	})

	t.Run("a domain that does not exist bounces with 5.1.2", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		capture := e.capture()
		r := e.startDeliverer()
		e.enqueue(e2eSender, "erin@nowhere.test")
		b := waitBounce(t, capture, 1, 10*time.Second)
		b.wantRcpt(t, map[string]string{"Action": "failed", "Status": "5.1.2", "Final-Recipient": "rfc822; erin@nowhere.test"})
		e.waitEmpty(10 * time.Second)
		r.stop(t)
		mxtest.CheckServersClosed(t, capture.Counter)
	})

	t.Run("a DNS server failure defers and does not bounce", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Set(func(d *dnstest.Server) { d.Rcodes["broken.test."] = dns.RcodeServerFailure })
		capture := e.capture()
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "frank@broken.test")
		st := e.waitState(qid, 10*time.Second, "two deferred attempts", func(st *spool.DeliveryState) bool { return st.Attempts >= 2 })
		if rs := e2eRcptState(st, "frank@broken.test"); rs.Status != spool.RcptDeferred || rs.Enhanced != "4.4.3" {
			t.Errorf("recipient state %+v, want deferred 4.4.3", rs)
		}
		if ids := e.queued(); len(ids) != 1 || ids[0] != qid {
			t.Errorf("queue holds %v, want only %s (no bounce)", ids, qid)
		}
		r.stop(t)
		if n := len(capture.Transactions()); n != 0 {
			t.Errorf("%d notices for a deferred mail", n)
		}
		mxtest.CheckServersClosed(t, capture.Counter)
	})

	t.Run("a domain without MX records gets its mail at its own address", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "plain.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{})
		r := e.startDeliverer()
		e.enqueue(e2eSender, "gina@plain.test")
		e.waitEmpty(10 * time.Second)
		if txns := mx.Transactions(); len(txns) != 1 || txns[0].Rcpts[0] != "gina@plain.test" {
			t.Errorf("implicit MX got %+v", txns)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("MX hosts of equal preference share the load", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t,
			"share.test. 60 IN MX 10 mx1.share.test.", "mx1.share.test. 60 IN A "+e2eMX1,
			"share.test. 60 IN MX 10 mx2.share.test.", "mx2.share.test. 60 IN A "+e2eMX2)
		mx1 := e.startMX(e2eMX1, &mxtest.MX{})
		mx2 := e.startMX(e2eMX2, &mxtest.MX{})
		r := e.startDeliverer()
		const n = 20
		for i := range n {
			e.enqueue(e2eSender, fmt.Sprintf("user%d@share.test", i))
		}
		e.waitEmpty(20 * time.Second)
		n1, n2 := len(mx1.Transactions()), len(mx2.Transactions())
		if n1+n2 != n || n1 == 0 || n2 == 0 {
			t.Errorf("MX hosts got %d and %d messages, want %d shared between both", n1, n2, n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx1.Counter, mx2.Counter)
	})

	t.Run("a 4xx to one recipient and 250 to another retries only the deferred one", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "part.test. 60 IN MX 10 mx1.part.test.", "mx1.part.test. 60 IN A "+e2eMX1)
		var refusals atomic.Int32
		mx := e.startMX(e2eMX1, &mxtest.MX{Rcpt: func(to string) error {
			if to == "later@part.test" && refusals.Add(1) <= 2 {
				return e2eSMTPError(451, [3]int{4, 2, 0}, "mailbox busy, try later")
			}
			return nil
		}})
		capture := e.capture()
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "now@part.test", "later@part.test")
		st := e.waitState(qid, 10*time.Second, "the partial delivery to be recorded", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
		now, later := e2eRcptState(st, "now@part.test"), e2eRcptState(st, "later@part.test")
		if now.Status != spool.RcptDelivered || later.Status != spool.RcptDeferred || later.Code != 451 || later.Enhanced != "4.2.0" {
			t.Errorf("after the first attempt: now=%+v later=%+v", now, later)
		}
		e.waitEmpty(15 * time.Second)
		if c := mx.RcptCount("now@part.test"); c != 1 {
			t.Errorf("the delivered recipient was given %d times, want once", c)
		}
		if c := mx.RcptCount("later@part.test"); c != 3 {
			t.Errorf("the deferred recipient was tried %d times, want 3", c)
		}
		txns := mx.Transactions()
		if len(txns) != 2 || strings.Join(txns[0].Rcpts, ",") != "now@part.test" || strings.Join(txns[1].Rcpts, ",") != "later@part.test" {
			t.Errorf("MX transactions %+v", txns)
		}
		r.stop(t)
		if n := len(capture.Transactions()); n != 0 {
			t.Errorf("%d notices, want none (no DELAY warning configured)", n)
		}
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("each recipient follows the retry schedule by its own attempts", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		// A second attempt waits 1s, a third an hour.
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
			sp.RetryIntervals = []metav1.Duration{{Duration: time.Second}, {Duration: time.Hour}}
		}, nil, nil)
		e.dns.Add(t, "sched.test. 60 IN MX 10 mx1.sched.test.", "mx1.sched.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{Rcpt: func(string) error {
			return e2eSMTPError(451, [3]int{4, 2, 0}, "mailbox busy, try later")
		}})
		qid := e.enqueue(e2eSender, "old@sched.test", "new@sched.test")
		// old@ has been deferred once already (say its destination was
		// busy for new@ then); both are due now.
		past := time.Now().Add(-time.Minute)
		seed := &spool.DeliveryState{QueueID: qid, Attempts: 1, LastAttempt: past, NextAttempt: past, Rcpts: []spool.RcptState{
			{Addr: "old@sched.test", Status: spool.RcptDeferred, Attempts: 1, Code: 451, LastAttempt: past, NextAttempt: past},
			{Addr: "new@sched.test", Status: spool.RcptQueued},
		}}
		if err := e.sp.SaveState(context.Background(), seed); err != nil {
			t.Fatal(err)
		}
		r := e.startDeliverer()
		st := e.waitState(qid, 10*time.Second, "the attempt", func(st *spool.DeliveryState) bool { return st.Attempts >= 2 })
		old, nw := e2eRcptState(st, "old@sched.test"), e2eRcptState(st, "new@sched.test")
		if old.Attempts != 2 || old.NextAttempt.Sub(old.LastAttempt) < time.Hour {
			t.Errorf("old@ after its second attempt: %d attempts, next in %s; want 2 and an hour", old.Attempts, old.NextAttempt.Sub(old.LastAttempt))
		}
		if d := nw.NextAttempt.Sub(nw.LastAttempt); nw.Attempts != 1 || d < time.Second || d > 2*time.Second {
			t.Errorf("new@ after its first attempt: %d attempts, next in %s; want 1 and a second", nw.Attempts, d)
		}
		if !st.NextAttempt.Equal(nw.NextAttempt) {
			t.Errorf("the message is due at %s, want its first recipient's time %s", st.NextAttempt, nw.NextAttempt)
		}
		// A second later only new@ is tried again; old@ is not due.
		st = e.waitState(qid, 10*time.Second, "new@'s second attempt", func(st *spool.DeliveryState) bool {
			return e2eRcptState(st, "new@sched.test").Attempts >= 2
		})
		if old := e2eRcptState(st, "old@sched.test"); old.Attempts != 2 || mx.RcptCount("old@sched.test") != 1 {
			t.Errorf("old@ was tried again before it was due: %d attempts, %d RCPTs", old.Attempts, mx.RcptCount("old@sched.test"))
		}
		if c := mx.RcptCount("new@sched.test"); c != 2 {
			t.Errorf("new@ got %d RCPTs, want 2", c)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("a recipient delivered while another's destination is busy is not sent again", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		one := int32(1)
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
			sp.RetryIntervals = []metav1.Duration{{Duration: time.Hour}}
			sp.MaxSessionsPerDestination = &one
			sp.Timeouts.Greeting = e2eDur(time.Minute)
			sp.Timeouts.Session = e2eDur(30 * time.Second)
		}, nil, nil)
		e.dns.Add(t,
			"slow.test. 60 IN MX 10 mx1.slow.test.", "mx1.slow.test. 60 IN A "+e2eMX1,
			"fast.test. 60 IN MX 10 mx1.fast.test.", "mx1.fast.test. 60 IN A "+e2eMX2)
		tp := e.startTarpit(e2eMX1)
		fast := e.startMX(e2eMX2, &mxtest.MX{})
		// Three workers: one held by the tarpit, one waiting for slow.test's
		// only slot, and one more; a second waiter for slow.test is turned
		// away (it may not take more than half the workers).
		r := e.startDeliverer(func(c *Config, _ *e2eConn) { c.MaxInFlight = 3 })
		e.holdSlot(tp)
		e.enqueue(e2eSender, "waiting@slow.test")
		r.waitSlots(t, "a worker to wait for slow.test", func(d *Deliverer) bool { return d.destWaiting["slow.test"] == 1 })
		qid := e.enqueue(e2eSender, "a@fast.test", "b@slow.test")
		st := e.waitState(qid, 10*time.Second, "a@fast.test's delivery to be recorded", func(st *spool.DeliveryState) bool {
			return e2eRcptState(st, "a@fast.test").Status == spool.RcptDelivered
		})
		if b := e2eRcptState(st, "b@slow.test"); b.Attempts != 0 || b.Status != spool.RcptQueued {
			t.Errorf("b@slow.test was never tried (its destination was busy), yet its state is %+v", b)
		}
		// The message keeps coming back for b@slow.test every few seconds.
		busy := e2eCount(t, r.d.metrics.destinationBusy)
		mxtest.Within(t, 20*time.Second, "the message to come back twice more", func() bool {
			return e2eCount(t, r.d.metrics.destinationBusy) >= busy+2
		})
		if n := fast.RcptCount("a@fast.test"); n != 1 {
			t.Errorf("a@fast.test got %d copies, want 1", n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, fast.Counter)
	})

	t.Run("a 5xx to a recipient bounces with a DSN that carries the remote reply", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "bad.test. 60 IN MX 10 mx1.bad.test.", "mx1.bad.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{Rcpt: func(to string) error {
			if to == "nobody@bad.test" {
				return e2eSMTPError(550, [3]int{5, 1, 1}, "no such user here")
			}
			return nil
		}})
		capture := e.capture()
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "nobody@bad.test", "somebody@bad.test")
		b := waitBounce(t, capture, 1, 10*time.Second)
		if strings.Join(b.txn.Rcpts, ",") != e2eSender {
			t.Errorf("bounce went to %v", b.txn.Rcpts)
		}
		b.wantRcpt(t, map[string]string{
			"Action": "failed", "Status": "5.1.1", "Final-Recipient": "rfc822; nobody@bad.test",
			"Remote-MTA":      "dns; mx1.bad.test",
			"Diagnostic-Code": "smtp; 550 5.1.1 no such user here",
		})
		if b.message["X-Jetmail-Queue-Id"] != qid || b.message["Arrival-Date"] == "" {
			t.Errorf("per-message fields %v", b.message)
		}
		if to := b.parsed.Header.Get("To"); to != "<"+e2eSender+">" {
			t.Errorf("DSN To: %q", to)
		}
		orig := string(b.parsed.Parts[2].Body)
		if !strings.Contains(orig, "Subject: e2e "+qid) || !strings.Contains(orig, "Message-ID: <"+qid+"@e2e.test>") ||
			strings.Contains(orig, "Hello from") {
			t.Errorf("returned headers:\n%s", orig)
		}
		e.waitEmpty(10 * time.Second)
		if txns := mx.Transactions(); len(txns) != 1 || strings.Join(txns[0].Rcpts, ",") != "somebody@bad.test" {
			t.Errorf("MX got %+v", txns)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("a tarpit MX loses the session at its hard deadline and the mail is deferred", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		const session = 2 * time.Second
		e.setPolicy(func(s *v1alpha1.DeliveryPolicySpec) {
			s.RetryIntervals = []metav1.Duration{{Duration: time.Hour}}
			// Per-command timeouts far beyond the session deadline: only
			// the deadline can end this.
			s.Timeouts.Greeting = e2eDur(time.Minute)
			s.Timeouts.Session = e2eDur(session)
		}, nil, nil)
		e.dns.Add(t, "tarpit.test. 60 IN MX 10 mx1.tarpit.test.", "mx1.tarpit.test. 60 IN A "+e2eMX1)
		tp := e.startTarpit(e2eMX1)
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "hank@tarpit.test")
		st := e.waitState(qid, 10*time.Second, "the deferral", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
		rs := e2eRcptState(st, "hank@tarpit.test")
		if rs.Status != spool.RcptDeferred || rs.Enhanced != "4.4.2" || !strings.Contains(rs.Text, "session deadline") {
			t.Errorf("recipient state %+v, want deferred 4.4.2 at the session deadline", rs)
		}
		mxtest.Within(t, 5*time.Second, "the tarpit to see the client gone", func() bool { return len(tp.finished()) == 1 })
		span := tp.finished()[0]
		if held := span[1].Sub(span[0]); held < session-100*time.Millisecond || held > session+time.Second {
			t.Errorf("tarpit held the session %s, want the %s deadline plus a small margin", held, session)
		}
		r.d.mu.Lock()
		slots, sessions := len(r.d.perDest), r.d.sessions
		r.d.mu.Unlock()
		if slots != 0 || sessions != 0 {
			t.Errorf("after the attempt: %d destinations hold slots, %d sessions counted", slots, sessions)
		}
		if n := e2eCount(t, r.d.metrics.deadlineKills); n != 1 {
			t.Errorf("deadline kills = %v, want 1", n)
		}
		if n := e2eCount(t, r.d.metrics.deferrals.WithLabelValues("deadline")); n != 1 {
			t.Errorf("deferrals{class=deadline} = %v, want 1", n)
		}
		if n := tp.Accepted.Load(); n != 1 {
			t.Errorf("tarpit accepted %d connections, want 1", n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, tp.Counter)
	})

	t.Run("a static route fails over to its second next hop and logs in there", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		secrets := func(ns, name, key string) ([]byte, error) {
			if ns != "mail" || name != "relay-login" {
				return nil, fmt.Errorf("no Secret %s/%s", ns, name)
			}
			switch key {
			case "username":
				return []byte("relayuser"), nil
			case "password":
				return []byte("s3cret pass"), nil
			}
			return nil, fmt.Errorf("no key %s", key)
		}
		route := v1alpha1.MailRoute{
			ObjectMeta: metav1.ObjectMeta{Name: "smarthost", Namespace: "mail"},
			Spec: v1alpha1.MailRouteSpec{
				Domains:  []string{"routed.test"},
				NextHops: []string{e.hop(e2eMX1), e.hop(e2eMX2)},
				Auth:     &v1alpha1.RouteAuth{SecretRef: &v1alpha1.SecretRef{Name: "relay-login"}},
			},
		}
		e.setPolicy(nil, []v1alpha1.MailRoute{route}, secrets)
		e.down(e2eMX1)
		cert, _ := mxtest.SelfSignedCert(t, "relay-hop.e2e.test")
		mx2 := e.startMX(e2eMX2, &mxtest.MX{Users: map[string]string{"relayuser": "s3cret pass"}, RequireAuth: true}, func(s *smtp.Server) {
			s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
			s.AllowInsecureAuth = false
		})
		r := e.startDeliverer()
		e.enqueue(e2eSender, "ivan@routed.test")
		e.waitEmpty(10 * time.Second)
		txns := mx2.Transactions()
		if len(txns) != 1 || txns[0].User != "relayuser" || !txns[0].TLS || txns[0].Rcpts[0] != "ivan@routed.test" {
			t.Errorf("second next hop got %+v, want one mail, over TLS, as relayuser", txns)
		}
		if n := e.dns.Count("routed.test", dns.TypeMX); n != 0 {
			t.Errorf("%d MX queries for a routed domain", n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx2.Counter)
	})

	t.Run("mail still deferred when its queue lifetime ends is bounced with 4.4.7", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		const lifetime = 2 * time.Second
		e.setPolicy(func(s *v1alpha1.DeliveryPolicySpec) {
			s.QueueLifetime = e2eDur(lifetime)
			s.RetryIntervals = []metav1.Duration{{Duration: time.Hour}}
		}, nil, nil)
		e.dns.Add(t, "slow.test. 60 IN MX 10 mx1.slow.test.", "mx1.slow.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{Rcpt: func(string) error {
			return e2eSMTPError(451, [3]int{4, 3, 2}, "system not accepting mail right now")
		}})
		capture := e.capture()
		r := e.startDeliverer()
		start := time.Now()
		e.enqueue(e2eSender, "judy@slow.test")
		b := waitBounce(t, capture, 1, 15*time.Second)
		if took := time.Since(start); took < lifetime {
			t.Errorf("bounced after %s, before the %s lifetime", took, lifetime)
		}
		b.wantRcpt(t, map[string]string{
			"Action": "failed", "Status": "4.4.7", "Final-Recipient": "rfc822; judy@slow.test",
			"Diagnostic-Code": "smtp; 554 4.4.7 message expired after *",
		})
		if d := b.rcpts[0]["Diagnostic-Code"]; !strings.Contains(d, "system not accepting mail right now") {
			t.Errorf("Diagnostic-Code %q does not carry the last error", d)
		}
		e.waitEmpty(10 * time.Second)
		if n := mx.RcptCount("judy@slow.test"); n != 1 {
			t.Errorf("MX was tried %d times, want once (the next retry was an hour away)", n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("a deliverer killed mid-delivery leaves the mail to another replica, and one copy arrives", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "kill.test. 60 IN MX 10 mx1.kill.test.", "mx1.kill.test. 60 IN A "+e2eMX1)
		inData, release := make(chan struct{}), make(chan struct{})
		mx := e.startMX(e2eMX1, &mxtest.MX{Data: func(n int) error {
			if n > 1 {
				return nil
			}
			close(inData)
			<-release
			// The client vanished before our final reply: this
			// transaction never completed.
			return e2eSMTPError(451, [3]int{4, 4, 2}, "client went away")
		}})
		first := e.startDeliverer(e2eOwnConn(), e2eGrace(time.Millisecond))
		e.enqueue(e2eSender, "kate@kill.test")
		select {
		case <-inData:
		case <-time.After(10 * time.Second):
			t.Fatal("the first replica never reached DATA")
		}
		second := e.startDeliverer(e2eOwnConn())
		// SIGKILL: no ack, no nak, no state written.
		first.nc.Close()
		killed := time.Now()
		first.stop(t)
		t.Logf("first replica stopped %s after the kill", time.Since(killed))
		close(release)
		e.waitEmpty(15 * time.Second)
		if took := time.Since(killed); took < e2eAckWait/2 {
			t.Errorf("redelivered %s after the kill, before the ack wait %s", took, e2eAckWait)
		}
		wantOneCopyAfterKill(t, mx)
		second.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("a bounce that fails is dropped, not bounced", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		mx := e.startMXOf("bad.test", &mxtest.MX{Rcpt: e2eNoSuchUser})
		capture := e.capture()
		r := e.startDeliverer()
		e.enqueue("", "nobody@bad.test")
		mxtest.Within(t, 10*time.Second, "the MX to refuse the recipient", func() bool { return mx.RcptCount("nobody@bad.test") == 1 })
		// A notice would be queued before the mail leaves the queue, so
		// once the queue is empty nothing is coming.
		e.waitEmpty(10 * time.Second)
		if n := e2eCount(t, r.d.metrics.notifications.WithLabelValues("failed")); n != 0 {
			t.Errorf("%v notices queued", n)
		}
		r.stop(t)
		if n := len(capture.Transactions()); n != 0 {
			t.Errorf("the sender's MX got %d messages", n)
		}
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("a bounce that fails is reported to the postmaster when one is configured", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.setPolicy(func(s *v1alpha1.DeliveryPolicySpec) { s.Postmaster = "postmaster@sender.test" }, nil, nil)
		mx := e.startMXOf("bad.test", &mxtest.MX{Rcpt: e2eNoSuchUser})
		capture := e.capture()
		r := e.startDeliverer()
		e.enqueue("", "nobody@bad.test")
		b := waitBounce(t, capture, 1, 10*time.Second)
		if strings.Join(b.txn.Rcpts, ",") != "postmaster@sender.test" {
			t.Errorf("notice went to %v, want the postmaster", b.txn.Rcpts)
		}
		b.wantRcpt(t, map[string]string{"Action": "failed", "Status": "5.1.1", "Final-Recipient": "rfc822; nobody@bad.test"})
		e.waitEmpty(10 * time.Second)
		if n := len(capture.Transactions()); n != 1 {
			t.Errorf("the postmaster got %d messages, want 1", n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("a route changed between attempts is followed by the next attempt", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		route := func(hop string) []v1alpha1.MailRoute {
			return []v1alpha1.MailRoute{{
				ObjectMeta: metav1.ObjectMeta{Name: "moving", Namespace: "mail"},
				Spec:       v1alpha1.MailRouteSpec{Domains: []string{"moving.test"}, NextHops: []string{hop}, TLS: v1alpha1.TLSNone},
			}}
		}
		slow := func(s *v1alpha1.DeliveryPolicySpec) {
			s.RetryIntervals = []metav1.Duration{{Duration: 2 * time.Second}}
		}
		e.setPolicy(slow, route(e.hop(e2eMX1)), nil)
		old := e.startMX(e2eMX1, &mxtest.MX{Rcpt: func(string) error {
			return e2eSMTPError(451, [3]int{4, 3, 0}, "going away")
		}})
		next := e.startMX(e2eMX2, &mxtest.MX{})
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "leo@moving.test")
		e.waitState(qid, 10*time.Second, "the deferral at the old hop", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
		e.setPolicy(slow, route(e.hop(e2eMX2)), nil)
		e.waitEmpty(15 * time.Second)
		if n := old.RcptCount("leo@moving.test"); n != 1 {
			t.Errorf("the old hop was tried %d times, want once", n)
		}
		if txns := next.Transactions(); len(txns) != 1 {
			t.Errorf("the new hop got %d messages, want 1", len(txns))
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, old.Counter, next.Counter)
	})
}

// wantOneCopyAfterKill checks that mx completed one transaction after
// seeing DATA twice: the attempt of the deliverer that was killed in its
// DATA, and the one that followed.
func wantOneCopyAfterKill(t *testing.T, mx *mxtest.MX) {
	t.Helper()
	if n := len(mx.Transactions()); n != 1 {
		t.Errorf("MX completed %d transactions, want exactly 1", n)
	}
	if n := mx.DataCount(); n != 2 {
		t.Errorf("MX saw DATA %d times, want 2 (the killed one and the good one)", n)
	}
}
