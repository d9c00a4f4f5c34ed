package deliverer

import (
	"errors"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/deliverer/mtasts"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/deliverer/resolve"
	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// Resolver finds the next hops of a recipient domain: the caching MX
// resolver of package resolve, named here so that a Deliverer is set up
// from this package alone.
type Resolver = resolve.Resolver

// Config sets up a Deliverer.
type Config struct {
	// Hostname is our name in EHLO, DSNs and logs.
	Hostname string
	Spool    *spool.Spool
	// Source holds the configuration in force. Its Delivery() is read
	// once per attempt, and that attempt runs on it throughout, so every
	// DeliveryPolicy and MailRoute setting applies to the next attempt
	// without a restart.
	Source   *policy.Source
	Resolver *Resolver
	Client   *outbound.Client
	Log      *zap.Logger
	// Registerer receives the metrics; nil means none.
	Registerer prometheus.Registerer
	// Events receives an event per recipient result, expiry and notice
	// queued; nil: none.
	Events *events.Log
	// MaxInFlight bounds the messages this process works on at once
	// (including those waiting for a destination slot). Default 200.
	MaxInFlight int
	// AckWait is how long a message handed to this process stays ours
	// without news; in-progress signals extend it during long sessions, and
	// a process killed mid-delivery gives the message back to another
	// replica when it runs out. It is short by design: a message handed to
	// a pull whose reply was lost (a NATS server died) waits this long.
	// Default 30s.
	AckWait time.Duration
	// MaxWaiting bounds the messages waiting for a retry, cluster-wide
	// (the consumer's MaxAckPending). Default 1,000,000.
	MaxWaiting int
	// Grace is how long in-flight attempts may run after Run's context
	// ends. Default 30s.
	Grace time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// SweepEvery is how often orphan message bodies are looked for (see
	// spool.SweepBodies); default 1h, negative: never.
	SweepEvery time.Duration
	// ParkAfter is the shortest retry wait that parks a deferred message
	// (spool/park.go) instead of leaving it in the consumer: mail whose
	// destination is down is always parked. Default 1m; negative: never
	// park (and no waker).
	ParkAfter time.Duration
	// OrphanAge is how old an unreferenced body must be to be deleted; it
	// must exceed the gateways' session deadline. Default 24h.
	OrphanAge time.Duration
	// STS fetches MTA-STS policies; nil: one that trusts the Client's
	// RootCAs and resolves the policy host with Resolver.
	STS *mtasts.Fetcher
}

// Deliverer consumes the queue and delivers.
type Deliverer struct {
	cfg     Config
	log     *zap.Logger
	metrics *metrics

	mu      sync.Mutex
	perDest map[string]int
	// destWaiting counts workers waiting for a slot of a destination,
	// destFree wakes one of them when a slot frees up.
	destWaiting map[string]int
	destFree    map[string]chan struct{}
	sessions    int
	slotFree    chan struct{} // signalled when a session slot frees up
	// dead remembers destinations whose every next hop just failed.
	dead map[string]*deadDest
	// sts finds recipient domains' MTA-STS policies; Run gives it the
	// cluster's cache.
	sts *mtasts.Policies
}

// New checks cfg and returns a Deliverer.
func New(cfg Config) (*Deliverer, error) {
	if cfg.Spool == nil || cfg.Source == nil || cfg.Resolver == nil || cfg.Client == nil {
		return nil, errors.New("deliverer: Spool, Source, Resolver and Client are required")
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 200
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 30 * time.Second
	}
	if cfg.MaxWaiting <= 0 {
		cfg.MaxWaiting = 1_000_000
	}
	if cfg.Grace <= 0 {
		cfg.Grace = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.SweepEvery == 0 {
		cfg.SweepEvery = time.Hour
	}
	if cfg.ParkAfter == 0 {
		cfg.ParkAfter = time.Minute
	}
	if cfg.OrphanAge <= 0 {
		cfg.OrphanAge = 24 * time.Hour
	}
	if cfg.Hostname == "" {
		cfg.Hostname = "localhost"
	}
	if cfg.Resolver.IsLocal == nil {
		cfg.Resolver.IsLocal = func(host string, addr netip.Addr) bool { return cfg.Source.Delivery().IsLocal(host, addr) }
	}
	d := &Deliverer{cfg: cfg, log: cfg.Log, metrics: newMetrics(cfg.Registerer),
		perDest: map[string]int{}, destWaiting: map[string]int{}, destFree: map[string]chan struct{}{},
		slotFree: make(chan struct{}, 1), dead: map[string]*deadDest{}}
	d.sts = newPolicies(&d.cfg, d.metrics)
	if cfg.Client.Report == nil {
		log := d.log
		cfg.Client.Report = func(r outbound.TLSReport) { d.reportTLS(log, r) }
	}
	return d, nil
}
