package smtpgw

import (
	"bufio"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/crypto/bcrypt"

	"github.com/jetmail/jetmail/api/v1alpha1"

	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/spool"
)

// BenchmarkAccept measures accepted messages per second and the latency
// from the final dot to the 250 reply: 5 KB messages over 20 concurrent
// sessions, against a JetStream server that fsyncs before it acknowledges
// (sync_interval: always), as `jetmail serve` does by default.
//
//	go test -run '^$' -bench BenchmarkAccept -benchtime 20000x ./smtpgw/
func BenchmarkAccept(b *testing.B) {
	ns := natstest.Start(b, natstest.Options{SyncAlways: true})
	nc := natstest.Connect(b, ns, spool.NATSOptions()...)
	sp, err := spool.Open(b.Context(), nc, spool.DefaultConfig())
	if err != nil {
		b.Fatal(err)
	}
	g := startGateway(b, sp, nil)

	const sessions = 20
	b.ResetTimer()
	all, elapsed := sendLoad(b, g.addr, sessions, b.N)
	b.StopTimer()
	if len(all) == 0 {
		return
	}
	reportLatency(b, all, elapsed)
	// Count what JetStream stored: every stored message is one fsynced write.
	var writes uint64
	for _, name := range []string{spool.QueueStream, spool.BodyStream} {
		st, err := sp.JetStream().Stream(b.Context(), name)
		if err != nil {
			b.Fatal(err)
		}
		info, err := st.Info(b.Context())
		if err != nil {
			b.Fatal(err)
		}
		writes += info.State.LastSeq
	}
	b.ReportMetric(float64(writes)/float64(len(all)), "js-writes/msg")
}

// BenchmarkAcceptSigned is BenchmarkAccept with DKIM signing at the
// gateway (From: bench@example.org, a relay client): RSA 2048, Ed25519, and
// both on each message. The difference to BenchmarkAccept is the cost of
// signing.
//
//	go test -run '^$' -bench BenchmarkAcceptSigned -benchtime 20000x ./smtpgw/
func BenchmarkAcceptSigned(b *testing.B) {
	for _, tc := range []struct {
		name string
		keys []*dkimKey
	}{
		{"rsa-sha256", []*dkimKey{{domain: "example.org", selector: "r", algo: v1alpha1.DKIMRSASHA256}}},
		{"ed25519-sha256", []*dkimKey{{domain: "example.org", selector: "e", algo: v1alpha1.DKIMEd25519SHA256}}},
		{"both", []*dkimKey{{domain: "example.org", selector: "r", algo: v1alpha1.DKIMRSASHA256},
			{domain: "example.org", selector: "e", algo: v1alpha1.DKIMEd25519SHA256}}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ns := natstest.Start(b, natstest.Options{SyncAlways: true})
			nc := natstest.Connect(b, ns, spool.NATSOptions()...)
			sp, err := spool.Open(b.Context(), nc, spool.DefaultConfig())
			if err != nil {
				b.Fatal(err)
			}
			g := startGateway(b, sp, keysPolicy(b, "  relayNetworks: [\"127.0.0.0/8\"]\n", tc.keys...))
			b.ResetTimer()
			all, elapsed := sendLoad(b, g.addr, 20, b.N)
			b.StopTimer()
			if len(all) == 0 {
				return
			}
			reportLatency(b, all, elapsed)
			if signed := testutil.ToFloat64(g.metrics.dkim.WithLabelValues(dkimSigned)); int(signed) != len(all) {
				b.Fatalf("%v of %d messages signed", signed, len(all))
			}
		})
	}
}

