package mtasts

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/internal/natstest"
)

func TestParseRecord(t *testing.T) {
	for _, tc := range []struct {
		txts []string
		id   string
	}{
		{[]string{"v=STSv1; id=20160831085700Z;"}, "20160831085700Z"}, // RFC 8461 §3.1
		{[]string{"v=STSv1;id=abc"}, "abc"},
		{[]string{"v=spf1 -all", "v=STSv1; id=x1; ext=1"}, "x1"},
	} {
		if id, err := ParseRecord(tc.txts); err != nil || id != tc.id {
			t.Errorf("%q: %q, %v; want %q", tc.txts, id, err, tc.id)
		}
	}
	for _, txts := range [][]string{
		nil,
		{"v=spf1 -all"},
		{"v=STSv1; id=a;", "v=STSv1; id=b;"}, // two: none (§3.1)
		{"v=STSv1;"},                         // no id
		{"v=STSv1; id=;"},
		{"v=STSv1; id=has-dash;"},
		{"v=STSv1; id=" + strings.Repeat("a", 33) + ";"},
		{"v=STSv1; id=a; id=b;"},
		{"v=STSv2; id=a;"},
		{"V=STSv1; id=a;"},
	} {
		if id, err := ParseRecord(txts); !errors.Is(err, ErrNoRecord) {
			t.Errorf("%q: %q, %v; want ErrNoRecord", txts, id, err)
		}
	}
}

func TestParsePolicy(t *testing.T) {
	// RFC 8461 §3.2's example, with CRLF.
	p, err := ParsePolicy([]byte("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p.Mode != Enforce || p.MaxAge != 604800*time.Second || strings.Join(p.MX, ",") != "mail.example.com,*.example.net,backupmx.example.com" {
		t.Errorf("%+v", p)
	}
	for host, want := range map[string]bool{
		"mail.example.com": true, "MAIL.Example.COM.": true, "backupmx.example.com": true,
		"mx1.example.net": true, "example.net": false, "a.mx1.example.net": false,
		"mail.example.com.evil.test": false, "other.example.com": false,
	} {
		if p.Match(host) != want {
			t.Errorf("Match(%q) = %v, want %v", host, !want, want)
		}
	}
	// LF line ends, unknown keys, spaces, mode none without mx.
	if p, err := ParsePolicy([]byte("version: STSv1\nfuture: thing\nmode:none\nmax_age:  86400 \n")); err != nil || p.Mode != None {
		t.Errorf("none: %+v, %v", p, err)
	}
	for name, body := range map[string]string{
		"no version":                  "mode: enforce\nmx: a.test\nmax_age: 1\n",
		"bad version":                 "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
		"no mode":                     "version: STSv1\nmx: a.test\nmax_age: 1\n",
		"bad mode":                    "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
		"no max_age":                  "version: STSv1\nmode: enforce\nmx: a.test\n",
		"max_age > year":              "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
		"max_age that would overflow": "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n",
		"max_age text":                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1d\n",
		"no mx":                       "version: STSv1\nmode: enforce\nmax_age: 1\n",
		"bad mx":                      "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
		"inner wildcard":              "version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",
		"two modes":                   "version: STSv1\nmode: testing\nmode: enforce\nmx: a.test\nmax_age: 1\n",
		"no colon":                    "version: STSv1\nmode enforce\nmx: a.test\nmax_age: 1\n",
		"html":                        "<html><body>Not found</body></html>\n",
	} {
		if p, err := ParsePolicy([]byte(body)); err == nil {
			t.Errorf("%s: accepted as %+v", name, p)
		}
	}
}

// policyServer serves policies over HTTPS on loopback, with a certificate
// from a test CA for mta-sts.<domain> of each domain it serves.
type policyServer struct {
	srv    *httptest.Server
	ca     *mxtest.CA
	hits   atomic.Int64
	mu     sync.Mutex
	bodies map[string]string // host → policy; absent: 404
	ctype  string
	status int
}

func startPolicyServer(t *testing.T, domains ...string) *policyServer {
	t.Helper()
	ps := &policyServer{ca: mxtest.NewCA(t, "Policy CA"), bodies: map[string]string{}, ctype: "text/plain; charset=utf-8", status: 200}
	var names []string
	for _, d := range domains {
		names = append(names, "mta-sts."+d)
	}
	ps.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ps.hits.Add(1)
		ps.mu.Lock()
		body, ok := ps.bodies[strings.Split(r.Host, ":")[0]]
		ctype, status := ps.ctype, ps.status
		ps.mu.Unlock()
		if r.URL.Path != "/.well-known/mta-sts.txt" || !ok {
			http.NotFound(w, r)
			return
		}
		if status == http.StatusFound {
			http.Redirect(w, r, "https://elsewhere.test/", status)
			return
		}
		w.Header().Set("Content-Type", ctype)
		w.WriteHeader(status)
		fmt.Fprint(w, body)
	}))
	ps.srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshakes refused on purpose
	ps.srv.TLS = &tls.Config{Certificates: []tls.Certificate{ps.ca.Issue(t, time.Time{}, names...)}}
	ps.srv.StartTLS()
	t.Cleanup(ps.srv.Close)
	return ps
}

