package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/smtpgw"
	"github.com/jetmail/jetmail/spool"
)

func serveCmd() *cobra.Command {
	var (
		f          gatewayFlags
		df         delivererFlags
		ef         eventFlags
		dataDir    string
		natsListen string
		noSync     bool
		relayhost  string
		noDeliver  bool
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run everything in one process on an embedded JetStream server",
		Long: `serve runs the SMTP gateway and the deliverer on an embedded NATS JetStream
server whose store lives in --data-dir and survives restarts. Every accepted
message is fsynced before the 250 reply unless --no-sync is given. With no
RelayPolicy, clients on loopback may relay and nobody else may send anywhere.
Files given with -f are re-read when they change.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(f.logFormat)
			if err != nil {
				return err
			}
			defer log.Sync()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()

			// Only serve reads the files that objects name: its
			// operator wrote them, on this host.
			src, err := openFiles(ctx, f.configPaths, policy.CompileOptions{Relayhost: relayhost, AllowFiles: true}, log)
			if err != nil {
				return err
			}
			gwCfg, err := f.gatewayConfig(log, true)
			if err != nil {
				return err
			}
			smtpL, err := f.listenSMTP()
			if err != nil {
				return err
			}
			defer smtpL.Close()
			if err := os.MkdirAll(dataDir, 0o750); err != nil {
				return err
			}
			// The embedded server lets in only the holder of the key in
			// the data directory: this process, and the tools and extra
			// processes on this host that read it.
			keyFile, userKey, err := spool.LoadOrCreateUserKey(dataDir)
			if err != nil {
				return err
			}
			ns, err := spool.RunEmbedded(spool.EmbeddedOptions{DataDir: dataDir, Listen: natsListen, NoSync: noSync, UserKey: userKey})
			if err != nil {
				return err
			}
			defer ns.Shutdown()
			log.Info("embedded JetStream started", zap.String("data_dir", dataDir),
				zap.Bool("fsync_before_ack", !noSync), zap.String("nats_listen", natsListen), zap.String("nats_nkey", keyFile))
			auth, err := natsAuth(keyFile, "")
			if err != nil {
				return err
			}
			nc, err := nats.Connect("", append(append(spool.NATSOptions(), nats.InProcessServer(ns), nats.Name("jetmail-serve")), auth...)...)
			if err != nil {
				return err
			}
			defer nc.Close()
			sp, err := spool.Open(ctx, nc, f.spoolConfig(spool.DefaultConfig()))
			if err != nil {
				return err
			}
			reg := newRegistry()
			natsConnected(reg, nc)
			if err := serveMetrics(ctx, f.metricsListen, reg, sp.Ping, log); err != nil {
				return err
			}
			evl := openEventLog(ctx, &ef, sp, f.hostname, reg, log)
			defer closeEventLog(evl)
			gwCfg.Events = evl
			go heartbeat(ctx, src, nil, f.hostname, "serve", reg, log)
			delivered := make(chan error, 1)
			if noDeliver {
				delivered <- nil
			} else {
				go func() { delivered <- runDeliverer(ctx, &df, f.hostname, sp, src, evl, reg, log) }()
			}
			err = runGateway(ctx, &f, smtpL, sp, src, gwCfg, reg, log)
			if derr := <-delivered; err == nil {
				err = derr
			}
			return err
		},
	}
	f.register(cmd, "console")
	df.register(cmd)
	ef.register(cmd.Flags())
	cmd.Flags().StringVar(&relayhost, "relayhost", "", "send all mail to this host:port (Postfix relayhost): a catch-all MailRoute")
	cmd.Flags().BoolVar(&noDeliver, "no-deliver", false, "only accept and queue; run no deliverer")
	cmd.Flags().StringVar(&dataDir, "data-dir", "./jetmail-data", "where the embedded JetStream keeps the queue")
	cmd.Flags().StringVar(&natsListen, "nats-listen", "127.0.0.1:4222", "NATS client address of the embedded server (empty: in-process only)")
	cmd.Flags().BoolVar(&noSync, "no-sync", false, "do not fsync before acknowledging (faster; a power loss can lose recently accepted mail)")
	return cmd
}

func gatewayCmd() *cobra.Command {
	var (
		f        gatewayFlags
		nf       natsFlags
		ef       eventFlags
		replicas int
		podName  string
	)
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "Run the SMTP ingress against an external NATS JetStream cluster",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(f.logFormat)
			if err != nil {
				return err
			}
			defer log.Sync()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			gwCfg, err := f.gatewayConfig(log, false)
			if err != nil {
				return err
			}
			smtpL, err := f.listenSMTP()
			if err != nil {
				return err
			}
			defer smtpL.Close()
			// Until JetStream answers, the port answers 421.
			standby := smtpgw.NewStandby(smtpL, gwCfg.Hostname)
			nc, err := nf.connect("jetmail-gateway")
			if err != nil {
				return err
			}
			defer nc.Close()
			cfg := f.spoolConfig(spool.ClusterConfig())
			cfg.Replicas = replicas
			reg := newRegistry()
			natsConnected(reg, nc)
			var ready readiness
			if err := serveMetrics(ctx, f.metricsListen, reg, ready.check, log); err != nil {
				return err
			}
			sp, err := untilUp(ctx, log, "opening the queue", func(ctx context.Context) (*spool.Spool, error) {
				return spool.Open(ctx, nc, cfg)
			})
			if err != nil {
				return err
			}
			src, err := openConfig(ctx, f.configPaths, sp, podName, "gateway", reg, log)
			if err != nil {
				return err
			}
			evl := openEventLog(ctx, &ef, sp, podName, reg, log)
			defer closeEventLog(evl)
			gwCfg.Events = evl
			ready.sp.Store(sp)
			standby.Ready()
			return runGateway(ctx, &f, standby.Listener(), sp, src, gwCfg, reg, log)
		},
	}
	f.register(cmd, "json")
	nf.register(cmd.Flags())
	ef.register(cmd.Flags())
	cmd.Flags().IntVar(&replicas, "replicas", 3, "JetStream replicas for the queue streams")
	cmd.Flags().StringVar(&podName, "pod-name", envOr("POD_NAME", defaultHostname()), "name this pod reports its configuration revision under")
	return cmd
}
