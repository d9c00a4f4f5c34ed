//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/spool"
)

// scaleConfig is one cell of the matrix.
type scaleConfig struct {
	pairs, replicas int
	syncAlways      bool
}

func (c scaleConfig) fsync() string {
	if c.syncAlways {
		return "always"
	}
	return "default"
}

func (c scaleConfig) name() string {
	return fmt.Sprintf("p%d-r%d-%s", c.pairs, c.replicas, c.fsync())
}

// scaleLoad is the load of every configuration.
type scaleLoad struct {
	messages, size, sessions int
	pprof                    bool
	pprofFor                 time.Duration
	out                      string
}

// cpuGroups are the columns of the CPU split.
var cpuGroups = []string{"gateway", "deliverer", "nats", "loadgen", "other"}

// scaleResult is what one configuration measured.
type scaleResult struct {
	cfg                     scaleConfig
	sent, acked, errs       int     // measured messages, 250s, failed transactions (retried)
	delivered, copies       int     // distinct measured messages at the sinks, and copies
	acceptSecs, deliverSecs float64 // from the first send to the last 250, to the last arrival
	window                  float64 // the CPU window: first send to every message delivered
	cpu                     map[string]float64
	complete                bool
	system                  string  // the machine's CPU over the window (/proc/stat)
	machineBusy             float64 // CPU seconds the whole machine was busy over the window, every process included
	p50Accept, p99Accept    time.Duration
	note                    string
}

func (r *scaleResult) acceptRate() float64 {
	if r.acceptSecs <= 0 {
		return 0
	}
	return float64(r.acked) / r.acceptSecs
}

func (r *scaleResult) deliverRate() float64 {
	if r.deliverSecs <= 0 {
		return 0
	}
	return float64(r.delivered) / r.deliverSecs
}

func (r *scaleResult) cpuTotal() float64 {
	var s float64
	for _, v := range r.cpu {
		s += v
	}
	return s
}

func (r *scaleResult) share(g ...string) float64 {
	tot := r.cpuTotal()
	if tot == 0 {
		return 0
	}
	var s float64
	for _, k := range g {
		s += r.cpu[k]
	}
	return 100 * s / tot
}

const scaleHeader = "| pairs | replicas | fsync | accepted msg/s | delivered msg/s | accept p50 / p99 | CPU s (cores busy) | machine CPU s, others' share | CPU ms/msg | jetmail % (gw / dl) | nats % | loadgen+sinks % | other % |\n" +
	"| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"

func (r *scaleResult) row() string {
	delivered := fmt.Sprintf("%.0f", r.deliverRate())
	if !r.complete {
		delivered += fmt.Sprintf(" (%d/%d only)", r.delivered, r.acked)
	}
	perMsg := 0.0
	if r.delivered > 0 {
		perMsg = 1000 * r.cpuTotal() / float64(r.delivered)
	}
	others := 0.0
	if r.machineBusy > 0 {
		others = max(0, 100*(r.machineBusy-r.cpuTotal())/r.machineBusy)
	}
	return fmt.Sprintf("| %d | R%d | %s | %.0f | %s | %.1f / %.1f ms | %.1f (%.2f) | %.1f, %.0f%% | %.2f | %.0f (%.0f / %.0f) | %.0f | %.0f | %.0f |",
		r.cfg.pairs, r.cfg.replicas, r.cfg.fsync(), r.acceptRate(), delivered,
		float64(r.p50Accept.Microseconds())/1000, float64(r.p99Accept.Microseconds())/1000,
		r.cpuTotal(), r.cpuTotal()/r.window, r.machineBusy, others, perMsg,
		r.share("gateway", "deliverer"), r.share("gateway"), r.share("deliverer"),
		r.share("nats"), r.share("loadgen"), r.share("other"))
}

func envInts(t *testing.T, key, def string) []int {
	t.Helper()
	v := os.Getenv(key)
	if v == "" {
		v = def
	}
	var out []int
	for _, f := range strings.Fields(strings.ReplaceAll(v, ",", " ")) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want positive numbers", key, v)
		}
		out = append(out, n)
	}
	return out
}

