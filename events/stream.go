package events

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/spool"
)

// Names of the stream and its subjects.
const (
	// Stream is the stream of event batches.
	Stream = "JETMAIL_EVENTS"
	// SubjectPrefix starts the subject of every batch: jetmail.events.<pod>.
	SubjectPrefix = "jetmail.events."

	// HeaderCount is the number of events in a batch.
	HeaderCount = "Jetmail-Events"
)

// StreamConfig sets up the stream.
type StreamConfig struct {
	// Replicas is the stream's replication: as the queue's.
	Replicas int
	// Storage is file or memory: as the queue's.
	Storage jetstream.StorageType
	// MaxAge is how long events are kept. Default 7 days.
	MaxAge time.Duration
	// MaxBytes caps the stream; the oldest batches go first. Default
	// 1 GiB; -1: no cap beyond the server's.
	MaxBytes int64
}

// DefaultMaxAge and DefaultMaxBytes are the stream's default limits.
const (
	DefaultMaxAge   = 7 * 24 * time.Hour
	DefaultMaxBytes = 1 << 30
)

// OpenStream creates or updates the stream, idempotently, as spool.Open
// does for the queue's: calling it from many pods at once is safe.
func OpenStream(ctx context.Context, js jetstream.JetStream, cfg StreamConfig) (jetstream.Stream, error) {
	if cfg.Replicas < 1 {
		cfg.Replicas = 1
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = DefaultMaxAge
	}
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	s, err := spool.EnsureStream(ctx, js, jetstream.StreamConfig{
		Name:        Stream,
		Description: "jetmail event log: batches of gzipped JSON lines, one batch per pod per second at most",
		Subjects:    []string{SubjectPrefix + ">"},
		Retention:   jetstream.LimitsPolicy,
		// Reporting, not mail: when full, the oldest events go.
		Discard:  jetstream.DiscardOld,
		MaxAge:   cfg.MaxAge,
		MaxBytes: cfg.MaxBytes,
		Storage:  cfg.Storage,
		Replicas: cfg.Replicas,
		// A retried publish of the same batch (Nats-Msg-Id) is stored once.
		Duplicates: 2 * time.Minute,
	})
	if err != nil {
		return nil, fmt.Errorf("events: stream %s: %w", Stream, err)
	}
	return s, nil
}

// Subject is the subject of pod's batches. A host name's dots (and
// anything else a subject token cannot hold) become underscores.
func Subject(pod string) string {
	tok := strings.Map(func(r rune) rune {
		switch {
		case r == '.' || r == '*' || r == '>' || r <= ' ' || r == 0x7f:
			return '_'
		}
		return r
	}, pod)
	if tok == "" {
		tok = "_"
	}
	return SubjectPrefix + tok
}

// Publish stores events as batches on pod's subject, waiting for
// JetStream's acknowledgement: for a command line tool that records a
// handful of events (the queue tools' admin actions). Events without a
// time or a pod get now and pod.
func Publish(ctx context.Context, js jetstream.JetStream, pod string, evs []Event) error {
	now := time.Now()
	for i := range evs {
		if evs[i].Time.IsZero() {
			evs[i].Time = now
		}
		if evs[i].Pod == "" {
			evs[i].Pod = pod
		}
		evs[i] = evs[i].clipped()
	}
	p := publisher{js: js, subject: Subject(pod), max: maxPayload(js)}
	return p.publish(ctx, evs, newBatchID())
}

// publisher writes batches to one subject.
type publisher struct {
	js      jetstream.JetStream
	subject string
	max     int
	buf     bytes.Buffer
	zw      *gzip.Writer
}

func maxPayload(js jetstream.JetStream) int {
	if nc := js.Conn(); nc != nil && nc.MaxPayload() > 0 {
		return int(nc.MaxPayload()) - 4096
	}
	return 1<<20 - 4096
}

func newBatchID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// publish stores evs as one message, or as halves of it when the
// compressed batch is larger than a NATS payload. id, with the half's
// position, is the message ID: a retry of the same batch is stored once.
func (p *publisher) publish(ctx context.Context, evs []Event, id string) error {
	if len(evs) == 0 {
		return nil
	}
	data, err := p.encode(evs)
	if err != nil {
		return err
	}
	if len(data) > p.max && len(evs) > 1 {
		h := len(evs) / 2
		if err := p.publish(ctx, evs[:h], id+"a"); err != nil {
			return err
		}
		return p.publish(ctx, evs[h:], id+"b")
	}
	msg := nats.NewMsg(p.subject)
	msg.Data = data
	msg.Header.Set(HeaderCount, strconv.Itoa(len(evs)))
	msg.Header.Set("Content-Encoding", "gzip")
	msg.Header.Set(jetstream.MsgIDHeader, id)
	_, err = p.js.PublishMsg(ctx, msg)
	return err
}

// encode is evs as gzipped JSON lines.
func (p *publisher) encode(evs []Event) ([]byte, error) {
	p.buf.Reset()
	if p.zw == nil {
		p.zw = gzip.NewWriter(&p.buf)
	} else {
		p.zw.Reset(&p.buf)
	}
	enc := json.NewEncoder(p.zw)
	for i := range evs {
		if err := enc.Encode(&evs[i]); err != nil {
			return nil, err
		}
	}
	if err := p.zw.Close(); err != nil {
		return nil, err
	}
	return bytes.Clone(p.buf.Bytes()), nil
}

// Decode reads the events of one stored batch.
func Decode(data []byte) ([]Event, error) {
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("events: batch: %w", err)
	}
	var out []Event
	dec := json.NewDecoder(bufio.NewReader(zr))
	for {
		var e Event
		err := dec.Decode(&e)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, fmt.Errorf("events: batch: %w", err)
		}
		out = append(out, e)
	}
}
