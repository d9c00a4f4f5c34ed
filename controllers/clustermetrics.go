package controllers

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/jetmail/jetmail/spool"
)

// DefaultClusterMetricsEvery is how often the leader reads the queue's
// figures for the cluster gauges.
const DefaultClusterMetricsEvery = 15 * time.Second

// ClusterMetrics exports the queue's figures once for the whole cluster,
// from the elected controller replica: dashboards and autoscalers read one
// series instead of one per deliverer. It is a Prometheus collector and a
// controller-runtime Runnable that needs leader election, so it only runs
// on the leader.
//
// Every replica exports jetmail_cluster_leader (1 on the leader, 0
// elsewhere). The queue gauges are exported only while this replica leads
// and its last read of the queue is recent (three periods): a follower,
// a replica that lost the lead, or a leader that cannot reach JetStream
// exports no queue series at all rather than stale numbers.
//
// The figures come from spool.Stats: stream and consumer information and
// one direct read of the oldest unacknowledged record, never a scan of
// the messages, whatever the size of the queue.
type ClusterMetrics struct {
	nc    *nats.Conn
	every time.Duration
	now   func() time.Time

	mu     sync.Mutex
	leader bool
	st     *spool.QueueStats
	at     time.Time // when st was read

	leaderDesc, messages, oldestAge, bytes, states *prometheus.Desc
}

// NewClusterMetrics returns the cluster gauges read from the queue on nc
// every period (0: DefaultClusterMetricsEvery). Register it with a
// Prometheus registry and add it to the manager.
func NewClusterMetrics(nc *nats.Conn, every time.Duration) *ClusterMetrics {
	if every <= 0 {
		every = DefaultClusterMetricsEvery
	}
	return &ClusterMetrics{
		nc: nc, every: every, now: time.Now,
		leaderDesc: prometheus.NewDesc("jetmail_cluster_leader",
			"1 on the controller replica that holds the leader Lease and exports the jetmail_cluster_ gauges, 0 on the others.", nil, nil),
		messages: prometheus.NewDesc("jetmail_cluster_queue_messages",
			"Messages in the queue, cluster-wide, by state: new (not handed to a deliverer yet), active (in an attempt or due), deferred (waiting for a retry; an estimate from the delivery states), held.",
			[]string{"state"}, nil),
		oldestAge: prometheus.NewDesc("jetmail_cluster_queue_oldest_message_age_seconds",
			"Age of the oldest message not yet acknowledged by the deliverers, cluster-wide (0: the queue is empty).", nil, nil),
		bytes: prometheus.NewDesc("jetmail_cluster_queue_bytes",
			"Stored bytes of the queue streams: queue (envelopes, inline bodies, tombstones) and body (large bodies).",
			[]string{"stream"}, nil),
		states: prometheus.NewDesc("jetmail_cluster_delivery_states",
			"Records in the delivery-state bucket: mail whose attempt left recipients waiting, plus for a minute the cleared states of mail that left.",
			nil, nil),
	}
}

// NeedLeaderElection makes the manager run the gauges on the leader only.
func (c *ClusterMetrics) NeedLeaderElection() bool { return true }

// Start reads the queue every period until ctx ends (the manager stops,
// or the lead is lost), then stops exporting the queue gauges.
func (c *ClusterMetrics) Start(ctx context.Context) error {
	log := ctrl.Log.WithName("cluster-metrics")
	c.mu.Lock()
	c.leader = true
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.leader, c.st = false, nil
		c.mu.Unlock()
	}()
	var (
		sp     *spool.Spool
		logged string
	)
	t := time.NewTicker(c.every)
	defer t.Stop()
	for {
		var err error
		if sp == nil {
			// Read-only: the controller never creates the queue; until a
			// gateway has, there is nothing to export.
			sp, err = spool.Attach(ctx, c.nc)
		}
		if err == nil {
			var st *spool.QueueStats
			if st, err = sp.Stats(ctx); err == nil {
				c.mu.Lock()
				c.st, c.at = st, c.now()
				c.mu.Unlock()
				logged = ""
			}
		}
		if err != nil && ctx.Err() == nil && err.Error() != logged {
			// Once per distinct error, not every period.
			logged = err.Error()
			if errors.Is(err, spool.ErrNoQueue) {
				log.Info("no queue yet; the cluster queue gauges wait for it")
			} else {
				log.Error(err, "reading the queue for the cluster gauges")
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Describe implements prometheus.Collector.
func (c *ClusterMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.leaderDesc, c.messages, c.oldestAge, c.bytes, c.states} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *ClusterMetrics) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	leader, st, at := c.leader, c.st, c.at
	c.mu.Unlock()
	lead := 0.0
	if leader {
		lead = 1
	}
	ch <- prometheus.MustNewConstMetric(c.leaderDesc, prometheus.GaugeValue, lead)
	now := c.now()
	if !leader || st == nil || now.Sub(at) > 3*c.every {
		return
	}
	newMail, active, deferred, held := st.ByState()
	for _, s := range []struct {
		state string
		n     uint64
	}{{"new", newMail}, {"active", active}, {"deferred", deferred}, {"held", held}} {
		ch <- prometheus.MustNewConstMetric(c.messages, prometheus.GaugeValue, float64(s.n), s.state)
	}
	age := 0.0
	if t, ok := spool.QueueIDTime(st.Oldest); ok {
		age = max(0, now.Sub(t).Seconds())
	}
	ch <- prometheus.MustNewConstMetric(c.oldestAge, prometheus.GaugeValue, age)
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(st.QueueBytes), "queue")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(st.BodyBytes), "body")
	ch <- prometheus.MustNewConstMetric(c.states, prometheus.GaugeValue, float64(st.States))
}
