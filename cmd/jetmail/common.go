package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/smtpgw"
	"github.com/jetmail/jetmail/spool"
)

// gatewayFlags are the flags every role that runs the SMTP ingress shares.
type gatewayFlags struct {
	smtpListen     string
	metricsListen  string
	configPaths    []string
	hostname       string
	tlsCert        string
	tlsKey         string
	proxyProtocol  bool
	dupWindow      time.Duration
	publishTimeout time.Duration
	groupCommit    int
	shutdownGrace  time.Duration
	maxLineLength  int
	maxQueueBytes  int64
	maxBodyBytes   int64
	logFormat      string
	auth           smtpgw.AuthLimits
}

func (f *gatewayFlags) register(cmd *cobra.Command, defaultLog string) {
	host, _ := os.Hostname()
	fl := cmd.Flags()
	fl.StringVar(&f.smtpListen, "smtp-listen", "127.0.0.1:2525", "SMTP listen address")
	fl.StringVar(&f.metricsListen, "metrics-listen", "127.0.0.1:9090", "address for /metrics, /healthz and /readyz (empty: off)")
	fl.StringArrayVarP(&f.configPaths, "file", "f", nil, "configuration file or folder of YAML objects (RelayPolicy, Secret); repeatable")
	fl.StringVar(&f.hostname, "hostname", host, "host name in the SMTP greeting and Received: headers")
	fl.StringVar(&f.tlsCert, "tls-cert", "", "PEM certificate for STARTTLS (reloaded when the file changes)")
	fl.StringVar(&f.tlsKey, "tls-key", "", "PEM private key for STARTTLS")
	fl.BoolVar(&f.proxyProtocol, "proxy-protocol", false, "require a PROXY protocol v1/v2 header on every SMTP connection")
	fl.DurationVar(&f.dupWindow, "duplicate-window", 24*time.Hour, "how long after delivery a retransmitted message is still recognised")
	fl.DurationVar(&f.publishTimeout, "publish-timeout", 10*time.Second, "bound on storing one message in JetStream before answering 451")
	fl.IntVar(&f.groupCommit, "group-commit", 64, "most queue records of concurrent sessions stored in one write, one fsync (1: each alone)")
	fl.DurationVar(&f.shutdownGrace, "shutdown-grace", 30*time.Second, "on SIGTERM, time for transactions in flight to finish")
	fl.IntVar(&f.maxLineLength, "max-line-length", 64<<10, "longest input line accepted (RFC 5321 limits are always accepted)")
	fl.Int64Var(&f.maxQueueBytes, "max-queue-bytes", -1, "cap on the queue stream (envelopes, inline bodies); when full, new mail gets 451 (-1: no cap)")
	fl.Int64Var(&f.maxBodyBytes, "max-body-bytes", -1, "cap on the stream of large bodies (-1: no cap)")
	fl.StringVar(&f.logFormat, "log-format", defaultLog, "log format: console or json")
	fl.IntVar(&f.auth.Failures, "auth-max-failures", 10, "failed SMTP AUTH attempts one client address may make per --auth-failure-window before it is locked out")
	fl.DurationVar(&f.auth.Window, "auth-failure-window", 15*time.Minute, "how long failed SMTP AUTH attempts are remembered per client address")
	fl.IntVar(&f.auth.Checks, "auth-max-checks", 0, "password checks (bcrypt) running at once (0: half the CPUs, at least 1)")
}