func envInt(t *testing.T, key string, def int) int {
	t.Helper()
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive number", key, v)
	}
	return n
}

// TestClusterScale is a benchmark, not a test (hack/bench-cluster.sh): on
// the cluster proof's machinery (nats-server processes, envtest with a
// controller, gateways and deliverers of the real binary, the DNS server
// and the SMTP sinks of the test process) it measures, per configuration,
// how many messages per second the gateways accept (250s seen by the load
// generator) and how many arrive at the sinks, and where the CPU goes:
// jetmail processes, nats-server processes, the test process (load
// generator, sinks, DNS) and the rest (controller, kube-apiserver, etcd).
//
// No faults, and only the normal destinations (plain fast sinks). The
// matrix is pairs (gateway+deliverer pairs) x replicas (JetStream R1, one
// nats-server standalone; R3, three routed servers) x fsync (NATS's
// default sync interval; sync_interval: always). It skips unless
// E2E_SCALE=1. Env:
//
//	E2E_SCALE_PAIRS="1 2 4"              gateway+deliverer pairs
//	E2E_SCALE_REPLICAS="1 3"             JetStream replicas (servers)
//	E2E_SCALE_FSYNC="default always"     nats-server sync_interval
//	E2E_SCALE_MESSAGES=3000              measured messages per configuration
//	E2E_SCALE_SIZE=5120                  bytes per message
//	E2E_SCALE_SESSIONS=20                concurrent SMTP sessions, spread over the gateways
//	E2E_SCALE_PPROF=1                    CPU profile of gw-0 and dl-0 per configuration
//	E2E_SCALE_PPROF_SECONDS=5            its length, from the start of the measured load
//	E2E_SCALE_OUT=dir                    where profiles and their summaries are copied
//
// Each configuration gets fresh NATS servers (a fresh store), its own
// namespace and controller, and fresh gateways and deliverers; the API
// server, the DNS server and the sinks are shared. A warm-up of a few
// messages per session is sent and delivered before the measurement.
//
// The columns: accepted msg/s is the 250s over the time from the first
// send to the last 250; delivered msg/s the distinct messages at the sinks
// over the time from the first send to the last arrival; accept p50/p99
// the transaction time (MAIL FROM to 250) per message. CPU s is what the
// run's processes used over the window (first send to all delivered),
// from /proc/<pid>/stat (gateways, deliverers, nats-servers, controller,
// kube-apiserver, etcd) and getrusage (the test process: load generator,
// sinks and DNS together); cores busy is that over the window. The
// machine's CPU over the same window (/proc/stat) is beside it, with the
// share used by processes outside the run (others' work on a shared
// machine). CPU ms/msg is the run's CPU per delivered message.
func TestClusterScale(t *testing.T) {
	if os.Getenv("E2E_SCALE") != "1" {
		t.Skip("a benchmark: E2E_SCALE=1 (hack/bench-cluster.sh)")
	}
	natsBin, jetmailBin := os.Getenv("NATS_SERVER_BIN"), os.Getenv("JETMAIL_BIN")
	if natsBin == "" || jetmailBin == "" || os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("NATS_SERVER_BIN, JETMAIL_BIN and KUBEBUILDER_ASSETS must be set: run hack/bench-cluster.sh")
	}
	repo, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	pairs := envInts(t, "E2E_SCALE_PAIRS", "1 2 4")
	replicas := envInts(t, "E2E_SCALE_REPLICAS", "1 3")
	for _, r := range replicas {
		if r != 1 && r != 3 {
			t.Fatalf("E2E_SCALE_REPLICAS: %d: want 1 or 3", r)
		}
	}
	var syncs []bool
	fs := os.Getenv("E2E_SCALE_FSYNC")
	if fs == "" {
		fs = "default always"
	}
	for _, f := range strings.Fields(fs) {
		switch f {
		case "default":
			syncs = append(syncs, false)
		case "always":
			syncs = append(syncs, true)
		default:
			t.Fatalf("E2E_SCALE_FSYNC: %q: want default or always", f)
		}
	}
	load := scaleLoad{
		messages: envInt(t, "E2E_SCALE_MESSAGES", 3000),
		size:     envInt(t, "E2E_SCALE_SIZE", 5120),
		sessions: envInt(t, "E2E_SCALE_SESSIONS", 20),
		pprof:    os.Getenv("E2E_SCALE_PPROF") == "1",
		pprofFor: time.Duration(envInt(t, "E2E_SCALE_PPROF_SECONDS", 5)) * time.Second,
		out:      os.Getenv("E2E_SCALE_OUT"),
	}

	w := newWorld(t)
	dns := startDNS(t)
	snk := startSinks(t)
	k := startKube(w, repo)
	w.logf("DNS on %s, sinks on port %d, API server up; %d messages of %d B over %d sessions per configuration",
		dns.Addr, snk.port, load.messages, load.size, load.sessions)

	for _, line := range strings.Split(scaleHeader, "\n") {
		fmt.Printf("scale-header: %s\n", line)
	}
	var results []*scaleResult
	seq := 0
	for _, r := range replicas {
		for _, s := range syncs {
			for _, p := range pairs {
				cfg := scaleConfig{pairs: p, replicas: r, syncAlways: s}
				seq++
				res := runScale(t, seq, w, k, dns.Addr, snk, natsBin, jetmailBin, cfg, load)
				if res == nil {
					continue
				}
				results = append(results, res)
				fmt.Printf("scale-row: %s\n", res.row())
				fmt.Printf("scale-cpu: %s %s\n", cfg.name(), res.cpuLine())
			}
		}
	}
	fmt.Printf("\n%s\n", scaleHeader)
	for _, r := range results {
		fmt.Println(r.row())
	}
	fmt.Println()
	for _, r := range results {
		fmt.Printf("%s: %s\n", r.cfg.name(), r.cpuLine())
	}
}