// sendLoad sends n 5 KB messages over sessions concurrent sessions and
// returns the latency of each from the final dot to the 250, and the time
// it all took.
func sendLoad(b *testing.B, addr string, sessions, n int) ([]time.Duration, time.Duration) {
	body := strings.Repeat(strings.Repeat("x", 98)+"\r\n", 50) // 5,000 octets
	var next atomic.Int64
	lat := make([][]time.Duration, sessions)
	var wg sync.WaitGroup
	start := time.Now()
	for s := 0; s < sessions; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Error(err)
				return
			}
			defer c.Close()
			r := bufio.NewReader(c)
			expect := func(code string) {
				for {
					line, err := r.ReadString('\n')
					if err != nil || !strings.HasPrefix(line, code) {
						b.Errorf("want %s, got %q (%v)", code, line, err)
						panic("protocol")
					}
					if line[3] == ' ' {
						return
					}
				}
			}
			expect("220")
			fmt.Fprintf(c, "EHLO bench.test\r\n")
			expect("250")
			for {
				i := next.Add(1)
				if i > int64(n) {
					fmt.Fprintf(c, "QUIT\r\n")
					return
				}
				fmt.Fprintf(c, "MAIL FROM:<bench@example.org>\r\n")
				expect("250")
				fmt.Fprintf(c, "RCPT TO:<rcpt%d@example.net>\r\n", i)
				expect("250")
				fmt.Fprintf(c, "DATA\r\n")
				expect("354")
				fmt.Fprintf(c, "From: bench@example.org\r\nSubject: bench %d\r\nMessage-ID: <%d.%d@bench.test>\r\n\r\n%s", i, i, start.UnixNano(), body)
				t0 := time.Now()
				fmt.Fprintf(c, ".\r\n")
				expect("250")
				lat[s] = append(lat[s], time.Since(t0))
			}
		}(s)
	}
	wg.Wait()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	return all, time.Since(start)
}

// reportLatency reports msgs/s and the median and 99th percentile latency.
func reportLatency(b *testing.B, all []time.Duration, elapsed time.Duration) {
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 { return float64(all[int(float64(len(all)-1)*p)].Microseconds()) / 1000 }
	b.ReportMetric(float64(len(all))/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
}

// BenchmarkAcceptDuringAUTHFlood measures mail intake while password
// guessers flood AUTH from ever new addresses (a botnet: the per-address
// lockout never triggers), each attempt a real bcrypt check at the default
// cost: without a flood, with the password checks bounded (the default)
// and unbounded.
//
//	go test -run '^$' -bench BenchmarkAcceptDuringAUTHFlood -benchtime 2000x ./smtpgw/
func BenchmarkAcceptDuringAUTHFlood(b *testing.B) {
	hash, err := bcrypt.GenerateFromPassword([]byte(authPass), bcrypt.DefaultCost)
	if err != nil {
		b.Fatal(err)
	}
	pol := relayPolicy(b, `  relayNetworks: ["127.0.0.0/8"]
  auth:
    usersSecretRef: {name: smtp-users, key: users}
    allowInsecure: true
`, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: smtp-users\n  namespace: mail\nstringData:\n  users: |\n    alice:"+string(hash)+"\n")
	for _, tc := range []struct {
		name     string
		checks   int
		guessers int
	}{{"no flood", 0, 0}, {"checks=default", 0, 8}, {"checks=unbounded", 1 << 20, 8}} {
		b.Run(tc.name, func(b *testing.B) {
			n := startNATS(b)
			g := startGateway(b, n.spool(b), pol, func(c *Config) { c.Auth = AuthLimits{Checks: tc.checks} })
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var guesses atomic.Int64
			for i := 0; i < tc.guessers; i++ {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					for j := 0; ; j++ {
						select {
						case <-stop:
							return
						default:
						}
						// A new source address for every attempt.
						local := &net.TCPAddr{IP: net.IPv4(127, 1+byte(i), byte(j>>8), 1+byte(j))}
						d := net.Dialer{LocalAddr: local, Timeout: 5 * time.Second}
						c, err := d.Dial("tcp", g.addr)
						if err != nil {
							continue
						}
						// A guesser needs the answer: it reads up to the
						// reply to its AUTH.
						r := bufio.NewReader(c)
						fmt.Fprintf(c, "EHLO guess.test\r\nAUTH PLAIN %s\r\nQUIT\r\n", b64("\x00alice\x00guess"))
						for {
							line, err := r.ReadString('\n')
							if err != nil {
								break
							}
							if strings.HasPrefix(line, "535 ") {
								guesses.Add(1)
								break
							}
						}
						c.Close()
					}
				}(i)
			}
			time.Sleep(500 * time.Millisecond) // let the flood build up
			b.ResetTimer()
			all, elapsed := sendLoad(b, g.addr, 4, b.N)
			b.StopTimer()
			close(stop)
			wg.Wait()
			if len(all) > 0 {
				reportLatency(b, all, elapsed)
				b.ReportMetric(float64(guesses.Load())/elapsed.Seconds(), "checked-guesses/s")
			}
		})
	}
}
