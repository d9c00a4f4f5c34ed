package events

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Config sets up a Log.
type Config struct {
	// JetStream is where batches go.
	JetStream jetstream.JetStream
	// Pod names the process: the Pod of its events and the last token of
	// its subject. Its host name.
	Pod string
	// Interval is the longest an event waits before its batch is
	// published. Default 1s.
	Interval time.Duration
	// MaxBatch publishes a batch as soon as it holds this many events.
	// Default 1,000.
	MaxBatch int
	// Buffer is how many events may wait while a batch is being published;
	// past it, events are dropped and counted. Default 20,000 (a few MB).
	Buffer int
	// Tries bounds the publishes of one batch before it is dropped.
	// Default 3.
	Tries int
	// PublishTimeout bounds one publish. Default 5s.
	PublishTimeout time.Duration
	// Registerer receives jetmail_events_dropped_total; nil: none.
	Registerer prometheus.Registerer
	Log        *zap.Logger
}

// Log batches a process's events into the stream. Emit is safe for
// concurrent use and never blocks; a nil *Log takes events and does
// nothing with them, so that the mail path needs no check.
type Log struct {
	cfg     Config
	ch      chan Event
	stop    chan struct{}
	done    chan struct{}
	closed  atomic.Bool
	dropped *prometheus.CounterVec
	pub     publisher
	once    sync.Once
}

// Drop reasons, the label of jetmail_events_dropped_total.
const (
	dropFull    = "buffer_full"
	dropPublish = "publish_failed"
)

// New starts a Log; Close flushes and stops it.
func New(cfg Config) *Log {
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 1000
	}
	if cfg.Buffer <= 0 {
		cfg.Buffer = 20 * cfg.MaxBatch
	}
	if cfg.Tries <= 0 {
		cfg.Tries = 3
	}
	if cfg.PublishTimeout <= 0 {
		cfg.PublishTimeout = 5 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	l := &Log{cfg: cfg, ch: make(chan Event, cfg.Buffer), stop: make(chan struct{}), done: make(chan struct{}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "jetmail_events_dropped_total",
			Help: "Events of the event log dropped: buffer_full (emitted faster than they could be published) or publish_failed (a batch that could not be stored after its tries).",
		}, []string{"reason"}),
		pub: publisher{js: cfg.JetStream, subject: Subject(cfg.Pod), max: maxPayload(cfg.JetStream)},
	}
	l.dropped.WithLabelValues(dropFull)
	l.dropped.WithLabelValues(dropPublish)
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(l.dropped)
	}
	go l.run()
	return l
}

// Emit records e: its time (now if zero) and pod are filled in. It never
// waits: when the buffer is full the event is dropped and counted.
func (l *Log) Emit(e Event) {
	if l == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	if e.Pod == "" {
		e.Pod = l.cfg.Pod
	}
	if l.closed.Load() {
		l.dropped.WithLabelValues(dropFull).Inc()
		return
	}
	select {
	case l.ch <- e.clipped():
	default:
		l.dropped.WithLabelValues(dropFull).Inc()
	}
}

// Close publishes what is waiting and stops the Log; ctx bounds the last
// publish. Events emitted after Close are dropped.
func (l *Log) Close(ctx context.Context) error {
	if l == nil {
		return nil
	}
	l.once.Do(func() {
		l.closed.Store(true)
		close(l.stop)
	})
	select {
	case <-l.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (l *Log) run() {
	defer close(l.done)
	tick := time.NewTicker(l.cfg.Interval)
	defer tick.Stop()
	batch := make([]Event, 0, l.cfg.MaxBatch)
	flush := func() {
		if len(batch) > 0 {
			l.flush(batch)
			batch = batch[:0]
		}
	}
	for {
		select {
		case e := <-l.ch:
			batch = append(batch, e)
			if len(batch) >= l.cfg.MaxBatch {
				flush()
			}
		case <-tick.C:
			flush()
		case <-l.stop:
			for {
				select {
				case e := <-l.ch:
					batch = append(batch, e)
					if len(batch) >= l.cfg.MaxBatch {
						flush()
					}
				default:
					flush()
					return
				}
			}
		}
	}
}

// flush publishes one batch, trying again a few times; then it gives up,
// says so and counts what it dropped.
func (l *Log) flush(batch []Event) {
	id := newBatchID()
	backoff := 200 * time.Millisecond
	var err error
	for try := 1; try <= l.cfg.Tries; try++ {
		ctx, cancel := context.WithTimeout(context.Background(), l.cfg.PublishTimeout)
		err = l.pub.publish(ctx, batch, id)
		cancel()
		if err == nil {
			return
		}
		if try < l.cfg.Tries {
			time.Sleep(backoff)
			backoff *= 2
		}
	}
	l.dropped.WithLabelValues(dropPublish).Add(float64(len(batch)))
	l.cfg.Log.Warn("event log: a batch could not be published and was dropped (reports will miss these events; no mail is affected)",
		zap.Int("events", len(batch)), zap.Int("tries", l.cfg.Tries), zap.Error(err))
}