// cpuLine is the CPU split in seconds, and the notes of the run.
func (r *scaleResult) cpuLine() string {
	var parts []string
	for _, g := range cpuGroups {
		parts = append(parts, fmt.Sprintf("%s=%.2fs", g, r.cpu[g]))
	}
	return fmt.Sprintf("cpu %s window=%.2fs machine[%s] sent=%d acked=%d delivered=%d copies=%d retried_transactions=%d%s",
		strings.Join(parts, " "), r.window, r.system, r.sent, r.acked, r.delivered, r.copies, r.errs, r.note)
}

// runScale runs one configuration on its own NATS servers, controller,
// gateways and deliverers, and stops them. A setup failure fails the test
// and returns nil, so that the rest of the matrix still runs.
func runScale(t *testing.T, seq int, parent *world, k *kube, dnsAddr string, snk *sinks, natsBin, jetmailBin string, cfg scaleConfig, load scaleLoad) *scaleResult {
	run := fmt.Sprintf("%02d-%s", seq, cfg.name())
	w := &world{t: t, dir: filepath.Join(parent.dir, run), start: time.Now()}
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	defer func() {
		w.killAll()
		// The logs stay with the run directory; the stores go.
		ents, _ := os.ReadDir(w.dir)
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), "-store") {
				os.RemoveAll(filepath.Join(w.dir, e.Name()))
			}
		}
	}()
	fail := func(format string, args ...any) *scaleResult {
		t.Errorf("%s: "+format, append([]any{cfg.name()}, args...)...)
		return nil
	}
	w.logf("%s: starting", cfg.name())

	// NATS.
	nodes := 1
	if cfg.replicas == 3 {
		nodes = 3
	}
	// freePort's ports were free a moment ago only: when two servers got
	// the same one, one exits, and the servers start again on new ports.
	var ns *natsCluster
	for try := 1; ; try++ {
		ns = startNATSWith(w, natsBin, natsOptions{nodes: nodes, syncAlways: cfg.syncAlways})
		err := natsUp(ns)
		if err == nil {
			break
		}
		for _, n := range ns.nodes {
			n.p.kill()
			os.RemoveAll(filepath.Join(w.dir, n.name+"-store"))
		}
		if try == 3 {
			return fail("NATS: %v", err)
		}
		w.logf("%s: NATS did not come up (%v); starting it again on new ports", cfg.name(), err)
	}

	// The configuration, in a namespace of its own, and its controller.
	namespace := "scale-" + run
	if _, err := k.kubectl(nil, "create", "namespace", namespace); err != nil {
		return fail("%v", err)
	}
	if err := k.apply(scaleObjects(namespace, snk.port)); err != nil {
		return fail("%v", err)
	}
	rep := fmt.Sprintf("--replicas=%d", cfg.replicas)
	ctrl := w.newController(jetmailBin, "ctrl-0", ns.URL(), namespace, k.kubeconfig)
	ctrl.p.args = append(ctrl.p.args, rep)
	if err := ctrl.startAndWait(60 * time.Second); err != nil {
		return fail("%v", err)
	}

	// The pairs. The deliverers run with the chart's --max-in-flight
	// (the binary's default), not the cluster proof's small one.
	var gws, dls []*role
	for i := 0; i < cfg.pairs; i++ {
		gw := w.newGateway(jetmailBin, fmt.Sprintf("gw-%d", i), ns.URL())
		gw.p.args = append(gw.p.args, rep)
		dl := w.newDeliverer(jetmailBin, fmt.Sprintf("dl-%d", i), ns.URL(), dnsAddr)
		dl.p.args = append(dl.p.args, rep, "--max-in-flight=200")
		if load.pprof {
			gw.p.env = append(gw.p.env, "JETMAIL_PPROF=1")
			dl.p.env = append(dl.p.env, "JETMAIL_PPROF=1")
		}
		gws, dls = append(gws, gw), append(dls, dl)
	}
	for _, r := range append(append([]*role(nil), gws...), dls...) {
		if err := r.startAndWait(60 * time.Second); err != nil {
			return fail("%v", err)
		}
	}
	for _, o := range [][2]string{{"relaypolicy", "default"}, {"deliverypolicy", "default"}} {
		if err := poll(90*time.Second, 500*time.Millisecond, func() error {
			s, err := k.status(namespace, o[0], o[1])
			if err == nil && (s.Accepted != "True" || s.Ready != "True") {
				err = fmt.Errorf("%s/%s: Accepted=%q Ready=%q %s", o[0], o[1], s.Accepted, s.Ready, s.Message)
			}
			return err
		}); err != nil {
			return fail("configuration never ready: %v", err)
		}
	}
	if n, err := queueReplicas(ns.URL()); err != nil || n != cfg.replicas {
		return fail("stream %s: %d replicas (%v), want %d", spool.QueueStream, n, err, cfg.replicas)
	}

	// Warm-up: a few messages per session, delivered, before measuring.
	lg := &loadgen{gws: gws, sessions: load.sessions}
	warm := makeScaleMessages(run+"-warm", 2*load.sessions, load.size)
	base := snk.count()
	lg.run(warm)
	if err := poll(60*time.Second, 100*time.Millisecond, func() error {
		if n, _, _ := snk.scaleCount(base, run+"-warm"); n < len(warm) {
			return fmt.Errorf("%d of %d warm-up messages delivered", n, len(warm))
		}
		return nil
	}); err != nil {
		return fail("warm-up: %v", err)
	}

	// The measurement.
	prefix := run + "-m"
	msgs := makeScaleMessages(prefix, load.messages, load.size)
	base = snk.count()
	groups := cpuGroupsOf(w)
	cpu0 := sampleCPU(groups)
	natsCPU0 := map[string]float64{}
	for _, n := range ns.nodes {
		natsCPU0[n.name] = procCPU(n.p.pid())
	}
	sys0 := readSystemCPU()
	start := time.Now()
	var profiles sync.WaitGroup
	if load.pprof {
		for _, r := range []*role{gws[0], dls[0]} {
			profiles.Add(1)
			go func() {
				defer profiles.Done()
				path := filepath.Join(w.dir, r.name+".cpu.pprof")
				if err := fetchProfile(r, load.pprofFor, path); err != nil {
					t.Logf("%s: profile of %s: %v", cfg.name(), r.name, err)
				}
			}()
		}
	}
	lg.run(msgs)
	res := &scaleResult{cfg: cfg, sent: len(msgs)}
	var lastAck time.Time
	var lat []time.Duration
	for _, m := range lg.done {
		if m.ok {
			res.acked++
			lat = append(lat, m.latency)
			if m.at.After(lastAck) {
				lastAck = m.at
			}
		}
	}
	res.errs = lg.errs
	res.acceptSecs = lastAck.Sub(start).Seconds()
	res.p50Accept, res.p99Accept = percentile(lat, 50), percentile(lat, 99)
	drain := 60*time.Second + time.Duration(load.messages)*20*time.Millisecond
	var lastArrival time.Time
	_ = poll(drain, 100*time.Millisecond, func() error {
		res.delivered, res.copies, lastArrival = snk.scaleCount(base, prefix)
		if res.delivered < res.acked {
			return fmt.Errorf("%d of %d delivered", res.delivered, res.acked)
		}
		return nil
	})
	end := time.Now()
	cpu1 := sampleCPU(groups)
	var perServer []string
	for _, n := range ns.nodes {
		perServer = append(perServer, fmt.Sprintf("%s=%.2fs", n.name, procCPU(n.p.pid())-natsCPU0[n.name]))
	}
	sys1 := readSystemCPU()
	res.system, res.machineBusy = sys1.since(sys0), sys1.busySince(sys0)
	res.complete = res.delivered >= res.acked
	res.deliverSecs = lastArrival.Sub(start).Seconds()
	res.window = end.Sub(start).Seconds()
	res.cpu = map[string]float64{}
	for g := range cpu1 {
		res.cpu[g] = cpu1[g] - cpu0[g]
	}
	res.note += " nats_per_server[" + strings.Join(perServer, " ") + "]"
	if cfg.replicas > 1 {
		res.note += " queue_leader=" + queueLeaderName(ns.URL())
	}
	if res.acked < res.sent {
		res.note += fmt.Sprintf(" unacknowledged=%d", res.sent-res.acked)
	}
	w.logf("%s: %s", cfg.name(), res.cpuLine())
	profiles.Wait()
	if load.pprof {
		for _, r := range []*role{gws[0], dls[0]} {
			summarizeProfile(t, cfg, r, filepath.Join(w.dir, r.name+".cpu.pprof"), jetmailBin, load.out)
		}
	}
	for _, p := range w.procs {
		for _, c := range p.crashes() {
			t.Errorf("%s: %s; last lines of %s:\n%s", cfg.name(), c, p.logPath, p.logTail(15))
		}
	}
	return res
}

