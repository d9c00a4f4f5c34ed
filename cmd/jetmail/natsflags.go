package main

import (
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"github.com/jetmail/jetmail/spool"
)

// natsFlags say where NATS is and how to sign in, the same for every role.
type natsFlags struct {
	url   string
	nkey  string
	creds string
}

func (n *natsFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&n.url, "nats-url", "nats://127.0.0.1:4222", "NATS server URL(s), comma separated; user:password@ in a URL signs in with a password")
	fl.StringVar(&n.nkey, "nats-nkey", "", "sign in to NATS with the NKEY seed in this file (jetmail serve writes one to <data-dir>/"+spool.EmbeddedKeyFile+")")
	fl.StringVar(&n.creds, "nats-creds", "", "sign in to NATS with this credentials file (JWT and NKEY seed, NATS decentralized auth)")
}

// connect signs in to NATS as name.
func (n *natsFlags) connect(name string) (*nats.Conn, error) {
	opts, err := natsAuth(n.nkey, n.creds)
	if err != nil {
		return nil, err
	}
	// A server not up yet is not a reason to exit: the connection keeps
	// trying, and the role waits for it (untilUp), unready meanwhile.
	opts = append(opts, nats.Name(name), nats.RetryOnFailedConnect(true))
	nc, err := nats.Connect(n.url, append(spool.NATSOptions(), opts...)...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w", n.url, err)
	}
	return nc, nil
}

// natsAuth turns the sign-in flags into connection options.
func natsAuth(nkey, creds string) ([]nats.Option, error) {
	var opts []nats.Option
	if nkey != "" && creds != "" {
		return nil, fmt.Errorf("--nats-nkey and --nats-creds are alternatives; give one")
	}
	if nkey != "" {
		o, err := nats.NkeyOptionFromSeed(nkey)
		if err != nil {
			return nil, fmt.Errorf("--nats-nkey: %w", err)
		}
		opts = append(opts, o)
	}
	if creds != "" {
		opts = append(opts, nats.UserCredentials(creds))
	}
	return opts, nil
}

// natsConnected exports whether nc is connected to a NATS server now
// (jetmail_nats_connected): 0 while the client reconnects, which is when
// a gateway answers 451 and neither role is ready.
func natsConnected(reg prometheus.Registerer, nc *nats.Conn) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "jetmail_nats_connected",
		Help: "1 while this process is connected to a NATS server, 0 while it is not (reconnecting).",
	}, func() float64 {
		if nc.IsConnected() {
			return 1
		}
		return 0
	}), prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "jetmail_nats_received_bytes_total",
		Help: "Octets this process received over its NATS connection: everything it read from JetStream (records, bodies, states), acknowledgements and watches included.",
	}, func() float64 { return float64(nc.Stats().InBytes) }), prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "jetmail_nats_received_messages_total",
		Help: "Messages this process received over its NATS connection.",
	}, func() float64 { return float64(nc.Stats().InMsgs) }))
}
