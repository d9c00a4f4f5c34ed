package spool

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Names of the JetStream resources of the queue. The configuration buckets
// (JETMAIL_CONFIG, JETMAIL_PODS) are policy's (policy.ConfigBucket).
const (
	QueueStream = "JETMAIL_QUEUE"
	BodyStream  = "JETMAIL_BODY"
	StateBucket = "JETMAIL_STATE"

	queuePrefix = "jetmail.queue."
	bodyPrefix  = "jetmail.body."
)

// Headers on stored messages.
const (
	// HeaderQueueID carries the queue ID on envelopes and tombstones, so the
	// winner of a duplicate race can be named without decoding the payload.
	HeaderQueueID = "Jetmail-Queue-Id"
	// HeaderTombstone marks an envelope replaced after the mail left the queue.
	HeaderTombstone = "Jetmail-Tombstone"
	// HeaderBodyID names the body an envelope refers to, so the body
	// sweeper can read the queue's headers alone.
	HeaderBodyID = "Jetmail-Body-Id"
)

// Config sets up the spool. The zero value is not useful; start from
// DefaultConfig or ClusterConfig.
type Config struct {
	// Replicas is the JetStream replication of every stream and bucket.
	Replicas int
	// Storage is file or memory.
	Storage jetstream.StorageType
	// MaxQueueBytes caps the queue stream (envelopes and inline bodies);
	// -1 means no cap beyond the server's own limits. When the cap is hit,
	// new mail is refused with a 4xx, nothing queued is dropped.
	MaxQueueBytes int64
	// MaxBodyBytes caps the body stream the same way.
	MaxBodyBytes int64
	// DuplicateWindow is how long after a mail left the queue a
	// retransmission of it is still recognised. Default 24h.
	DuplicateWindow time.Duration
	// PublishTimeout bounds one Commit, retries included. Default 10s.
	PublishTimeout time.Duration
	// ChunkSize is the size of body chunks for mail too large to travel
	// inline. Default 256 KiB.
	ChunkSize int
	// GroupCommit is the largest number of queue records of concurrent
	// Commits stored together in one write (group.go); 0 or 1 stores
	// each alone. Default 64.
	GroupCommit int
}

// DefaultConfig is the embedded, single-server default: one replica, file
// storage.
func DefaultConfig() Config {
	return Config{
		Replicas:        1,
		Storage:         jetstream.FileStorage,
		MaxQueueBytes:   -1,
		MaxBodyBytes:    -1,
		DuplicateWindow: 24 * time.Hour,
		PublishTimeout:  10 * time.Second,
		ChunkSize:       256 << 10,
		GroupCommit:     groupMax,
	}
}

// ClusterConfig is the default against an external NATS cluster: three
// replicas.
func ClusterConfig() Config {
	c := DefaultConfig()
	c.Replicas = 3
	return c
}

// Spool is a handle on the queue. It is safe for concurrent use.
type Spool struct {
	cfg    Config
	nc     *nats.Conn
	js     jetstream.JetStream
	queue  jetstream.Stream
	bodies jetstream.Stream
	state  jetstream.KeyValue
	// inlineMax is the largest body stored inline with its envelope.
	inlineMax int
	// group and stateGroup commit concurrent writes to the queue stream
	// and to the state bucket together (group.go).
	group, stateGroup groupCommit
}