// scaleObjects are a configuration's RelayPolicy and DeliveryPolicy: relay
// from loopback, deliver to the sinks' port with the chart's defaults for
// sessions.
func scaleObjects(ns string, port int) string {
	return fmt.Sprintf(`apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata: {name: default, namespace: %[1]s}
spec:
  relayNetworks: [127.0.0.0/8]
  maxMessageBytes: 10485760
  maxRecipients: 100
  timeouts: {command: 60s, data: 120s, session: 10m}
  limits: {maxConnections: 1000, maxConnectionsPerIP: 200, maxErrors: 20}
---
apiVersion: mail.jetmail.io/v1alpha1
kind: DeliveryPolicy
metadata: {name: default, namespace: %[1]s}
spec:
  timeouts: {connect: 2s, greeting: 4s, mail: 10s, rcpt: 10s, dataInit: 10s, dataBlock: 10s, dataDone: 30s, session: 60s}
  retryIntervals: [2s, 4s, 8s]
  queueLifetime: 30m
  maxSessions: 100
  maxSessionsPerDestination: 20
  messagesPerConnection: 100
  port: %[2]d
  postmaster: postmaster@%[3]s
`, ns, port, sendersDomain)
}

// natsUp waits for a standalone server to be healthy, or for the
// cluster's meta group to form, and fails early when a server exits.
func natsUp(ns *natsCluster) error {
	return poll(60*time.Second, 100*time.Millisecond, func() error {
		for _, n := range ns.nodes {
			if !n.p.running() {
				return fmt.Errorf("%s exited: %s", n.name, n.p.logTail(1))
			}
		}
		if len(ns.nodes) > 1 {
			return ns.formed()
		}
		code, body, err := httpGet(fmt.Sprintf("http://127.0.0.1:%d/healthz", ns.nodes[0].httpPort))
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("/healthz %d %s", code, body)
		}
		return err
	})
}

