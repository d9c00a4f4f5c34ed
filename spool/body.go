package spool

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrWrite means a body could not be stored; the mail is not queued and the
// client should try again later.
var ErrWrite = errors.New("spool: write failed")

// ErrBodyCorrupt means a body read back does not match its digest.
var ErrBodyCorrupt = errors.New("spool: body does not match its digest")

// Body accumulates the body of one mail as it arrives. Small bodies stay in
// memory and travel inline with the envelope; once a body outgrows one NATS
// payload it is written to the body stream chunk by chunk while the client is
// still sending, so a 20 MiB mail never needs 20 MiB of gateway memory at
// once beyond one chunk.
type Body struct {
	s   *Spool
	ctx context.Context
	// id names this transmission's body: the queue ID and a random
	// suffix, so two mails that drew the same queue ID can never touch
	// each other's chunks, and a retried publish is recognised as such.
	id      string
	buf     bytes.Buffer
	h       hash.Hash
	size    int64
	chunks  int
	chunked bool
	err     error
}

// NewBody starts the body of the mail with queue ID qid. ctx bounds the chunk
// writes.
func (s *Spool) NewBody(ctx context.Context, qid string) *Body {
	return &Body{s: s, ctx: ctx, id: qid + "-" + randomToken(8), h: sha256.New()}
}

// Write appends p to the body.
func (b *Body) Write(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	b.buf.Write(p)
	b.h.Write(p)
	b.size += int64(len(p))
	if !b.chunked && b.buf.Len() > b.s.inlineMax {
		b.chunked = true
	}
	for b.chunked && b.buf.Len() >= b.s.cfg.ChunkSize {
		if err := b.flushChunk(b.buf.Next(b.s.cfg.ChunkSize)); err != nil {
			b.err = err
			return 0, err
		}
	}
	return len(p), nil
}

// Size is the number of octets written so far.
func (b *Body) Size() int64 { return b.size }

func (b *Body) flushChunk(p []byte) error {
	subj := bodySubject(b.id, b.chunks)
	ctx, cancel := context.WithTimeout(b.ctx, b.s.cfg.PublishTimeout)
	defer cancel()
	// The message ID makes a retried chunk write idempotent.
	_, err := b.s.js.Publish(ctx, subj, p,
		jetstream.WithMsgID(fmt.Sprintf("%s.%d", b.id, b.chunks)),
		jetstream.WithExpectStream(BodyStream))
	if err != nil {
		return fmt.Errorf("%w: body chunk %s: %w", ErrWrite, subj, err)
	}
	b.chunks++
	return nil
}

// finish writes the last chunk if the body is chunked and returns the body
// reference and the inline bytes (nil when chunked).
func (b *Body) finish() (BodyRef, []byte, error) {
	if b.err != nil {
		return BodyRef{}, nil, b.err
	}
	ref := BodyRef{ID: b.id, Size: b.size, SHA256: hex.EncodeToString(b.h.Sum(nil))}
	if !b.chunked {
		return ref, b.buf.Bytes(), nil
	}
	if b.buf.Len() > 0 {
		if err := b.flushChunk(b.buf.Next(b.buf.Len())); err != nil {
			b.err = err
			return BodyRef{}, nil, err
		}
	}
	ref.Chunks = b.chunks
	return ref, nil, nil
}

// Discard deletes any chunks already written. Call it when the mail will not
// be committed. It is best effort: chunks it cannot delete are unreferenced
// and never read.
func (b *Body) Discard() {
	if b.chunks == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), b.s.cfg.PublishTimeout)
	defer cancel()
	_ = b.s.bodies.Purge(ctx, jetstream.WithPurgeSubject(bodyPrefix+b.id+".>"))
	b.chunks = 0
}

// readChunks reassembles a chunked body.
func (s *Spool) readChunks(ctx context.Context, id string, n int, size int64) ([]byte, error) {
	out := make([]byte, 0, size)
	for i := 0; i < n; i++ {
		m, err := s.bodies.GetLastMsgForSubject(ctx, bodySubject(id, i))
		if err != nil {
			return nil, fmt.Errorf("spool: read body chunk %d of %s: %w", i, id, err)
		}
		out = append(out, m.Data...)
	}
	return out, nil
}

func checkDigest(body []byte, ref BodyRef) error {
	if int64(len(body)) != ref.Size {
		return fmt.Errorf("%w: size %d, envelope says %d", ErrBodyCorrupt, len(body), ref.Size)
	}
	sum := sha256.Sum256(body)
	if hex.EncodeToString(sum[:]) != ref.SHA256 {
		return ErrBodyCorrupt
	}
	return nil
}

// randomToken returns n random characters of the queue ID alphabet.
func randomToken(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = crockford[b[i]&31]
	}
	return string(b)
}

// isTemporaryPublishError reports whether a publish may succeed if retried
// with the same message ID.
func isTemporaryPublishError(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse) ||
		// "duplicate message ID is in process": an earlier try with the
		// same message ID (a timed-out publish or batch) is still being
		// replicated, so its fate is not known yet.
		errors.As(err, &apiErr) && apiErr.ErrorCode == errCodeMsgIDInProcess
}

// errCodeMsgIDInProcess is nats-server's JSStreamDuplicateMessageConflict
// code for a message ID whose earlier publish is still in process.
const errCodeMsgIDInProcess = 10158