// Open connects the spool to JetStream through nc and creates or updates,
// idempotently, every resource it needs. Calling it from many pods at once is
// safe.
func Open(ctx context.Context, nc *nats.Conn, cfg Config) (*Spool, error) {
	if cfg.Replicas < 1 {
		return nil, errors.New("spool: replicas must be at least 1")
	}
	if cfg.DuplicateWindow <= 0 || cfg.PublishTimeout <= 0 || cfg.ChunkSize <= 0 {
		return nil, errors.New("spool: duplicate window, publish timeout and chunk size must be positive")
	}
	if nc.Opts.ReconnectBufSize != -1 {
		// A publish that timed out while NATS was away would sit in the
		// reconnect buffer and be stored when the server comes back, after
		// the client was told 451: mail queued behind its back.
		return nil, errors.New("spool: the NATS connection must not buffer while reconnecting; connect with spool.NATSOptions() (nats.ReconnectBufSize(-1))")
	}
	if !nc.IsConnected() {
		// Nothing below can work, and the server's limits are unknown.
		return nil, errors.New("spool: not connected to NATS (yet)")
	}
	if int64(cfg.ChunkSize) > nc.MaxPayload()-4096 {
		return nil, fmt.Errorf("spool: chunk size %d does not fit in the server's max payload %d", cfg.ChunkSize, nc.MaxPayload())
	}
	if cfg.GroupCommit > groupLimit {
		return nil, fmt.Errorf("spool: group commit of %d records is over the server's atomic batch limit of %d", cfg.GroupCommit, groupLimit)
	}
	// Atomic batches (group commit) came with nats-server 2.12; against an
	// older server each record is stored alone, and the streams are not
	// asked for a setting it does not know.
	atomic := serverAtLeast(nc.ConnectedServerVersion(), 2, 12)
	if !atomic {
		cfg.GroupCommit = 1
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	s := &Spool{cfg: cfg, nc: nc, js: js}
	// Leave room for headers and the envelope within one NATS payload.
	s.inlineMax = int(nc.MaxPayload()) - 64<<10
	if s.inlineMax > 4<<20 {
		s.inlineMax = 4 << 20
	}
	if s.inlineMax < cfg.ChunkSize {
		s.inlineMax = cfg.ChunkSize
		if int64(s.inlineMax) > nc.MaxPayload()/2 {
			s.inlineMax = int(nc.MaxPayload() / 2)
		}
	}

	s.queue, err = EnsureStream(ctx, js, jetstream.StreamConfig{
		Name:        QueueStream,
		Description: "jetmail queue: one envelope (and inline body) per mail, keyed for the duplicate guard",
		Subjects:    []string{queuePrefix + ">"},
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardNew,
		MaxBytes:    cfg.MaxQueueBytes,
		// One message per subject: a tombstone or an updated envelope
		// replaces the previous one in a single write.
		MaxMsgsPerSubject: 1,
		Storage:           cfg.Storage,
		Replicas:          cfg.Replicas,
		// Nats-Msg-Id dedup only has to cover a retried publish, which
		// happens within PublishTimeout.
		Duplicates:  2 * time.Minute,
		AllowMsgTTL: true,
		// Group commit (group.go) stores the records of concurrent
		// Commits as one atomic batch.
		AllowAtomicPublish: atomic,
		// No direct gets: a replica that is behind answers those, and a
		// mail acknowledged a moment ago would not be found (the
		// original of a retransmission, the envelope a tool asks for).
		// Reads go to the stream leader, which has every acknowledged
		// write.
		AllowDirect: false,
	})
	if err != nil {
		return nil, fmt.Errorf("spool: stream %s: %w", QueueStream, err)
	}
	s.bodies, err = EnsureStream(ctx, js, jetstream.StreamConfig{
		Name:              BodyStream,
		Description:       "jetmail message bodies too large to travel inline, in chunks",
		Subjects:          []string{bodyPrefix + ">"},
		Retention:         jetstream.LimitsPolicy,
		Discard:           jetstream.DiscardNew,
		MaxBytes:          cfg.MaxBodyBytes,
		MaxMsgsPerSubject: 1,
		Storage:           cfg.Storage,
		Replicas:          cfg.Replicas,
		Duplicates:        2 * time.Minute,
		// The chunks of a body are read just after they were written:
		// from the leader, as for the queue.
		AllowDirect: false,
	})
	if err != nil {
		return nil, fmt.Errorf("spool: stream %s: %w", BodyStream, err)
	}
	s.state, err = ensureKeyValue(ctx, js, atomic, jetstream.KeyValueConfig{
		Bucket:      StateBucket,
		Description: "jetmail per-message delivery state",
		History:     1,
		Storage:     cfg.Storage,
		Replicas:    cfg.Replicas,
		// Lets a KV purge marker expire (ClearState wrote them up to
		// 2026-12; it now purges the subject in the stream, no marker).
		LimitMarkerTTL: time.Minute,
	})
	if err != nil {
		return nil, fmt.Errorf("spool: bucket %s: %w", StateBucket, err)
	}
	return s, nil
}

// NATSOptions are the connection options the spool needs: publishes fail
// at once while disconnected instead of being buffered (see Open), and the
// connection reconnects forever.
func NATSOptions() []nats.Option {
	return []nats.Option{nats.ReconnectBufSize(-1), nats.MaxReconnects(-1), nats.ReconnectWait(250 * time.Millisecond)}
}

// Config returns the configuration the spool was opened with.
func (s *Spool) Config() Config { return s.cfg }

// InlineMax is the largest body that is stored inline with its envelope.
func (s *Spool) InlineMax() int { return s.inlineMax }

// JetStream exposes the JetStream context for the deliverer and tools that
// build on the spool's resources.
func (s *Spool) JetStream() jetstream.JetStream { return s.js }

// State is the delivery-state bucket.
func (s *Spool) State() jetstream.KeyValue { return s.state }

// Ping reports whether JetStream answers; it backs the readiness probe.
func (s *Spool) Ping(ctx context.Context) error {
	if !s.nc.IsConnected() {
		return errors.New("spool: not connected to NATS")
	}
	_, err := s.js.AccountInfo(ctx)
	return err
}

// serverAtLeast tells whether a nats-server version ("2.15.2") is at least
// major.minor.
func serverAtLeast(version string, major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(version, "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || (ma == major && mi >= minor)
}

func queueSubject(key string) string { return queuePrefix + key }

func bodySubject(qid string, n int) string { return fmt.Sprintf("%s%s.%d", bodyPrefix, qid, n) }