// queueReplicas reads the queue stream's replica count.
func queueReplicas(url string) (int, error) {
	nc, err := nats.Connect(url, nats.Name("jetmail-e2e-scale"))
	if err != nil {
		return 0, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return 0, err
	}
	return streamReplicas(js, spool.QueueStream)
}

// queueLeaderName names the server leading the queue stream, or says why
// it cannot.
func queueLeaderName(url string) string {
	nc, err := nats.Connect(url, nats.Name("jetmail-e2e-scale"))
	if err != nil {
		return err.Error()
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err.Error()
	}
	leader, _, err := streamLeader(js, spool.QueueStream)
	if err != nil {
		return err.Error()
	}
	return leader
}

// makeScaleMessages builds n messages of size bytes, each to one recipient
// on the normal destinations (domains d00 to d19, four sinks).
func makeScaleMessages(prefix string, n, size int) []*message {
	out := make([]*message, n)
	for i := range out {
		m := &message{idx: i, id: fmt.Sprintf("%s-%06d@senders.test", prefix, i),
			from:  fmt.Sprintf("s%02d@%s", i%50, sendersDomain),
			rcpts: []string{fmt.Sprintf("u%d@%s", i%1000, domainName(i%20))}}
		m.data = messageBytes(m, size)
		out[i] = m
	}
	return out
}

