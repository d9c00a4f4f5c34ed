// Package natstest runs real NATS JetStream servers in the test process, on
// loopback, with their stores in the test's temporary folders: one server,
// or a cluster of three for replicated streams. Every package whose tests
// need JetStream starts it here.
package natstest

import (
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/jetmail/jetmail/internal/freeport"
)

// Options of a test server. The zero value is a server on a free loopback
// port storing in a new temporary folder.
type Options struct {
	// Dir is the JetStream store; "" is a new temporary folder.
	Dir string
	// Port is the client port; 0 picks a free one.
	Port int
	// SyncAlways fsyncs every write before acknowledging it, as `jetmail
	// serve` does by default.
	SyncAlways bool
	// Configure changes the server options last (authorization, limits).
	Configure func(*server.Options)
}

// Start runs a server with JetStream until the test ends (stopping it
// earlier is harmless).
func Start(t testing.TB, o Options) *server.Server {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	if o.Port == 0 {
		o.Port = server.RANDOM_PORT
	}
	opts := &server.Options{Host: "127.0.0.1", Port: o.Port, JetStream: true, StoreDir: o.Dir,
		SyncAlways: o.SyncAlways, NoSigs: true, NoLog: true}
	if o.Configure != nil {
		o.Configure(opts)
	}
	return run(t, opts)
}

func run(t testing.TB, opts *server.Options) *server.Server {
	t.Helper()
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("new NATS server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatal("NATS server not ready within 10s")
	}
	t.Cleanup(func() { Stop(s) })
	return s
}

// Stop shuts s down and waits until its store is closed.
func Stop(s *server.Server) {
	s.Shutdown()
	s.WaitForShutdown()
}

// Connect opens a client connection to s, closed when the test ends.
func Connect(t testing.TB, s *server.Server, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL(), opts...)
	if err != nil {
		t.Fatalf("connect to NATS: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// Cluster is three JetStream servers routed to each other on loopback, so
// that streams and buckets can have three replicas.
type Cluster struct {
	Servers []*server.Server
	opts    []*server.Options
}

// StartCluster runs a cluster of three until the test ends and waits until
// it has elected its JetStream meta leader and that leader has current
// reports from all three servers (before that, a stream with three
// replicas cannot be placed).
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	const n = 3
	ports := freePorts(t, n)
	c := &Cluster{}
	for i := 0; i < n; i++ {
		opts := &server.Options{ServerName: fmt.Sprintf("n%d", i+1), Host: "127.0.0.1", Port: server.RANDOM_PORT,
			JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true}
		opts.Cluster.Name = "jetmail-test"
		opts.Cluster.Host = "127.0.0.1"
		opts.Cluster.Port = ports[i]
		for j := 0; j < n; j++ {
			if j != i {
				opts.Routes = append(opts.Routes, server.RoutesFromStr(fmt.Sprintf("nats://127.0.0.1:%d", ports[j]))...)
			}
		}
		c.opts = append(c.opts, opts)
	}
	// Servers wait for their routes before they report ready, so start
	// them all before waiting for any.
	for _, opts := range c.opts {
		s, err := server.NewServer(opts)
		if err != nil {
			t.Fatalf("new NATS server: %v", err)
		}
		go s.Start()
		c.Servers = append(c.Servers, s)
	}
	t.Cleanup(func() {
		for _, s := range c.Servers {
			Stop(s)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for _, s := range c.Servers {
		if !s.ReadyForConnections(time.Until(deadline)) {
			t.Fatal("NATS cluster not ready within 30s")
		}
	}
	for !c.formed() {
		if time.Now().After(deadline) {
			t.Fatal("NATS cluster did not form (a meta leader seeing three JetStream servers) within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c
}

func (c *Cluster) formed() bool {
	for _, s := range c.Servers {
		if s.Running() && s.JetStreamIsLeader() && len(s.JetStreamClusterPeers()) == len(c.Servers) {
			return true
		}
	}
	return false
}

// URL lists every server's client URL, for a client that fails over.
func (c *Cluster) URL() string {
	u := ""
	for i, s := range c.Servers {
		if i > 0 {
			u += ","
		}
		u += s.ClientURL()
	}
	return u
}

// Connect opens a client connection to the cluster, closed when the test
// ends.
func (c *Cluster) Connect(t testing.TB, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(c.URL(), opts...)
	if err != nil {
		t.Fatalf("connect to the NATS cluster: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// freePorts returns n distinct free loopback ports (freeport).
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	for i := range ports {
		ports[i] = freeport.Port(t)
	}
	return ports
}
