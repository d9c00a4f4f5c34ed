package deliverer

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/jetmail/jetmail/deliverer/failure"
)

type metrics struct {
	attempts         *prometheus.CounterVec
	latency          prometheus.Histogram
	sessionsOpen     *prometheus.GaugeVec
	notifications    *prometheus.CounterVec
	expired          prometheus.Counter
	destinationBusy  prometheus.Counter
	suspended        prometheus.Counter
	parked           prometheus.Counter
	woken            *prometheus.CounterVec
	wakerLeader      prometheus.Gauge
	wakerPasses      prometheus.Histogram
	destinationsDown prometheus.Gauge
	deadlineKills    prometheus.Counter
	queueMessages    prometheus.Gauge
	queueOldestAge   prometheus.Gauge
	recordRetries    prometheus.Counter
	deferrals        *prometheus.CounterVec
	tls              *prometheus.CounterVec
	stsFetches       *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_delivery_attempts_total",
			Help: "Delivery attempts per recipient, by result: delivered, deferred, failed (spool.RcptStatus).",
		}, []string{"result"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "jetmail_delivery_latency_seconds",
			Help:    "Time from arrival to successful delivery, per recipient.",
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 12),
		}),
		sessionsOpen: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "jetmail_delivery_sessions_open",
			Help: "Outbound SMTP sessions in progress, per destination (domain or route).",
		}, []string{"destination"}),
		notifications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_delivery_notifications_total",
			Help: "Delivery status notifications queued, by kind: failed, delayed, success.",
		}, []string{"kind"}),
		expired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_delivery_expired_total",
			Help: "Messages whose queue lifetime ran out.",
		}),
		destinationBusy: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_delivery_destination_busy_total",
			Help: "Attempts postponed because their destination had no free session slot.",
		}),
		parked: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_delivery_parked_total",
			Help: "Deferred messages parked until due (out of the consumer; the waker hands them out again).",
		}),
		woken: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_delivery_woken_total",
			Help: "Parked messages handed out again by the waker: due (their retry time came), probe (one message of a destination that is down), deadline (their queue lifetime ended, or a delay warning was due, while it was down).",
		}, []string{"kind"}),
		wakerLeader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "jetmail_delivery_waker_leader",
			Help: "1 while this deliverer holds the waker lease.",
		}),
		wakerPasses: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "jetmail_delivery_waker_pass_seconds",
			Help:    "Walks of every delivery state's headers by the waker (when parked mail is due, at least every 10 minutes), by how long each took: their count and length grow with the parked mail.",
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 10),
		}),
		suspended: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_delivery_suspended_total",
			Help: "Recipients deferred without a connection because their destination was found down (deadDestinationTime).",
		}),
		destinationsDown: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "jetmail_delivery_destinations_down",
			Help: "Destinations this deliverer is leaving alone because every next hop failed.",
		}),
		deadlineKills: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_delivery_deadline_kills_total",
			Help: "Outbound sessions cut off by the hard session deadline or the minimum data rate.",
		}),
		queueMessages: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "jetmail_queue_messages",
			Help: "Messages in the queue (waiting, in delivery, or deferred).",
		}),
		queueOldestAge: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "jetmail_queue_oldest_message_age_seconds",
			Help: "Age of the oldest message not yet acknowledged.",
		}),
		recordRetries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "jetmail_delivery_record_retries_total",
			Help: "Tries at recording a delivery outcome that failed and were made again (NATS stalled or a stream leader changed).",
		}),
		deferrals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_delivery_deferrals_total",
			Help: "Recipients deferred, by class of the failure: dns, connect, tls, timeout, deadline, reply (a 4xx reply of the remote), suspended (destination down), other.",
		}, []string{"class"}),
		tls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_delivery_tls_total",
			Help: "New outbound sessions and next hops refused before connecting, by the TLS policy that applied (TLS-RPT policy types: tlsa for DANE, sts for MTA-STS, no-policy-found), whether it was enforced (false: MTA-STS testing, or opportunistic TLS), and the TLS-RPT result type (RFC 8460 §4.3: success, starttls-not-supported, certificate-host-mismatch, certificate-expired, certificate-not-trusted, validation-failure, tlsa-invalid, dnssec-invalid).",
		}, []string{"policy", "enforced", "result"}),
		stsFetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_delivery_mtasts_fetches_total",
			Help: "MTA-STS policy fetches, by result: success, or the TLS-RPT result type of the failure (sts-policy-fetch-error, sts-policy-invalid, sts-webpki-invalid).",
		}, []string{"result"}),
	}
	for _, c := range deferralClasses {
		m.deferrals.WithLabelValues(c)
	}
	if reg != nil {
		reg.MustRegister(m.deferrals, m.tls, m.stsFetches)
		reg.MustRegister(m.attempts, m.latency, m.sessionsOpen, m.notifications, m.expired, m.destinationBusy, m.suspended, m.parked, m.woken, m.wakerLeader, m.wakerPasses, m.destinationsDown, m.deadlineKills, m.queueMessages, m.queueOldestAge, m.recordRetries)
	}
	return m
}

// deferralClasses are the values of jetmail_delivery_deferrals_total's
// class label: a fixed few, whatever the failures.
var deferralClasses = []string{"dns", "connect", "tls", "timeout", "deadline", "reply", "suspended", "other"}

// deferralClass sorts a temporary failure into one of deferralClasses, by
// its reason, whether a remote server gave it, and its RFC 3463 code (the
// ones package outbound and package resolve give local failures).
func deferralClass(e *failure.Error) string {
	switch {
	case e == nil:
		return "other"
	case e.Reason == failure.Suspended:
		return "suspended"
	case e.Reason == failure.DeadlineKill:
		return "deadline"
	case e.Remote != "":
		return "reply"
	}
	switch {
	case e.Enhanced == "4.4.3", e.Enhanced == "4.4.4":
		// DNS lookups that failed, and no usable next hop found.
		return "dns"
	case e.Enhanced == "4.4.1":
		return "connect"
	case e.Enhanced == "4.4.2":
		// A timeout, or the connection lost during the session.
		return "timeout"
	case strings.HasPrefix(e.Enhanced, "4.7."):
		return "tls"
	}
	return "other"
}