// loadgen sends a batch of messages over a number of sessions spread
// round-robin over the gateways, each session keeping its connection for
// the whole batch (reconnecting only after an error). A transaction that
// fails is retried, up to five times per message.
type loadgen struct {
	gws      []*role
	sessions int

	done []sendOutcome
	errs int
}

type sendOutcome struct {
	ok      bool
	at      time.Time     // the 250
	latency time.Duration // the transaction, MAIL FROM to the 250
}

func (lg *loadgen) run(msgs []*message) {
	lg.done = make([]sendOutcome, len(msgs))
	lg.errs = 0
	var next atomic.Int64
	var errs atomic.Int64
	var wg sync.WaitGroup
	for s := 0; s < lg.sessions; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			gw := lg.gws[s%len(lg.gws)]
			var c *client
			defer func() {
				if c != nil {
					c.quit()
				}
			}()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(msgs) {
					return
				}
				for try := 0; try < 5; try++ {
					if c == nil {
						var err error
						if c, err = dial(gw.smtp); err != nil {
							errs.Add(1)
							c = nil
							time.Sleep(100 * time.Millisecond)
							continue
						}
					}
					t0 := time.Now()
					_, err := c.send(msgs[i])
					if err == nil {
						now := time.Now()
						lg.done[i] = sendOutcome{ok: true, at: now, latency: now.Sub(t0)}
						break
					}
					errs.Add(1)
					c.close()
					c = nil
				}
			}
		}()
	}
	wg.Wait()
	lg.errs = int(errs.Load())
}

func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[(len(s)-1)*p/100]
}

// count is how many deliveries the sinks hold.
func (s *sinks) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.deliveries)
}

// scaleCount counts, among the deliveries from index from on, the
// distinct messages whose Message-ID starts with prefix, their copies, and
// the arrival of the last new one.
func (s *sinks) scaleCount(from int, prefix string) (distinct, copies int, last time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[string]bool{}
	for _, d := range s.deliveries[from:] {
		if !strings.HasPrefix(d.msgID, prefix) {
			continue
		}
		copies++
		if !seen[d.msgID] {
			seen[d.msgID] = true
			if d.at.After(last) {
				last = d.at
			}
		}
	}
	return len(seen), copies, last
}

