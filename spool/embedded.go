package spool

import (
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// EmbeddedOptions configure the in-process NATS server of `jetmail serve`.
type EmbeddedOptions struct {
	// DataDir holds the JetStream store; it survives restarts.
	DataDir string
	// Listen is host:port for NATS clients (the queue tools, extra
	// deliverers). Empty means no TCP listener: in-process clients only.
	Listen string
	// NoSync relaxes fsync-before-ack (sync_interval: always) to the NATS
	// default of a periodic flush. Faster, and a power loss can lose the
	// last seconds of accepted mail.
	NoSync bool
}

// RunEmbedded starts a NATS server with JetStream in this process and waits
// until it accepts connections.
func RunEmbedded(o EmbeddedOptions) (*server.Server, error) {
	opts := &server.Options{
		ServerName: "jetmail-embedded",
		JetStream:  true,
		StoreDir:   o.DataDir,
		// Every stored message is fsynced before it is acknowledged: the
		// promise qmail and Postfix make for an accepted message.
		SyncAlways: !o.NoSync,
		NoSigs:     true,
		DontListen: o.Listen == "",
	}
	if o.Listen != "" {
		host, port, err := net.SplitHostPort(o.Listen)
		if err != nil {
			return nil, fmt.Errorf("nats listen address %q: %w", o.Listen, err)
		}
		p, err := strconv.Atoi(port)
		if err != nil {
			return nil, fmt.Errorf("nats listen port %q: %w", port, err)
		}
		if p == 0 {
			p = server.RANDOM_PORT
		}
		opts.Host, opts.Port = host, p
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, err
	}
	go s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded NATS server did not start within 30s")
	}
	return s, nil
}