// untilUp runs open until it succeeds, or until ctx ends. A pod must never
// die of a transient NATS condition (a cluster still electing its leaders,
// a server restarting): it stays unready and tries again, backing off from
// a quarter second to ten seconds, and says why at each try.
func untilUp[T any](ctx context.Context, log *zap.Logger, what string, open func(context.Context) (T, error)) (T, error) {
	backoff := 250 * time.Millisecond
	for try := 1; ; try++ {
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		v, err := open(tctx)
		cancel()
		if err == nil {
			if try > 1 {
				log.Info(what+": done", zap.Int("tries", try))
			}
			return v, nil
		}
		if ctx.Err() != nil {
			return v, fmt.Errorf("%s: %w", what, err)
		}
		log.Warn(what+": not yet, trying again", zap.Int("try", try), zap.Duration("retry_in", backoff), zap.Error(err))
		select {
		case <-ctx.Done():
			return v, fmt.Errorf("%s: %w", what, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

// readiness backs /readyz of a role that opens its spool in the
// background: not ready until it is open, then ready while JetStream
// answers.
type readiness struct{ sp atomic.Pointer[spool.Spool] }

func (r *readiness) check(ctx context.Context) error {
	sp := r.sp.Load()
	if sp == nil {
		return errors.New("starting: JetStream has not answered yet")
	}
	return sp.Ping(ctx)
}

// osHostname is os.Hostname, named for the flags' defaults.
var osHostname = os.Hostname

func newLogger(format string) (*zap.Logger, error) {
	var cfg zap.Config
	switch format {
	case "json":
		cfg = zap.NewProductionConfig()
	case "console":
		cfg = zap.NewDevelopmentConfig()
		cfg.EncoderConfig.EncodeLevel = zapcore.CapitalColorLevelEncoder
		cfg.Development = false
		cfg.DisableStacktrace = true
		cfg.Level = zap.NewAtomicLevelAt(zap.InfoLevel)
	default:
		return nil, fmt.Errorf("unknown log format %q (console or json)", format)
	}
	// One line per transaction and per delivery attempt is a promise:
	// never sample log lines away.
	cfg.Sampling = nil
	cfg.EncoderConfig.TimeKey = "ts"
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	return cfg.Build()
}

// gatewayConfig is the gateway's fixed configuration from the flags, with
// STARTTLS from --tls-cert/--tls-key or, for serve, a self-signed pair.
func (f *gatewayFlags) gatewayConfig(log *zap.Logger, selfSignedFallback bool) (*smtpgw.Config, error) {
	cfg := &smtpgw.Config{
		Hostname:      f.hostname,
		ProxyProtocol: f.proxyProtocol,
		MaxLineLength: f.maxLineLength,
		ShutdownGrace: f.shutdownGrace,
		Auth:          f.auth,
	}
	switch {
	case f.tlsCert != "" || f.tlsKey != "":
		r, err := smtpgw.NewCertReloader(f.tlsCert, f.tlsKey, log)
		if err != nil {
			return nil, err
		}
		cfg.TLS = r.TLSConfig()
	case selfSignedFallback:
		t, err := smtpgw.SelfSigned(f.hostname)
		if err != nil {
			return nil, err
		}
		cfg.TLS = t
		log.Warn("no --tls-cert given: STARTTLS uses a generated self-signed certificate", zap.String("hostname", f.hostname))
	}
	return cfg, nil
}

func (f *gatewayFlags) spoolConfig(base spool.Config) spool.Config {
	base.DuplicateWindow = f.dupWindow
	base.PublishTimeout = f.publishTimeout
	base.GroupCommit = f.groupCommit
	base.MaxQueueBytes = f.maxQueueBytes
	base.MaxBodyBytes = f.maxBodyBytes
	return base
}

// serveMetrics runs /metrics, /healthz (the process runs) and /readyz
// (JetStream answers) until ctx ends.
func serveMetrics(ctx context.Context, addr string, reg *prometheus.Registry, ready func(context.Context) error, log *zap.Logger) error {
	if addr == "" {
		return nil
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	if os.Getenv("JETMAIL_PPROF") != "" {
		// Profiling on the metrics port, for diagnosis only; with the
		// block and mutex profiles (where goroutines wait), sampled.
		runtime.SetBlockProfileRate(int(time.Millisecond))
		runtime.SetMutexProfileFraction(100)
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		rctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := ready(rctx); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listener: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", zap.Error(err))
		}
	}()
	log.Info("metrics listening", zap.String("addr", l.Addr().String()))
	return nil
}

func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// listenSMTP opens the SMTP port first of all, so a port conflict fails at
// once and /readyz never says ready before the port takes connections.
func (f *gatewayFlags) listenSMTP() (net.Listener, error) {
	l, err := net.Listen("tcp", f.smtpListen)
	if err != nil {
		return nil, fmt.Errorf("SMTP listener: %w", err)
	}
	return l, nil
}

// runGateway serves SMTP on l under the relay policy of src until ctx
// ends, then shuts down gracefully.
func runGateway(ctx context.Context, f *gatewayFlags, l net.Listener, sp *spool.Spool, src *policy.Source, gwCfg *smtpgw.Config, reg *prometheus.Registry, log *zap.Logger) error {
	gw := smtpgw.New(*gwCfg, sp, src, log.Named("smtp"), reg)
	log.Info("SMTP listening", zap.String("addr", l.Addr().String()), zap.Strings("policy", src.Relay().Sources))
	errc := make(chan error, 1)
	go func() { errc <- gw.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down: no new connections, finishing transactions in flight", zap.Duration("grace", f.shutdownGrace))
	sctx, cancel := context.WithTimeout(context.Background(), f.shutdownGrace+10*time.Second)
	defer cancel()
	if err := gw.Shutdown(sctx); err != nil {
		log.Warn("shutdown grace period ran out, connections closed", zap.Error(err))
	}
	<-errc
	return nil
}