// cpuGroupsOf names the processes whose CPU is counted, by group: the
// configuration's jetmail and nats-server processes, and every other child
// of the test process (envtest's kube-apiserver and etcd) as other, with
// the controller. The test process itself is the loadgen group.
func cpuGroupsOf(w *world) map[int]string {
	g := map[int]string{}
	for _, p := range w.procs {
		pid := p.pid()
		if pid == 0 || !p.running() {
			continue
		}
		switch {
		case strings.HasPrefix(p.name, "gw-"):
			g[pid] = "gateway"
		case strings.HasPrefix(p.name, "dl-"):
			g[pid] = "deliverer"
		case strings.HasPrefix(p.name, "nats-"):
			g[pid] = "nats"
		default:
			g[pid] = "other"
		}
	}
	self := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || g[pid] != "" {
			continue
		}
		if ppid, err := procPPID(pid); err == nil && ppid == self {
			g[pid] = "other"
		}
	}
	return g
}

// procStat returns the fields of /proc/<pid>/stat after the command name.
func procStat(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, fmt.Errorf("/proc/%d/stat: no command", pid)
	}
	return strings.Fields(string(b[i+1:])), nil
}

func procPPID(pid int) (int, error) {
	f, err := procStat(pid)
	if err != nil || len(f) < 2 {
		return 0, fmt.Errorf("/proc/%d/stat: %v", pid, err)
	}
	return strconv.Atoi(f[1])
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's times (100 on
// every Linux architecture Go runs on, bar none that matters here).
const clockTicks = 100

// procCPU is the user+system CPU seconds a process used so far.
func procCPU(pid int) float64 {
	f, err := procStat(pid)
	if err != nil || len(f) < 13 {
		return 0
	}
	// utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
	u, _ := strconv.ParseFloat(f[11], 64)
	s, _ := strconv.ParseFloat(f[12], 64)
	return (u + s) / clockTicks
}

// sampleCPU sums the CPU seconds per group, and the test process's own
// (getrusage) as loadgen.
func sampleCPU(groups map[int]string) map[string]float64 {
	out := map[string]float64{}
	for _, g := range cpuGroups {
		out[g] = 0
	}
	for pid, g := range groups {
		out[g] += procCPU(pid)
	}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		out["loadgen"] = time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
	}
	return out
}

// fetchProfile takes a CPU profile of a role (JETMAIL_PPROF=1) for d.
func fetchProfile(r *role, d time.Duration, path string) error {
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	defer cancel()
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", r.metrics, int(d.Seconds()))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("%s: %d %s", url, resp.StatusCode, b)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// summarizeProfile prints the top functions of a profile (go tool pprof
// -top), flat and cumulative, and copies the profile and the summary to
// out when set.
func summarizeProfile(t *testing.T, cfg scaleConfig, r *role, path, bin, out string) {
	if _, err := os.Stat(path); err != nil {
		return
	}
	var text bytes.Buffer
	for _, mode := range [][]string{{"-top", "-nodecount=25"}, {"-top", "-cum", "-nodecount=25"}} {
		args := append([]string{"tool", "pprof"}, mode...)
		cmd := exec.Command("go", append(args, bin, path)...)
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Logf("%s: go tool pprof %s: %v\n%s", cfg.name(), path, err, b)
			return
		}
		fmt.Fprintf(&text, "== %s %s (%s)\n%s\n", cfg.name(), r.name, strings.Join(mode, " "), b)
	}
	if pk, err := profileByPackage(bin, path); err == nil {
		fmt.Fprintf(&text, "== %s %s (flat CPU by package)\n%s\n", cfg.name(), r.name, pk)
	} else {
		t.Logf("%s: %s by package: %v", cfg.name(), path, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(text.Bytes()))
	for sc.Scan() {
		fmt.Printf("scale-pprof: %s\n", sc.Text())
	}
	if out != "" {
		_ = os.MkdirAll(out, 0o755)
		base := filepath.Join(out, cfg.name()+"-"+r.name)
		if b, err := os.ReadFile(path); err == nil {
			_ = os.WriteFile(base+".cpu.pprof", b, 0o644)
		}
		_ = os.WriteFile(base+".top.txt", text.Bytes(), 0o644)
	}
}

// profileByPackage sums a profile's flat CPU time by Go package (go tool
// pprof -top over every function), largest first.
func profileByPackage(bin, path string) (string, error) {
	b, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=1000000", bin, path).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%v: %s", err, b)
	}
	byPkg := map[string]time.Duration{}
	var total time.Duration
	table := false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "flat" && f[1] == "flat%" {
			table = true
			continue
		}
		if !table || len(f) < 6 {
			continue
		}
		flat, err := time.ParseDuration(f[0])
		if err != nil {
			continue
		}
		byPkg[goPackage(f[5])] += flat
		total += flat
	}
	if total == 0 {
		return "", fmt.Errorf("no samples")
	}
	pkgs := make([]string, 0, len(byPkg))
	for p := range byPkg {
		pkgs = append(pkgs, p)
	}
	sort.Slice(pkgs, func(i, j int) bool { return byPkg[pkgs[i]] > byPkg[pkgs[j]] })
	var out strings.Builder
	fmt.Fprintf(&out, "total %s\n", total)
	for i, p := range pkgs {
		if i == 20 {
			break
		}
		fmt.Fprintf(&out, "%8s %5.1f%%  %s\n", byPkg[p], 100*float64(byPkg[p])/float64(total), p)
	}
	return out.String(), nil
}

