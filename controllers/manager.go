package controllers

import (
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/policy"
)

// LeaderElectionID names the Lease the controller replicas compete for.
const LeaderElectionID = "jetmail-controller"

// ManagerOptions configure the manager `jetmail controller` runs.
type ManagerOptions struct {
	// Namespace limits the watched objects, and holds the leader Lease;
	// "" watches every namespace (the Lease then needs LeaseNamespace, or
	// the in-cluster namespace).
	Namespace string
	// LeaseNamespace overrides where the Lease lives; "" means Namespace.
	LeaseNamespace string
	// LeaderElect makes replicas elect a leader, so only one reconciles.
	LeaderElect bool
	// LeaseDuration, RenewDeadline and RetryPeriod tune the election;
	// zero means controller-runtime's defaults (15s, 10s, 2s).
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// MetricsAddr and ProbeAddr are the listen addresses of the metrics
	// and health endpoints; "0" disables one.
	MetricsAddr, ProbeAddr string
	// ReadyPoll is passed to the reconciler (see ConfigReconciler).
	ReadyPoll time.Duration
	// SkipNameValidation allows several managers in one process (tests).
	SkipNameValidation bool
	// NATS, when set, adds the cluster gauges (ClusterMetrics), read
	// from the queue on this connection by the leader every
	// ClusterMetricsEvery (0: DefaultClusterMetricsEvery).
	NATS                *nats.Conn
	ClusterMetricsEvery time.Duration
	// Registerer takes the cluster gauges; nil is controller-runtime's
	// registry, the one its metrics endpoint serves.
	Registerer prometheus.Registerer
}

// NewManager returns a manager running the configuration reconciler
// against store, with leader election as o says. The leader gives up its
// Lease as soon as its context ends, so a rolling update hands over
// without waiting for the Lease to run out: the process must stop
// reconciling when Start returns, which `jetmail controller` does by
// exiting.
func NewManager(cfg *rest.Config, store *policy.Store, o ManagerOptions) (ctrl.Manager, error) {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	leaseNS := o.LeaseNamespace
	if leaseNS == "" {
		leaseNS = o.Namespace
	}
	opts := ctrl.Options{
		Scheme:                        scheme,
		Metrics:                       metricsserver.Options{BindAddress: o.MetricsAddr},
		HealthProbeBindAddress:        o.ProbeAddr,
		LeaderElection:                o.LeaderElect,
		LeaderElectionID:              LeaderElectionID,
		LeaderElectionNamespace:       leaseNS,
		LeaderElectionReleaseOnCancel: true,
	}
	if o.ProbeAddr == "0" {
		opts.HealthProbeBindAddress = ""
	}
	for _, d := range []struct {
		v   time.Duration
		dst **time.Duration
	}{{o.LeaseDuration, &opts.LeaseDuration}, {o.RenewDeadline, &opts.RenewDeadline}, {o.RetryPeriod, &opts.RetryPeriod}} {
		if d.v > 0 {
			*d.dst = &d.v
		}
	}
	if o.SkipNameValidation {
		skip := true
		opts.Controller = config.Controller{SkipNameValidation: &skip}
	}
	if o.Namespace != "" {
		opts.Cache = cache.Options{DefaultNamespaces: map[string]cache.Config{o.Namespace: {}}}
	}
	mgr, err := ctrl.NewManager(cfg, opts)
	if err != nil {
		return nil, err
	}
	r := &ConfigReconciler{Client: mgr.GetClient(), Store: store, Recorder: mgr.GetEventRecorder(LeaderElectionID),
		Namespace: o.Namespace, ReadyPoll: o.ReadyPoll}
	if err := r.SetupWithManager(mgr); err != nil {
		return nil, err
	}
	if o.NATS != nil {
		cm := NewClusterMetrics(o.NATS, o.ClusterMetricsEvery)
		reg := o.Registerer
		if reg == nil {
			reg = ctrlmetrics.Registry
		}
		if err := reg.Register(cm); err != nil {
			return nil, err
		}
		if err := mgr.Add(cm); err != nil {
			return nil, err
		}
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return nil, err
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return nil, err
	}
	return mgr, nil
}
