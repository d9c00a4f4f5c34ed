// Command sinkcount is a final destination for relay benchmarks: an SMTP
// server (go-smtp) on loopback that accepts every message, counts completed
// DATA transactions, and notes the time at which the count reaches -n. It
// tells duplicates apart by the Message-Id header, so a benchmark can check
// that the sink saw exactly N distinct messages, each once.
//
// Output on stdout, one event per line (times in Unix nanoseconds):
//
//	listening 127.0.0.1:2630
//	progress <time> <count>            every -progress, while the count moves
//	reached <n> <time>                 when the count reaches -n
//	summary total=... distinct=... duplicates=... no_msgid=... first=<time> reached=<time> last=<time> sessions=...
//
// After reaching -n it keeps accepting for -linger (to catch late duplicates)
// and exits 0. After -timeout it exits 1 whatever the count.
//
//	go run ./hack/sinkcount -listen 127.0.0.1:2630 -n 10000
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
)

type sink struct {
	mu        sync.Mutex
	seen      map[string]int
	total     int
	dups      int
	noID      int
	first     int64
	reached   int64
	last      int64
	n         int
	done      chan struct{}
	sessions  atomic.Int64
	out       *bufio.Writer
	outMu     *sync.Mutex
	reachOnce sync.Once
}

func (s *sink) printf(format string, a ...any) {
	s.outMu.Lock()
	fmt.Fprintf(s.out, format, a...)
	s.out.Flush()
	s.outMu.Unlock()
}

// record counts one completed DATA transaction.
func (s *sink) record(msgID string) {
	now := time.Now().UnixNano()
	s.mu.Lock()
	s.total++
	if s.first == 0 {
		s.first = now
	}
	s.last = now
	if msgID == "" {
		s.noID++
	} else {
		s.seen[msgID]++
		if s.seen[msgID] > 1 {
			s.dups++
		}
	}
	hit := s.total == s.n
	if hit {
		s.reached = now
	}
	s.mu.Unlock()
	if hit {
		s.reachOnce.Do(func() {
			s.printf("reached %d %d\n", s.n, now)
			close(s.done)
		})
	}
}

func (s *sink) NewSession(_ *smtp.Conn) (smtp.Session, error) {
	s.sessions.Add(1)
	return &session{s: s}, nil
}

type session struct{ s *sink }

func (*session) Reset()                               {}
func (*session) Logout() error                        { return nil }
func (*session) Mail(string, *smtp.MailOptions) error { return nil }
func (*session) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (ss *session) Data(r io.Reader) error {
	br := bufio.NewReaderSize(r, 8192)
	id := ""
	// Headers only; the body is read and thrown away.
	for {
		line, err := br.ReadSlice('\n')
		if err != nil && err != bufio.ErrBufferFull {
			break
		}
		t := bytes.TrimRight(line, "\r\n")
		if len(t) == 0 {
			break
		}
		if len(t) > 11 && strings.EqualFold(string(t[:11]), "message-id:") {
			id = strings.TrimSpace(string(t[11:]))
		}
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return err
	}
	ss.s.record(id)
	return nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:2630", "address to listen on (loopback)")
	n := flag.Int("n", 10000, "messages to wait for")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up after this long")
	linger := flag.Duration("linger", 3*time.Second, "keep accepting this long after reaching -n (late duplicates)")
	progress := flag.Duration("progress", time.Second, "progress line interval (0: none)")
	flag.Parse()

	out := bufio.NewWriter(os.Stdout)
	s := &sink{seen: make(map[string]int, *n), n: *n, done: make(chan struct{}), out: out, outMu: &sync.Mutex{}}
	srv := smtp.NewServer(s)
	srv.Domain = "sink.localdomain"
	srv.ReadTimeout = time.Minute
	srv.WriteTimeout = time.Minute
	srv.MaxMessageBytes = 64 << 20
	srv.MaxRecipients = 1000
	srv.ErrorLog = nopLogger{}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sinkcount:", err)
		os.Exit(2)
	}
	go srv.Serve(l)
	s.printf("listening %s\n", l.Addr())

	if *progress > 0 {
		go func() {
			t := time.NewTicker(*progress)
			defer t.Stop()
			prev := -1
			for range t.C {
				s.mu.Lock()
				c := s.total
				s.mu.Unlock()
				if c != prev {
					s.printf("progress %d %d\n", time.Now().UnixNano(), c)
					prev = c
				}
			}
		}()
	}

	code := 0
	select {
	case <-s.done:
		time.Sleep(*linger)
	case <-time.After(*timeout):
		code = 1
	}
	l.Close()
	s.mu.Lock()
	s.printf("summary total=%d distinct=%d duplicates=%d no_msgid=%d first=%d reached=%d last=%d sessions=%d\n",
		s.total, len(s.seen), s.dups, s.noID, s.first, s.reached, s.last, s.sessions.Load())
	s.mu.Unlock()
	os.Exit(code)
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...any) {}
func (nopLogger) Println(...any)        {}
