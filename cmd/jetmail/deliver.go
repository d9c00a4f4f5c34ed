package main

import (
	"context"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/deliverer"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// delivererFlags are the flags of every role that delivers.
type delivererFlags struct {
	dns         []string
	dnssec      bool
	maxInFlight int
	ackWait     time.Duration
	grace       time.Duration
	parkAfter   time.Duration
}

func (f *delivererFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringSliceVar(&f.dns, "dns", nil, "DNS resolvers host:port for MX lookups (default: /etc/resolv.conf)")
	fl.BoolVar(&f.dnssec, "dnssec", false, "every --dns resolver validates DNSSEC: trust the AD bit of their answers, which DANE needs (Postfix's smtp_dns_support_level = dnssec); set it only when each of them validates and is reached over a trusted path, such as one on the node: one that does not validate would turn DANE off for the answers it gives")
	fl.IntVar(&f.maxInFlight, "max-in-flight", 200, "messages one deliverer works on at once")
	fl.DurationVar(&f.ackWait, "ack-wait", 30*time.Second, "how long a message stays with a deliverer that gives no news (in-progress signals every quarter of it extend it); also the longest a message handed to a pull lost with a NATS server waits")
	fl.DurationVar(&f.grace, "delivery-grace", 30*time.Second, "on SIGTERM, time for delivery attempts in flight to finish")
	fl.DurationVar(&f.parkAfter, "park-after", time.Minute, "shortest retry wait that parks a deferred message out of the consumer until it is due (mail for a destination found down is always parked); negative: never park")
}

// runDeliverer delivers until ctx ends.
func runDeliverer(ctx context.Context, f *delivererFlags, hostname string, sp *spool.Spool, src *policy.Source, evl *events.Log, reg prometheus.Registerer, log *zap.Logger) error {
	// Every outbound setting, messagesPerConnection included, comes from
	// src.Delivery() at each attempt (Config.Source), so a DeliveryPolicy
	// change applies without a restart: the Client holds none of them.
	client := &outbound.Client{Hostname: hostname}
	defer client.Close()
	d, err := deliverer.New(deliverer.Config{
		Hostname:    hostname,
		Spool:       sp,
		Source:      src,
		Resolver:    &deliverer.Resolver{Servers: f.dns, DNSSEC: f.dnssec},
		Client:      client,
		Log:         log.Named("deliver"),
		Registerer:  reg,
		Events:      evl,
		MaxInFlight: f.maxInFlight,
		AckWait:     f.ackWait,
		Grace:       f.grace,
		ParkAfter:   f.parkAfter,
	})
	if err != nil {
		return err
	}
	log.Info("deliverer running", zap.Strings("delivery", src.Delivery().Sources), zap.Strings("dns", f.dns), zap.Bool("dnssec", f.dnssec))
	return d.Run(ctx)
}

func delivererCmd() *cobra.Command {
	var (
		df          delivererFlags
		nf          natsFlags
		ef          eventFlags
		replicas    int
		hostname    string
		configPaths []string
		metrics     string
		logFormat   string
		podName     string
	)
	cmd := &cobra.Command{
		Use:   "deliverer",
		Short: "Deliver queued mail from an external NATS JetStream cluster",
		Long: `deliverer consumes the queue through a durable pull consumer shared by every
replica, so more replicas deliver more. A replica killed mid-delivery loses
nothing: the message comes back to another one.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logFormat)
			if err != nil {
				return err
			}
			defer log.Sync()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			nc, err := nf.connect("jetmail-deliverer")
			if err != nil {
				return err
			}
			defer nc.Close()
			cfg := spool.ClusterConfig()
			cfg.Replicas = replicas
			reg := newRegistry()
			natsConnected(reg, nc)
			var ready readiness
			if err := serveMetrics(ctx, metrics, reg, ready.check, log); err != nil {
				return err
			}
			sp, err := untilUp(ctx, log, "opening the queue", func(ctx context.Context) (*spool.Spool, error) {
				return spool.Open(ctx, nc, cfg)
			})
			if err != nil {
				return err
			}
			src, err := openConfig(ctx, configPaths, sp, podName, "deliverer", reg, log)
			if err != nil {
				return err
			}
			evl := openEventLog(ctx, &ef, sp, podName, reg, log)
			defer closeEventLog(evl)
			ready.sp.Store(sp)
			return runDeliverer(ctx, &df, hostname, sp, src, evl, reg, log)
		},
	}
	df.register(cmd)
	fl := cmd.Flags()
	nf.register(fl)
	ef.register(fl)
	fl.IntVar(&replicas, "replicas", 3, "JetStream replicas for the queue streams")
	fl.StringVar(&hostname, "hostname", defaultHostname(), "our name in EHLO and delivery status notifications")
	fl.StringArrayVarP(&configPaths, "file", "f", nil, "configuration file or folder (MailRoute, DeliveryPolicy, Secret); repeatable")
	fl.StringVar(&metrics, "metrics-listen", "127.0.0.1:9091", "address for /metrics, /healthz and /readyz (empty: off)")
	fl.StringVar(&logFormat, "log-format", "json", "log format: console or json")
	fl.StringVar(&podName, "pod-name", envOr("POD_NAME", defaultHostname()), "name this pod reports its configuration revision under")
	return cmd
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func defaultHostname() string {
	h, _ := osHostname()
	return strings.ToLower(h)
}
