package smtpgw

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"testing"

	"github.com/jetmail/jetmail/policy"
)

// eofReader hands out src in reads of at most size octets and returns
// io.EOF together with the last ones, as go-smtp's DATA reader does when it
// meets CRLF.CRLF.
type eofReader struct {
	src  []byte
	size int
}

func (r *eofReader) Read(p []byte) (int, error) {
	if len(r.src) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.src[:min(len(r.src), r.size)])
	r.src = r.src[n:]
	if len(r.src) == 0 {
		return n, io.EOF
	}
	return n, nil
}

// hasBareEOL reports whether b has a CR not followed by LF or an LF not
// preceded by CR. A CR at the very end is bare when end is set.
func hasBareEOL(b []byte, end bool) bool {
	for i, c := range b {
		switch {
		case c == '\n' && (i == 0 || b[i-1] != '\r'):
			return true
		case c == '\r' && i+1 < len(b) && b[i+1] != '\n':
			return true
		case c == '\r' && i+1 == len(b) && end:
			return true
		}
	}
	return false
}

// normalizedEOL is the reference for normalize mode: every CRLF kept, every
// other CR or LF turned into CRLF.
func normalizedEOL(b []byte) []byte {
	out := make([]byte, 0, len(b)*2)
	for i := 0; i < len(b); i++ {
		switch {
		case b[i] == '\r' && i+1 < len(b) && b[i+1] == '\n':
			out = append(out, '\r', '\n')
			i++
		case b[i] == '\r', b[i] == '\n':
			out = append(out, '\r', '\n')
		default:
			out = append(out, b[i])
		}
	}
	return out
}

// FuzzDataReader feeds arbitrary message data, in reads of any size and
// copied through a buffer of any size, through the data reader in both
// modes. It must never panic; strict mode passes clean data through
// unchanged and refuses anything with a bare CR or LF; normalize mode turns
// every bare CR or LF into CRLF and loses nothing; the digest for the
// duplicate guard covers exactly the client's octets.
func FuzzDataReader(f *testing.F) {
	for _, s := range []string{
		"",
		"hello\r\n",
		"Subject: x\r\n\r\nbody\r\n",
		"hello\n.\nMAIL FROM:<evil@x>\r\n",
		"hello\n.\r\nMAIL FROM:<evil@x>\r\n",
		"hello\r.\rMAIL FROM:<evil@x>\r\n",
		"hello\r.\r\nMAIL FROM:<evil@x>\r\n",
		"hello\r\n.\nMAIL FROM:<evil@x>\r\n",
		"hello\r\nMAIL FROM:<evil@x>\r\n", // CRLF.CR after go-smtp's unstuffing
		"hello\r\n\r\nMAIL FROM:<evil@x>\r\n",
		"hel\nlo\r\n",
		"hel\rlo\r\n",
		"hello\r",
		"\r\r\n",
		"\n\r",
		"Received: a\r\nRECEIVED: b\r\nMessage-ID: <m@x>\r\n\r\nReceived: c\r\n",
		"Subject: n\n\nline one\nline two\n",
	} {
		f.Add([]byte(s), uint8(0), uint8(0))
		f.Add([]byte(s), uint8(1), uint8(3))
	}
	pol := policy.Default()

	f.Fuzz(func(t *testing.T, in []byte, readSize, bufSize uint8) {
		sum := sha256.Sum256(in)
		for _, normalize := range []bool{false, true} {
			// 0 means "all at once", as a real reader with a large buffer.
			rs, bs := int(readSize), int(bufSize)
			if rs == 0 {
				rs = len(in) + 1
			}
			if bs == 0 {
				bs = 32 << 10
			}
			d := newDataReader(&eofReader{src: in, size: rs}, pol, normalize)
			var out bytes.Buffer
			// Hide ReadFrom so that the copy uses our buffer size.
			_, err := io.CopyBuffer(struct{ io.Writer }{&out}, d, make([]byte, bs))
			got := out.Bytes()

			if normalize {
				if err != nil {
					t.Fatalf("normalize: %q: error %v", in, err)
				}
				if want := normalizedEOL(in); !bytes.Equal(got, want) {
					t.Fatalf("normalize: %q (reads of %d, buffer %d)\ngot  %q\nwant %q", in, rs, bs, got, want)
				}
				if hasBareEOL(got, true) {
					t.Fatalf("normalize: output %q has a bare CR or LF", got)
				}
			} else {
				bare := hasBareEOL(in, true)
				switch {
				case !bare && err != nil:
					t.Fatalf("strict: clean %q: error %v", in, err)
				case !bare && !bytes.Equal(got, in):
					t.Fatalf("strict: clean %q came out as %q", in, got)
				case bare && !errors.Is(err, errBareLineEnding):
					t.Fatalf("strict: %q has a bare CR or LF, got error %v and output %q", in, err, got)
				case !bytes.HasPrefix(in, got):
					t.Fatalf("strict: output %q is not a prefix of the input %q", got, in)
				case hasBareEOL(got, false):
					// A CR may end the output of a refused transfer: the
					// octet after it is the one that was refused.
					t.Fatalf("strict: output %q has a bare CR or LF", got)
				}
			}
			if err == nil {
				if d.n != int64(len(in)) {
					t.Fatalf("normalize %v: counted %d octets of %d", normalize, d.n, len(in))
				}
				if !bytes.Equal(d.sum(), sum[:]) {
					t.Fatalf("normalize %v: digest does not cover exactly the input %q", normalize, in)
				}
			}
		}
	})
}
