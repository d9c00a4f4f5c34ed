package smtpgw

import (
	"crypto/sha256"
	"errors"
	"hash"
	"io"
	"net"

	"github.com/jetmail/jetmail/policy"
)

var (
	errBareLineEnding = errors.New("bare CR or LF in message data")
	errMessageTooBig  = errors.New("message exceeds the maximum size")
)

// dataReader sits between go-smtp's DATA/BDAT reader and the spool. It
//
//   - refuses a bare CR or a bare LF anywhere (RFC 5321 §2.3.8), which is
//     what makes SMTP smuggling impossible: go-smtp only ends the data at
//     CRLF.CRLF, and any other end-of-data look-alike contains a bare CR or
//     LF; or, for clients the policy names, turns them into CRLF;
//   - enforces the maximum size (time limits are on the connection);
//   - counts Received: headers and notes a Message-ID header, reading only
//     the header section;
//   - hashes the bytes exactly as the client sent them, for the duplicate
//     guard.
type dataReader struct {
	r         io.Reader
	pol       *policy.Relay
	normalize bool

	h       hash.Hash
	n       int64 // octets read from the client
	prevCR  bool
	pending []byte // normalized output not yet returned
	srcErr  error  // the source's error, held until pending is served

	// Header section scanning.
	inHeader  bool
	lineBuf   [12]byte
	lineLen   int
	received  int
	messageID bool
}

func newDataReader(r io.Reader, pol *policy.Relay, normalize bool) *dataReader {
	return &dataReader{r: r, pol: pol, normalize: normalize, h: sha256.New(), inHeader: true}
}

func (d *dataReader) sum() []byte { return d.h.Sum(nil) }

func (d *dataReader) Read(p []byte) (int, error) {
	if d.normalize {
		return d.readNormalized(p)
	}
	n, err := d.r.Read(p)
	if n > 0 {
		if e := d.consume(p[:n]); e != nil {
			return 0, e
		}
		d.scanHeaders(p[:n])
	}
	if err == io.EOF && d.prevCR {
		return n, errBareLineEnding
	}
	return n, err
}

// consume accounts for bytes from the client: size, digest, line endings.
func (d *dataReader) consume(b []byte) error {
	d.n += int64(len(b))
	if d.n >= d.pol.MaxMessageBytes {
		return errMessageTooBig
	}
	d.h.Write(b)
	return d.check(b)
}

// readNormalized serves the normalized stream, which can be longer than
// what was read: the overflow waits in pending, and the source's error
// (io.EOF comes with the last bytes) is held back until pending is empty.
func (d *dataReader) readNormalized(p []byte) (int, error) {
	for len(d.pending) == 0 {
		if d.srcErr != nil {
			return 0, d.srcErr
		}
		n, err := d.r.Read(p)
		if n > 0 {
			if e := d.consume(p[:n]); e != nil {
				return 0, e
			}
			out := normalizeEOL(p[:n], &d.prevCR)
			d.scanHeaders(out)
			d.pending = append(d.pending, out...)
		}
		if err == io.EOF && d.prevCR {
			d.pending = append(d.pending, '\n')
			d.prevCR = false
		}
		if err != nil {
			d.srcErr = err
		}
	}
	k := copy(p, d.pending)
	d.pending = d.pending[k:]
	if len(d.pending) == 0 {
		d.pending = nil
	}
	return k, nil
}

// check refuses bare CR and LF unless normalizing.
func (d *dataReader) check(b []byte) error {
	if d.normalize {
		return nil
	}
	prevCR := d.prevCR
	for _, c := range b {
		switch {
		case prevCR && c != '\n':
			return errBareLineEnding
		case c == '\n' && !prevCR:
			return errBareLineEnding
		}
		prevCR = c == '\r'
	}
	d.prevCR = prevCR
	return nil
}

// normalizeEOL turns bare CR and bare LF into CRLF.
func normalizeEOL(b []byte, prevCR *bool) []byte {
	out := make([]byte, 0, len(b)+8)
	for _, c := range b {
		switch {
		case *prevCR && c == '\n':
			out = append(out, '\n')
			*prevCR = false
			continue
		case *prevCR:
			out = append(out, '\n')
		}
		switch c {
		case '\r':
			out = append(out, '\r')
			*prevCR = true
			continue
		case '\n':
			out = append(out, '\r', '\n')
		default:
			out = append(out, c)
		}
		*prevCR = false
	}
	return out
}

var (
	hdrReceived  = []byte("received:")
	hdrMessageID = []byte("message-id:")
)

// scanHeaders looks at the start of each header line until the empty line
// that ends the header section. Input is CRLF-clean by now.
func (d *dataReader) scanHeaders(b []byte) {
	for i := 0; i < len(b) && d.inHeader; i++ {
		c := b[i]
		if c == '\n' {
			if d.lineLen == 1 && d.lineBuf[0] == '\r' || d.lineLen == 0 {
				d.inHeader = false // empty line: end of headers
				return
			}
			d.lineLen = 0
			continue
		}
		if d.lineLen < len(d.lineBuf) {
			if c >= 'A' && c <= 'Z' {
				c += 'a' - 'A'
			}
			d.lineBuf[d.lineLen] = c
			d.lineLen++
			switch {
			case d.lineLen == len(hdrReceived) && string(d.lineBuf[:d.lineLen]) == string(hdrReceived):
				d.received++
			case d.lineLen == len(hdrMessageID) && string(d.lineBuf[:d.lineLen]) == string(hdrMessageID):
				d.messageID = true
			}
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
