package smtpgw

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	connections          *prometheus.CounterVec
	connectionsOpen      prometheus.Gauge
	transactions         *prometheus.CounterVec
	receivedBytes        prometheus.Counter
	queuedMessageBytes   prometheus.Counter
	replies              *prometheus.CounterVec
	duplicatesSuppressed prometheus.Counter
	publishSeconds       prometheus.Histogram
	commitBatch          prometheus.Histogram
	deadlineKills        *prometheus.CounterVec
	auth                 *prometheus.CounterVec
	dkim                 *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_smtp_connections_total",
			Help: "SMTP connections by outcome of admission (accepted, or the limit that refused them).",
		}, []string{"result"}),
		connectionsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "jetmail_smtp_connections_open",
			Help: "SMTP connections currently open.",
		}),
		transactions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_smtp_transactions_total",
			Help: "Mail transactions that reached DATA, by result: queued, duplicate, rejected, tempfail, aborted.",
		}, []string{"result"}),
		receivedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_smtp_received_bytes_total",
			Help: "Octets read from SMTP clients (on the wire, TLS included).",
		}),
		queuedMessageBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_smtp_queued_message_bytes_total",
			Help: "Octets of message data queued.",
		}),
		replies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_smtp_replies_total",
			Help: "Replies to MAIL, RCPT, DATA and AUTH by reply code.",
		}, []string{"code"}),
		duplicatesSuppressed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_smtp_duplicates_suppressed_total",
			Help: "Retransmissions answered with the original queue ID instead of being queued again.",
		}),
		publishSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "jetmail_spool_publish_seconds",
			Help:    "Time from the final dot to JetStream's acknowledgement.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		commitBatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "jetmail_spool_commit_batch_records",
			Help:    "Per queued message: how many queue records were stored in the same write as its own (group commit; 1: alone).",
			Buckets: []float64{1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64},
		}),
		deadlineKills: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_smtp_deadline_kills_total",
			Help: "Sessions cut off by a hard deadline or the minimum data rate, by reason.",
		}, []string{"reason"}),
		auth: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_smtp_auth_total",
			Help: "SMTP AUTH attempts by result: success, failure (wrong credentials), locked (the client address used up its failures), busy (no password check slot).",
		}, []string{"result"}),
		dkim: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_smtp_dkim_total",
			Help: "Messages from relay clients and authenticated users while DKIMKeys exist, by signing result: signed, no_key (none for the From: domain), no_from (no single From: that parses), too_long (header section over 256 KiB, or no body), error.",
		}, []string{"result"}),
	}
	for _, r := range []string{"success", "failure", "locked", "busy"} {
		m.auth.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.connections, m.connectionsOpen, m.transactions, m.receivedBytes, m.queuedMessageBytes,
			m.replies, m.duplicatesSuppressed, m.publishSeconds, m.commitBatch, m.deadlineKills, m.auth, m.dkim)
	}
	return m
}