// goPackage is the package of a function name as pprof prints it:
// "github.com/nats-io/nats.go.(*Conn).publish" is in
// github.com/nats-io/nats.go, "runtime.mallocgc" in runtime.
func goPackage(fn string) string {
	slash := strings.LastIndexByte(fn, '/')
	rest := fn[slash+1:]
	skip := 0
	// A last path element with a dot of its own (nats.go, yaml.v3).
	if i := strings.IndexByte(rest, '.'); i >= 0 {
		if after := rest[i+1:]; strings.HasPrefix(after, "go.") || (len(after) > 1 && after[0] == 'v' && after[1] >= '0' && after[1] <= '9') {
			skip = i + 1
		}
	}
	pkg := fn
	if i := strings.IndexByte(rest[skip:], '.'); i >= 0 {
		pkg = fn[:slash+1+skip+i]
	}
	return strings.ReplaceAll(pkg, "%2e", ".") // pprof escapes a path's dots
}

// systemCPU is the first line of /proc/stat: the machine's CPU time by
// kind, in ticks, over all cores.
type systemCPU struct{ user, nice, system, idle, iowait, irq, softirq, steal uint64 }

func readSystemCPU() systemCPU {
	var c systemCPU
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return c
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	v := make([]uint64, 8)
	for i := range v {
		if i+1 < len(f) {
			v[i], _ = strconv.ParseUint(f[i+1], 10, 64)
		}
	}
	return systemCPU{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]}
}

// since describes the machine's CPU between two readings, in shares of
// all its cores: user, system (irq included), idle, iowait, steal.
func (c systemCPU) since(o systemCPU) string {
	user, sys := c.user+c.nice-o.user-o.nice, c.system+c.irq+c.softirq-o.system-o.irq-o.softirq
	idle, iow, steal := c.idle-o.idle, c.iowait-o.iowait, c.steal-o.steal
	total := user + sys + idle + iow + steal
	if total == 0 {
		return "no /proc/stat"
	}
	pct := func(x uint64) float64 { return 100 * float64(x) / float64(total) }
	return fmt.Sprintf("user=%.0f%% sys=%.0f%% idle=%.0f%% iowait=%.0f%% steal=%.0f%%", pct(user), pct(sys), pct(idle), pct(iow), pct(steal))
}

// busySince is the CPU seconds the machine was busy (not idle, not in
// iowait) between two readings, over all cores.
func (c systemCPU) busySince(o systemCPU) float64 {
	busy := c.user + c.nice + c.system + c.irq + c.softirq + c.steal - (o.user + o.nice + o.system + o.irq + o.softirq + o.steal)
	return float64(busy) / clockTicks
}