func (ps *policyServer) set(domain, body string) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.bodies["mta-sts."+domain] = body
}

// fetcher trusts the policy server's CA and connects every name to it.
func (ps *policyServer) fetcher() *Fetcher {
	addr := ps.srv.Listener.Addr().(*net.TCPAddr)
	return &Fetcher{RootCAs: ps.ca.Pool, Port: uint16(addr.Port), Timeout: 3 * time.Second,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr.String())
		}}
}

const enforceBody = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.org\r\nmax_age: 86400\r\n"

func TestFetch(t *testing.T) {
	ctx := context.Background()
	ps := startPolicyServer(t, "example.org", "other.test")
	ps.set("example.org", enforceBody)

	p, err := ps.fetcher().Fetch(ctx, "example.org")
	if err != nil || p.Mode != Enforce || p.Domain != "example.org" || !p.Match("mx.example.org") {
		t.Fatalf("%+v, %v", p, err)
	}

	wantResult := func(t *testing.T, f *Fetcher, domain, result string) {
		t.Helper()
		_, err := f.Fetch(ctx, domain)
		var fe *FetchError
		if !errors.As(err, &fe) || fe.Result != result {
			t.Errorf("%s: %v, want a %s", domain, err, result)
		}
	}
	t.Run("no policy there: fetch error", func(t *testing.T) { wantResult(t, ps.fetcher(), "other.test", ResultFetchError) })
	t.Run("a certificate for another name: webpki", func(t *testing.T) {
		ps.set("unnamed.test", enforceBody)
		wantResult(t, ps.fetcher(), "unnamed.test", ResultWebPKIInvalid)
	})
	t.Run("an unknown authority: webpki", func(t *testing.T) {
		f := ps.fetcher()
		f.RootCAs = mxtest.NewCA(t, "Stranger").Pool
		wantResult(t, f, "example.org", ResultWebPKIInvalid)
	})
	t.Run("a redirect is not followed", func(t *testing.T) {
		ps.mu.Lock()
		ps.status = http.StatusFound
		ps.mu.Unlock()
		defer func() { ps.mu.Lock(); ps.status = 200; ps.mu.Unlock() }()
		wantResult(t, ps.fetcher(), "example.org", ResultFetchError)
	})
	t.Run("not text/plain", func(t *testing.T) {
		ps.mu.Lock()
		ps.ctype = "text/html"
		ps.mu.Unlock()
		defer func() { ps.mu.Lock(); ps.ctype = "text/plain"; ps.mu.Unlock() }()
		wantResult(t, ps.fetcher(), "example.org", ResultPolicyInvalid)
	})
	t.Run("unparsable", func(t *testing.T) {
		ps.set("other.test", "version: STSv1\nmode: sometimes\n")
		wantResult(t, ps.fetcher(), "other.test", ResultPolicyInvalid)
	})
	t.Run("larger than 64 KiB", func(t *testing.T) {
		ps.set("other.test", enforceBody+strings.Repeat("x: y\r\n", 12000))
		wantResult(t, ps.fetcher(), "other.test", ResultFetchError)
	})
	t.Run("a server that never answers is cut at the deadline", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
			}
		}()
		f := &Fetcher{Timeout: 300 * time.Millisecond, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, ln.Addr().String())
		}}
		start := time.Now()
		wantResult(t, f, "example.org", ResultFetchError)
		if time.Since(start) > 5*time.Second {
			t.Errorf("took %s", time.Since(start))
		}
	})
}

