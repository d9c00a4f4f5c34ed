package main

import (
	"context"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/controllers"
	"github.com/jetmail/jetmail/deliverer"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/smtpgw"
	"github.com/jetmail/jetmail/spool"
)

// descRecorder is a registry that also notes the name and labels of every
// metric registered with it: what a process exports, including the metric
// vectors that have no series yet.
type descRecorder struct {
	*prometheus.Registry
	mu      sync.Mutex
	metrics map[string]string // name -> sorted labels, comma separated
}

var descRE = regexp.MustCompile(`fqName: "([^"]+)".*variableLabels: \{([^}]*)\}`)

func (r *descRecorder) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 16)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		m := descRE.FindStringSubmatch(d.String())
		if m == nil {
			continue
		}
		labels := strings.Fields(strings.ReplaceAll(m[2], ",", " "))
		slices.Sort(labels)
		r.mu.Lock()
		r.metrics[m[1]] = strings.Join(labels, ",")
		r.mu.Unlock()
	}
	return r.Registry.Register(c)
}

func (r *descRecorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

// The metric catalogue (docs/metrics.md) lists exactly what the roles
// register: every jetmail_ metric, with its labels (the controller's
// cluster gauges included).
func TestMetricsCatalogueMatchesWhatTheRolesRegister(t *testing.T) {
	ns := natstest.Start(t, natstest.Options{})
	nc := natstest.Connect(t, ns, spool.NATSOptions()...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := spool.DefaultConfig()
	sp, err := spool.Open(ctx, nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	src := policy.NewSource(&policy.Config{Relay: policy.Default(), Delivery: policy.DefaultDelivery()}, 1)
	reg := &descRecorder{Registry: prometheus.NewRegistry(), metrics: map[string]string{}}

	smtpgw.New(smtpgw.Config{Hostname: "gw.test"}, sp, src, zap.NewNop(), reg)
	if _, err := deliverer.New(deliverer.Config{Hostname: "dl.test", Spool: sp, Source: src,
		Resolver: &deliverer.Resolver{}, Client: &outbound.Client{}, Registerer: reg, Log: zap.NewNop()}); err != nil {
		t.Fatal(err)
	}
	// The event log every role that writes events runs.
	evl := events.New(events.Config{JetStream: sp.JetStream(), Pod: "pod", Registerer: reg})
	defer evl.Close(ctx)
	hctx, stop := context.WithCancel(ctx)
	defer stop()
	heartbeat(hctx, src, nil, "pod", "gateway", reg, zap.NewNop())
	natsConnected(reg, nc)
	// The controller's: the cluster gauges of the leader.
	reg.MustRegister(controllers.NewClusterMetrics(nc, 0))

	doc, err := os.ReadFile("../../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]string{}
	row := regexp.MustCompile("^\\| `(jetmail_[a-z_]+)` \\| [a-z]+ \\|([^|]*)\\|")
	for _, line := range strings.Split(string(doc), "\n") {
		m := row.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		labels := strings.Fields(strings.NewReplacer("`", " ", ",", " ").Replace(m[2]))
		slices.Sort(labels)
		documented[m[1]] = strings.Join(labels, ",")
	}
	for name, labels := range reg.metrics {
		if !strings.HasPrefix(name, "jetmail_") {
			continue
		}
		doc, ok := documented[name]
		switch {
		case !ok:
			t.Errorf("%s{%s} is registered but missing from docs/metrics.md", name, labels)
		case doc != labels:
			t.Errorf("%s: docs/metrics.md says labels {%s}, the code has {%s}", name, doc, labels)
		}
	}
	for name := range documented {
		if _, ok := reg.metrics[name]; !ok {
			t.Errorf("%s is in docs/metrics.md but no role registers it", name)
		}
	}
	if len(documented) < 20 {
		t.Fatalf("read only %d rows from docs/metrics.md; the table's format changed?", len(documented))
	}
}
