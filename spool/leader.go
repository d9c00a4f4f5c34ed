package spool

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// leaderGet reads the last message on subject in stream from the stream's
// leader ($JS.API.STREAM.MSG.GET), whatever the stream's AllowDirect says.
// A direct get may be answered by a replica that has not applied the
// latest writes yet; the leader has applied every acknowledged one. The
// jetstream package picks direct gets for a KV bucket on its own, so the
// delivery state, which one deliverer writes and another reads moments
// later, is read here. The answer is ErrMsgNotFound if there is none.
func (s *Spool) leaderGet(ctx context.Context, stream, subject string) (hdr nats.Header, data []byte, seq uint64, err error) {
	hdr, data, seq, _, err = s.leaderGetAt(ctx, stream, subject)
	return hdr, data, seq, err
}

// leaderGetAt is leaderGet with the time the record was stored.
func (s *Spool) leaderGetAt(ctx context.Context, stream, subject string) (hdr nats.Header, data []byte, seq uint64, stored time.Time, err error) {
	req, merr := json.Marshal(struct {
		LastBySubject string `json:"last_by_subj"`
	}{subject})
	if merr != nil {
		return nil, nil, 0, time.Time{}, merr
	}
	msg, err := s.nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+stream, req)
	if err != nil {
		return nil, nil, 0, time.Time{}, err
	}
	var resp struct {
		Error   *jetstream.APIError `json:"error"`
		Message *struct {
			Sequence uint64    `json:"seq"`
			Time     time.Time `json:"time"`
			Header   []byte    `json:"hdrs"` // base64 in JSON
			Data     []byte    `json:"data"`
		} `json:"message"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, nil, 0, time.Time{}, fmt.Errorf("spool: message get answer from %s: %w", stream, err)
	}
	if resp.Error != nil {
		if resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return nil, nil, 0, time.Time{}, jetstream.ErrMsgNotFound
		}
		return nil, nil, 0, time.Time{}, resp.Error
	}
	if resp.Message == nil {
		return nil, nil, 0, time.Time{}, fmt.Errorf("spool: empty message get answer from %s", stream)
	}
	hdr, err = parseHeader(resp.Message.Header)
	if err != nil {
		return nil, nil, 0, time.Time{}, err
	}
	return hdr, resp.Message.Data, resp.Message.Sequence, resp.Message.Time, nil
}

// parseHeader reads a NATS header block ("NATS/1.0\r\nKey: value\r\n\r\n"),
// keeping the keys as written (NATS headers are case-sensitive).
func parseHeader(b []byte) (nats.Header, error) {
	h := nats.Header{}
	if len(b) == 0 {
		return h, nil
	}
	lines := strings.Split(string(b), "\r\n")
	if !strings.HasPrefix(lines[0], "NATS/") {
		return nil, fmt.Errorf("spool: message header: no version line in %q", lines[0])
	}
	for _, l := range lines[1:] {
		if k, v, ok := strings.Cut(l, ":"); ok {
			h.Add(k, strings.TrimSpace(v))
		}
	}
	return h, nil
}