// txtZone is a _mta-sts TXT record per domain, changeable.
type txtZone struct {
	mu   sync.Mutex
	recs map[string][]string
	fail bool
}

func (z *txtZone) set(domain string, txts ...string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.recs[domain] = txts
}

func (z *txtZone) lookup(_ context.Context, label, domain string) ([]string, error) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if label != "_mta-sts" {
		return nil, fmt.Errorf("unexpected label %q", label)
	}
	if z.fail {
		return nil, errors.New("SERVFAIL")
	}
	return z.recs[domain], nil
}

func TestPolicies(t *testing.T) {
	ctx := context.Background()
	nc := natstest.Connect(t, natstest.Start(t, natstest.Options{}))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := OpenBucket(ctx, js, 1, jetstream.FileStorage)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenBucket(ctx, js, 1, jetstream.FileStorage); err != nil {
		t.Fatalf("opening the bucket again: %v", err)
	}
	ps := startPolicyServer(t, "example.org", "concurrent.test")
	ps.set("example.org", enforceBody)
	zone := &txtZone{recs: map[string][]string{"example.org": {"v=STSv1; id=one;"}}}
	var now atomic.Int64
	now.Store(time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	advance := func(d time.Duration) { now.Add(int64(d)) }
	var fetches atomic.Int64
	newPolicies := func() *Policies {
		return &Policies{TXT: zone.lookup, Fetcher: ps.fetcher(), KV: kv, Now: clock,
			Fetched: func(string, error) { fetches.Add(1) }}
	}
	a, b := newPolicies(), newPolicies() // two deliverers

	p, err := a.Lookup(ctx, "example.org")
	if err != nil || p == nil || p.Mode != Enforce || p.ID != "one" {
		t.Fatalf("first lookup: %+v, %v", p, err)
	}
	if ps.hits.Load() != 1 {
		t.Fatalf("%d fetches, want 1", ps.hits.Load())
	}

	t.Run("another deliverer finds it in the bucket without fetching", func(t *testing.T) {
		p, err := b.Lookup(ctx, "example.org")
		if err != nil || p == nil || p.ID != "one" || ps.hits.Load() != 1 {
			t.Fatalf("%+v, %v, %d fetches", p, err, ps.hits.Load())
		}
	})

	t.Run("concurrent lookups of a new policy share one fetch", func(t *testing.T) {
		c := newPolicies()
		ps.set("concurrent.test", enforceBody)
		zone.set("concurrent.test", "v=STSv1; id=c1;")
		before := ps.hits.Load()
		var wg sync.WaitGroup
		for range 20 {
			wg.Go(func() {
				if p, err := c.Lookup(ctx, "concurrent.test"); p == nil {
					t.Errorf("no policy: %v", err)
				}
			})
		}
		wg.Wait()
		if n := ps.hits.Load() - before; n != 1 {
			t.Errorf("%d fetches for 20 lookups, want 1", n)
		}
	})

	t.Run("the record gone or the DNS failing: the cached policy holds until it expires", func(t *testing.T) {
		zone.set("example.org")
		if p, _ := b.Lookup(ctx, "example.org"); p == nil || p.Mode != Enforce {
			t.Errorf("record deleted: %+v", p)
		}
		zone.mu.Lock()
		zone.fail = true
		zone.mu.Unlock()
		if p, _ := a.Lookup(ctx, "example.org"); p == nil || p.Mode != Enforce {
			t.Errorf("DNS failing: %+v", p)
		}
		zone.mu.Lock()
		zone.fail = false
		zone.mu.Unlock()
		zone.set("example.org", "v=STSv1; id=one;")
	})

	t.Run("a new id fetches the new policy; a failed fetch keeps the old one", func(t *testing.T) {
		ps.set("example.org", "version: STSv1\nmode: testing\nmx: mx.example.org\nmax_age: 86400\n")
		zone.set("example.org", "v=STSv1; id=two;")
		p, err := a.Lookup(ctx, "example.org")
		if err != nil || p.Mode != Testing || p.ID != "two" {
			t.Fatalf("%+v, %v", p, err)
		}
		advance(time.Minute) // past b's copy of the bucket's entry
		if p, _ := b.Lookup(ctx, "example.org"); p.ID != "two" {
			t.Errorf("the other deliverer has %q", p.ID)
		}
		ps.set("example.org", "garbage")
		zone.set("example.org", "v=STSv1; id=three;")
		hits := ps.hits.Load()
		p, err = a.Lookup(ctx, "example.org")
		var fe *FetchError
		if !errors.As(err, &fe) || fe.Result != ResultPolicyInvalid || p == nil || p.ID != "two" {
			t.Fatalf("%+v, %v; want policy two and the fetch error", p, err)
		}
		// Not fetched again at once.
		if p, _ := a.Lookup(ctx, "example.org"); p.ID != "two" || ps.hits.Load() != hits+1 {
			t.Errorf("%+v, %d fetches since", p, ps.hits.Load()-hits)
		}
		ps.set("example.org", enforceBody)
		advance(failBackoff + time.Second)
		if p, err := a.Lookup(ctx, "example.org"); err != nil || p.ID != "three" || p.Mode != Enforce {
			t.Errorf("after the backoff: %+v, %v", p, err)
		}
	})

	t.Run("an expired policy without a record is gone; with one it is fetched again", func(t *testing.T) {
		zone.set("example.org")
		advance(86400*time.Second + time.Minute)
		if p, err := a.Lookup(ctx, "example.org"); p != nil || err != nil {
			t.Errorf("expired, no record: %+v, %v", p, err)
		}
		zone.set("example.org", "v=STSv1; id=three;")
		hits := ps.hits.Load()
		if p, err := a.Lookup(ctx, "example.org"); err != nil || p == nil || ps.hits.Load() != hits+1 {
			t.Errorf("expired, record back: %+v, %v, %d fetches", p, err, ps.hits.Load()-hits)
		}
	})

	t.Run("half-way through max_age it is fetched again under the same id", func(t *testing.T) {
		hits := ps.hits.Load()
		advance(12*time.Hour + time.Minute)
		if p, err := a.Lookup(ctx, "example.org"); err != nil || p == nil || ps.hits.Load() != hits+1 {
			t.Errorf("%+v, %v, %d fetches", p, err, ps.hits.Load()-hits)
		}
	})

	t.Run("no record, nothing cached: no policy and no fetch", func(t *testing.T) {
		hits := ps.hits.Load()
		if p, err := a.Lookup(ctx, "plain.test"); p != nil || err != nil || ps.hits.Load() != hits {
			t.Errorf("%+v, %v", p, err)
		}
	})

	t.Run("a policy of max_age 0 is used for a minute, not fetched per delivery", func(t *testing.T) {
		ps.set("concurrent.test", "version: STSv1\nmode: enforce\nmx: mx.concurrent.test\nmax_age: 0\n")
		zone.set("concurrent.test", "v=STSv1; id=zero;")
		hits := ps.hits.Load()
		for range 5 {
			if p, err := a.Lookup(ctx, "concurrent.test"); err != nil || p == nil || p.ID != "zero" {
				t.Fatalf("%+v, %v", p, err)
			}
		}
		if n := ps.hits.Load() - hits; n != 1 {
			t.Errorf("%d fetches, want 1", n)
		}
		advance(time.Minute + time.Second)
		if p, _ := a.Lookup(ctx, "concurrent.test"); p == nil || ps.hits.Load()-hits != 2 {
			t.Errorf("a minute later: %+v, %d fetches", p, ps.hits.Load()-hits)
		}
	})

	t.Run("an address literal or a name that is no domain has no policy and asks nothing", func(t *testing.T) {
		for _, d := range []string{"[192.0.2.1]", "[IPv6:2001:db8::1]", "a..b", ""} {
			if p, err := a.Lookup(ctx, d); p != nil || err != nil {
				t.Errorf("%q: %+v, %v", d, p, err)
			}
		}
	})

	t.Run("an internationalized domain is looked up and cached by its A-labels", func(t *testing.T) {
		zone.set("xn--bcher-kva.example", "v=STSv1; id=u1;")
		ps.set("xn--bcher-kva.example", enforceBody)
		// The test CA does not name it: the fetch fails, under the A-label name.
		_, err := a.Lookup(ctx, "Bücher.example.")
		var fe *FetchError
		if !errors.As(err, &fe) || fe.Domain != "xn--bcher-kva.example" {
			t.Errorf("%v", err)
		}
	})
	if fetches.Load() == 0 {
		t.Error("Fetched was never called")
	}
}
