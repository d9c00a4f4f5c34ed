package main

import (
	"context"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	ctrl "sigs.k8s.io/controller-runtime"
	ctrlzap "sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/jetmail/jetmail/controllers"
	"github.com/jetmail/jetmail/policy"
)

func controllerCmd() *cobra.Command {
	var (
		nf          natsFlags
		replicas    int
		namespace   string
		leaderElect bool
		metrics     string
		probes      string
	)
	cmd := &cobra.Command{
		Use:   "controller",
		Short: "Reconcile RelayPolicy, MailRoute and DeliveryPolicy into the configuration the pods run",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctrl.SetLogger(ctrlzap.New())
			ctx := ctrl.SetupSignalHandler()
			nc, err := nf.connect("jetmail-controller")
			if err != nil {
				return err
			}
			defer nc.Close()
			js, err := jetstream.New(nc)
			if err != nil {
				return err
			}
			log, err := newLogger("json")
			if err != nil {
				return err
			}
			store, err := untilUp(ctx, log, "opening the configuration bucket", func(c context.Context) (*policy.Store, error) {
				return policy.OpenStore(c, js, replicas)
			})
			if err != nil {
				return err
			}
			mgr, err := controllers.NewManager(ctrl.GetConfigOrDie(), store, controllers.ManagerOptions{
				Namespace: namespace, LeaderElect: leaderElect, MetricsAddr: metrics, ProbeAddr: probes,
				// The leader exports the queue's figures once for the
				// cluster (jetmail_cluster_*).
				NATS: nc,
			})
			if err != nil {
				return err
			}
			zap.L().Info("controller starting")
			return mgr.Start(ctx)
		},
	}
	fl := cmd.Flags()
	nf.register(fl)
	fl.IntVar(&replicas, "replicas", 3, "JetStream replicas for the configuration buckets")
	fl.StringVar(&namespace, "namespace", "", "watch only this namespace (and hold the leader lease there); empty: all")
	fl.BoolVar(&leaderElect, "leader-elect", true, "elect a leader so replicas never fight")
	fl.StringVar(&metrics, "metrics-listen", ":8080", "controller metrics address")
	fl.StringVar(&probes, "health-listen", ":8081", "healthz/readyz address")
	return cmd
}
