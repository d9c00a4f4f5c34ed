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
	"io"

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

// BodyReader reads a queued body one piece at a time: the inline bytes of
// the envelope, or one chunk of the body stream per read from the store, so
// sending a 20 MiB mail needs one chunk of memory, not 20 MiB. It checks the
// body against its envelope's size and digest as it goes. A body that does
// not match ends in ErrBodyCorrupt instead of io.EOF, so whoever copies it
// somewhere must not finish (send the final dot, say) before seeing io.EOF.
type BodyReader struct {
	s     *Spool
	ctx   context.Context
	ref   BodyRef
	qid   string
	cur   []byte // unread part of the current piece
	chunk int    // next chunk to read
	h     hash.Hash
	n     int64
	err   error // sticky: io.EOF at a good end
}

// OpenBody starts reading m's body. An inline body is checked whole here;
// for a chunked one, the first chunk is read, so that a body that is not
// there at all fails before anything was sent.
func (s *Spool) OpenBody(ctx context.Context, m *Message) (*BodyReader, error) {
	if m.Tombstone {
		return nil, fmt.Errorf("spool: %s has left the queue", m.Envelope.QueueID)
	}
	r := &BodyReader{s: s, ctx: ctx, ref: m.Envelope.Body, qid: m.Envelope.QueueID, h: sha256.New()}
	if r.ref.Chunks == 0 {
		// Inline: the one piece there is, hashed here; fill finds no
		// chunk to read and checks again at the end.
		r.cur = m.inline
		r.h.Write(m.inline)
		r.n = int64(len(m.inline))
		if err := r.check(); err != nil {
			return nil, err
		}
		return r, nil
	}
	if err := r.fill(); err != nil {
		return nil, err
	}
	return r, nil
}

// Size is the body's size as its envelope gives it.
func (r *BodyReader) Size() int64 { return r.ref.Size }

// Read implements io.Reader.
func (r *BodyReader) Read(p []byte) (int, error) {
	piece, err := r.next()
	if err != nil {
		return 0, err
	}
	n := copy(p, piece)
	r.cur = piece[n:]
	return n, nil
}

// WriteTo implements io.WriterTo: each piece is written as it was read,
// without a copy.
func (r *BodyReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		p, err := r.next()
		if len(p) > 0 {
			n, werr := w.Write(p)
			total += int64(n)
			if werr != nil {
				return total, werr
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// next returns the rest of the current piece, or the next one.
func (r *BodyReader) next() ([]byte, error) {
	for len(r.cur) == 0 {
		if r.err != nil {
			return nil, r.err
		}
		r.err = r.fill()
	}
	p := r.cur
	r.cur = nil
	return p, nil
}

// fill reads the next chunk into cur. At the end of the body it returns
// io.EOF, or ErrBodyCorrupt when what was read is not the body the
// envelope describes.
func (r *BodyReader) fill() error {
	if r.chunk >= r.ref.Chunks {
		if err := r.check(); err != nil {
			return err
		}
		return io.EOF
	}
	m, err := r.s.bodies.GetLastMsgForSubject(r.ctx, bodySubject(r.ref.ID, r.chunk))
	if err != nil {
		return fmt.Errorf("spool: read body chunk %d of %s: %w", r.chunk, r.ref.ID, err)
	}
	r.chunk++
	r.n += int64(len(m.Data))
	if r.n > r.ref.Size {
		return fmt.Errorf("%s: %w: more than the %d octets the envelope says", r.qid, ErrBodyCorrupt, r.ref.Size)
	}
	r.h.Write(m.Data)
	r.cur = m.Data
	return nil
}

// check compares what was read with the envelope's size and digest.
func (r *BodyReader) check() error {
	if r.n != r.ref.Size {
		return fmt.Errorf("%s: %w: size %d, envelope says %d", r.qid, ErrBodyCorrupt, r.n, r.ref.Size)
	}
	if hex.EncodeToString(r.h.Sum(nil)) != r.ref.SHA256 {
		return fmt.Errorf("%s: %w", r.qid, ErrBodyCorrupt)
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
