package resolve

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/deliverer/failure"
	"github.com/jetmail/jetmail/internal/dnstest"
	"github.com/miekg/dns"
)

// newResolver returns a Resolver asking d, with us.example (192.0.2.53)
// being this cluster.
func newResolver(d *dnstest.Server) *Resolver {
	return &Resolver{
		Servers: []string{d.Addr},
		Timeout: 5 * time.Second,
		IsLocal: func(host string, addr netip.Addr) bool {
			return host == "mx.us.example" || addr == netip.MustParseAddr("192.0.2.53")
		},
	}
}

func hopStrings(hops []Hop) []string {
	var out []string
	for _, h := range hops {
		out = append(out, fmt.Sprintf("%d %s %s", h.Pref, h.Host, h.Addr))
	}
	return out
}

// checkError fails unless err is an *Error with the given class and codes.
func checkError(t *testing.T, err error, want *failure.Error) {
	t.Helper()
	var e *failure.Error
	if !errors.As(err, &e) {
		t.Fatalf("error = %v (%T), want *failure.Error %d %s", err, err, want.Code, want.Enhanced)
	}
	if e.Permanent != want.Permanent || e.Code != want.Code || e.Enhanced != want.Enhanced {
		t.Fatalf("error = %+v, want permanent=%v %d %s", e, want.Permanent, want.Code, want.Enhanced)
	}
}

func TestLookup(t *testing.T) {
	tests := map[string]struct {
		zone    []string
		rcodes  map[string]int
		noChase bool
		domain  string
		want    []string // hops as "pref host addr:port"
		wantErr *failure.Error
		noDNS   bool // the answer needs no query at all
	}{
		"MX hosts are tried by preference, IPv4 before IPv6": {
			zone: []string{
				"example.com. 300 IN MX 20 mx2.example.com.",
				"example.com. 300 IN MX 30 mx3.example.com.",
				"example.com. 300 IN MX 10 mx1.example.com.",
				"mx1.example.com. 300 IN AAAA 2001:db8::1",
				"mx1.example.com. 300 IN A 192.0.2.1",
				"mx2.example.com. 300 IN A 192.0.2.2",
				"mx3.example.com. 300 IN AAAA 2001:db8::3",
			},
			domain: "example.com",
			want: []string{
				"10 mx1.example.com 192.0.2.1:25",
				"10 mx1.example.com [2001:db8::1]:25",
				"20 mx2.example.com 192.0.2.2:25",
				"30 mx3.example.com [2001:db8::3]:25",
			},
		},
		"names are lower-cased and lose their trailing dot": {
			zone: []string{
				"example.com. 300 IN MX 10 MX1.Example.COM.",
				"mx1.example.com. 300 IN A 192.0.2.1",
			},
			domain: "Example.COM.",
			want:   []string{"10 mx1.example.com 192.0.2.1:25"},
		},
		"a domain without MX records is its own implicit MX": {
			zone: []string{
				"example.com. 300 IN A 192.0.2.7",
				"example.com. 300 IN AAAA 2001:db8::7",
			},
			domain: "example.com",
			want: []string{
				"0 example.com 192.0.2.7:25",
				"0 example.com [2001:db8::7]:25",
			},
		},
		"a domain without MX or address records bounces": {
			zone:    []string{`example.com. 300 IN TXT "v=spf1 -all"`},
			domain:  "example.com",
			wantErr: failure.Permanent(550, "5.1.2", ""),
		},
		"a null MX bounces": {
			zone:    []string{"example.com. 300 IN MX 0 ."},
			domain:  "example.com",
			wantErr: failure.Permanent(556, "5.1.10", ""),
		},
		"a null MX next to real MX records is ignored": {
			zone: []string{
				"example.com. 300 IN MX 0 .",
				"example.com. 300 IN MX 10 mx1.example.com.",
				"mx1.example.com. 300 IN A 192.0.2.1",
			},
			domain: "example.com",
			want:   []string{"10 mx1.example.com 192.0.2.1:25"},
		},
		"a nonexistent domain bounces": {
			domain:  "nowhere.example",
			wantErr: failure.Permanent(550, "5.1.2", ""),
		},
		"a SERVFAIL for the domain defers": {
			rcodes:  map[string]int{"example.com.": dns.RcodeServerFailure},
			domain:  "example.com",
			wantErr: failure.Temporary(451, "4.4.3", ""),
		},
		"a REFUSED for the domain defers": {
			rcodes:  map[string]int{"example.com.": dns.RcodeRefused},
			domain:  "example.com",
			wantErr: failure.Temporary(451, "4.4.3", ""),
		},
		"an MX host without an address is skipped": {
			zone: []string{
				"example.com. 300 IN MX 10 gone.example.com.",
				"example.com. 300 IN MX 20 mx2.example.com.",
				"mx2.example.com. 300 IN A 192.0.2.2",
			},
			domain: "example.com",
			want:   []string{"20 mx2.example.com 192.0.2.2:25"},
		},
		"an MX host whose lookup fails is skipped": {
			zone: []string{
				"example.com. 300 IN MX 10 broken.example.com.",
				"example.com. 300 IN MX 20 mx2.example.com.",
				"mx2.example.com. 300 IN A 192.0.2.2",
			},
			rcodes: map[string]int{"broken.example.com.": dns.RcodeServerFailure},
			domain: "example.com",
			want:   []string{"20 mx2.example.com 192.0.2.2:25"},
		},
		"MX hosts that cannot be resolved, one of them temporarily, defer": {
			zone: []string{
				"example.com. 300 IN MX 10 broken.example.com.",
				"example.com. 300 IN MX 20 gone.example.com.",
			},
			rcodes:  map[string]int{"broken.example.com.": dns.RcodeServerFailure},
			domain:  "example.com",
			wantErr: failure.Temporary(451, "4.4.3", ""),
		},
		"MX hosts that all do not exist bounce": {
			zone: []string{
				"example.com. 300 IN MX 10 gone1.example.com.",
				"example.com. 300 IN MX 20 gone2.example.com.",
			},
			domain:  "example.com",
			wantErr: failure.Permanent(550, "5.4.4", ""),
		},
		"an MX host that exists without addresses has no address": {
			zone: []string{
				"example.com. 300 IN MX 10 mx1.example.com.",
				`mx1.example.com. 300 IN TXT "no address"`,
			},
			domain:  "example.com",
			wantErr: failure.Permanent(550, "5.4.4", ""),
		},
		"a less preferred MX that is this cluster is skipped": {
			zone: []string{
				"example.com. 300 IN MX 10 mx1.example.com.",
				"example.com. 300 IN MX 20 mx.us.example.",
				"mx1.example.com. 300 IN A 192.0.2.1",
				"mx.us.example. 300 IN A 192.0.2.50",
			},
			domain: "example.com",
			want:   []string{"10 mx1.example.com 192.0.2.1:25"},
		},
		"an only MX that is this cluster is a loop": {
			zone: []string{
				"example.com. 300 IN MX 10 mx.us.example.",
				"mx.us.example. 300 IN A 192.0.2.50",
			},
			domain:  "example.com",
			wantErr: failure.Permanent(554, "5.4.6", ""),
		},
		"an MX host with one of our addresses is a loop": {
			zone: []string{
				"example.com. 300 IN MX 10 alias.example.com.",
				"alias.example.com. 300 IN A 192.0.2.53",
			},
			domain:  "example.com",
			wantErr: failure.Permanent(554, "5.4.6", ""),
		},
		"MX hosts less preferred than this cluster are not used (RFC 5321 section 5.1)": {
			zone: []string{
				"example.com. 300 IN MX 10 mx.us.example.",
				"example.com. 300 IN MX 20 backup.example.com.",
				"backup.example.com. 300 IN A 192.0.2.20",
			},
			domain:  "example.com",
			wantErr: failure.Permanent(554, "5.4.6", ""),
		},
		"an implicit MX that is this cluster is a loop": {
			zone:    []string{"example.com. 300 IN A 192.0.2.53"},
			domain:  "example.com",
			wantErr: failure.Permanent(554, "5.4.6", ""),
		},
		"an MX host behind a CNAME is reached through it": {
			zone: []string{
				"example.com. 300 IN MX 10 mx1.example.com.",
				"mx1.example.com. 300 IN CNAME real.example.net.",
				"real.example.net. 300 IN A 192.0.2.9",
			},
			domain: "example.com",
			want:   []string{"10 mx1.example.com 192.0.2.9:25"},
		},
		"a CNAME the server does not chase is looked up": {
			zone: []string{
				"example.com. 300 IN MX 10 mx1.example.com.",
				"mx1.example.com. 300 IN CNAME hop.example.net.",
				"hop.example.net. 300 IN CNAME real.example.net.",
				"real.example.net. 300 IN A 192.0.2.9",
			},
			noChase: true,
			domain:  "example.com",
			want:    []string{"10 mx1.example.com 192.0.2.9:25"},
		},
		"an address shared by two MX hosts is tried once": {
			zone: []string{
				"example.com. 300 IN MX 10 mx1.example.com.",
				"example.com. 300 IN MX 20 mx2.example.com.",
				"mx1.example.com. 300 IN A 192.0.2.1",
				"mx2.example.com. 300 IN A 192.0.2.1",
			},
			domain: "example.com",
			want:   []string{"10 mx1.example.com 192.0.2.1:25"},
		},
		"an IPv4 address literal needs no DNS": {
			domain: "[192.0.2.1]",
			want:   []string{"0 192.0.2.1 192.0.2.1:25"},
			noDNS:  true,
		},
		"an IPv6 address literal needs no DNS": {
			domain: "[ipv6:2001:DB8::1]",
			want:   []string{"0 2001:db8::1 [2001:db8::1]:25"},
			noDNS:  true,
		},
		"an address literal of this cluster is a loop": {
			domain:  "[192.0.2.53]",
			wantErr: failure.Permanent(554, "5.4.6", ""),
			noDNS:   true,
		},
		"a malformed address literal bounces": {
			domain:  "[192.0.2.300]",
			wantErr: failure.Permanent(550, "5.1.2", ""),
			noDNS:   true,
		},
		"an IPv6 address literal without its tag bounces": {
			domain:  "[2001:db8::1]",
			wantErr: failure.Permanent(550, "5.1.2", ""),
			noDNS:   true,
		},
		"an empty domain bounces": {
			domain:  "",
			wantErr: failure.Permanent(550, "5.1.2", ""),
			noDNS:   true,
		},
		"a domain with a space bounces": {
			domain:  "exa mple.com",
			wantErr: failure.Permanent(550, "5.1.2", ""),
			noDNS:   true,
		},
		"a domain with an empty label bounces": {
			domain:  "example..com",
			wantErr: failure.Permanent(550, "5.1.2", ""),
			noDNS:   true,
		},
		"a domain with a label starting with a hyphen bounces": {
			domain:  "-example.com",
			wantErr: failure.Permanent(550, "5.1.2", ""),
			noDNS:   true,
		},
		"a domain over 253 octets bounces": {
			domain:  strings.Repeat(strings.Repeat("a", 63)+".", 4) + "com",
			wantErr: failure.Permanent(550, "5.1.2", ""),
			noDNS:   true,
		},
		"a domain with a label over 63 octets bounces": {
			domain:  strings.Repeat("a", 64) + ".com",
			wantErr: failure.Permanent(550, "5.1.2", ""),
			noDNS:   true,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			d := dnstest.Start(t)
			d.Add(t, tc.zone...)
			d.Set(func(d *dnstest.Server) {
				for n, rc := range tc.rcodes {
					d.Rcodes[n] = rc
				}
				d.NoChase = tc.noChase
			})
			hops, err := newResolver(d).Lookup(context.Background(), tc.domain)
			if tc.wantErr != nil {
				checkError(t, err, tc.wantErr)
				if hops != nil {
					t.Errorf("hops = %v with an error", hopStrings(hops))
				}
			} else {
				if err != nil {
					t.Fatalf("Lookup: %v", err)
				}
				if got := hopStrings(hops); !slices.Equal(got, tc.want) {
					t.Errorf("hops =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
				}
			}
			if n := d.Total(); tc.noDNS && n != 0 {
				t.Errorf("%d DNS queries, want none", n)
			}
		})
	}
}

func TestLookupShufflesEqualPreferences(t *testing.T) {
	d := dnstest.Start(t)
	d.Add(t,
		"example.com. 300 IN MX 10 a.example.com.",
		"example.com. 300 IN MX 10 b.example.com.",
		"example.com. 300 IN MX 20 c.example.com.",
		"a.example.com. 300 IN A 192.0.2.1",
		"b.example.com. 300 IN A 192.0.2.2",
		"c.example.com. 300 IN A 192.0.2.3",
	)
	r := newResolver(d)
	const calls = 200
	aFirst := 0
	for range calls {
		hops, err := r.Lookup(context.Background(), "example.com")
		if err != nil {
			t.Fatal(err)
		}
		hosts := []string{hops[0].Host, hops[1].Host, hops[2].Host}
		switch {
		case slices.Equal(hosts, []string{"a.example.com", "b.example.com", "c.example.com"}):
			aFirst++
		case slices.Equal(hosts, []string{"b.example.com", "a.example.com", "c.example.com"}):
		default:
			t.Fatalf("hops in order %v", hosts)
		}
	}
	// Binomial(200, 0.5) falls outside [60, 140] with probability < 1e-8.
	if aFirst < calls*30/100 || aFirst > calls*70/100 {
		t.Errorf("a.example.com came first %d times out of %d", aFirst, calls)
	}
	if n := d.Count("example.com", dns.TypeMX); n != 1 {
		t.Errorf("%d MX queries, want 1 (the rest from the cache)", n)
	}
}

func TestLookupNeverUsesMXHostsAsPreferredAsThisCluster(t *testing.T) {
	d := dnstest.Start(t)
	d.Add(t,
		"example.com. 300 IN MX 10 mx.us.example.",
		"example.com. 300 IN MX 10 peer.example.com.",
		"peer.example.com. 300 IN A 192.0.2.10",
	)
	r := newResolver(d)
	// The order of equal preferences is random: the peer is resolved before
	// this cluster's own MX in about half of the calls.
	for range 50 {
		hops, err := r.Lookup(context.Background(), "example.com")
		checkError(t, err, failure.Permanent(554, "5.4.6", ""))
		if hops != nil {
			t.Fatalf("hops = %v", hopStrings(hops))
		}
	}
	if d.Count("peer.example.com", dns.TypeA) == 0 {
		t.Error("the peer was never resolved before this cluster's MX: the test proves nothing")
	}
}

func TestLookupDefersWhenTheServerNeverAnswers(t *testing.T) {
	d := dnstest.Start(t)
	d.Set(func(d *dnstest.Server) { d.Silent["example.com."] = true })
	r := newResolver(d)
	r.Timeout = 200 * time.Millisecond
	start := time.Now()
	_, err := r.Lookup(context.Background(), "example.com")
	checkError(t, err, failure.Temporary(451, "4.4.3", ""))
	if elapsed := time.Since(start); elapsed > 3*time.Second {
		t.Errorf("Lookup took %v with a 200ms timeout", elapsed)
	}
}

func TestLookupStopsWhenTheContextIsCancelled(t *testing.T) {
	d := dnstest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d.Set(func(d *dnstest.Server) {
		d.Silent["example.com."] = true
		d.OnQuery = cancel
	})
	r := newResolver(d)
	r.Timeout = time.Minute
	start := time.Now()
	_, err := r.Lookup(ctx, "example.com")
	checkError(t, err, failure.Temporary(451, "4.4.3", ""))
	if elapsed := time.Since(start); elapsed > 10*time.Second {
		t.Errorf("Lookup took %v after its context was cancelled", elapsed)
	}
}

func TestLookupTriesTheNextServerAfterAFailure(t *testing.T) {
	bad := dnstest.Start(t)
	bad.Set(func(d *dnstest.Server) { d.Rcodes["example.com."] = dns.RcodeServerFailure })
	good := dnstest.Start(t)
	good.Add(t, "example.com. 300 IN A 192.0.2.7")
	r := newResolver(good)
	r.Servers = []string{bad.Addr, good.Addr}
	hops, err := r.Lookup(context.Background(), "example.com")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := hopStrings(hops), []string{"0 example.com 192.0.2.7:25"}; !slices.Equal(got, want) {
		t.Errorf("hops = %v, want %v", got, want)
	}
	if bad.Count("example.com", dns.TypeMX) != 1 {
		t.Error("the first server was not asked")
	}
}

func TestLookupCachesAnswersForTheirTTL(t *testing.T) {
	d := dnstest.Start(t)
	d.Add(t,
		"example.com. 300 IN MX 10 mx1.example.com.",
		"mx1.example.com. 600 IN A 192.0.2.1",
	)
	// mx1 has no AAAA: NODATA, cached for the SOA minimum (120s).
	clock := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	r := newResolver(d)
	r.Now = func() time.Time { return clock }
	counts := func() [3]int {
		return [3]int{
			d.Count("example.com", dns.TypeMX),
			d.Count("mx1.example.com", dns.TypeA),
			d.Count("mx1.example.com", dns.TypeAAAA),
		}
	}
	steps := []struct {
		after time.Duration
		want  [3]int // MX, A, AAAA queries so far
	}{
		{0, [3]int{1, 1, 1}},                 // MX until 300, A until 600, AAAA until 120
		{119 * time.Second, [3]int{1, 1, 1}}, // all cached
		{121 * time.Second, [3]int{1, 1, 2}}, // AAAA again, until 241
		{299 * time.Second, [3]int{1, 1, 3}}, // AAAA again, until 419
		{301 * time.Second, [3]int{2, 1, 3}}, // MX again, until 601
		{599 * time.Second, [3]int{2, 1, 4}}, // AAAA again, until 719
		{601 * time.Second, [3]int{3, 2, 4}}, // MX and A again
	}
	start := clock
	for _, step := range steps {
		clock = start.Add(step.after)
		hops, err := r.Lookup(context.Background(), "EXAMPLE.com")
		if err != nil {
			t.Fatalf("at +%v: %v", step.after, err)
		}
		if got, want := hopStrings(hops), []string{"10 mx1.example.com 192.0.2.1:25"}; !slices.Equal(got, want) {
			t.Fatalf("at +%v: hops = %v", step.after, got)
		}
		if got := counts(); got != step.want {
			t.Errorf("at +%v: MX, A, AAAA queries = %v, want %v", step.after, got, step.want)
		}
	}
}

func TestLookupCapsCachedTTLs(t *testing.T) {
	tests := map[string]struct {
		ttl         int
		stillCached time.Duration
		expired     time.Duration
	}{
		"a day-long TTL is cached for an hour": {ttl: 86400, stillCached: 3599 * time.Second, expired: 3601 * time.Second},
		"a zero TTL is not cached":             {ttl: 0, stillCached: -1, expired: 0},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			d := dnstest.Start(t)
			d.Add(t, fmt.Sprintf("example.com. %d IN MX 10 mx1.example.com.", tc.ttl),
				"mx1.example.com. 300 IN A 192.0.2.1")
			start := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
			clock := start
			r := newResolver(d)
			r.Now = func() time.Time { return clock }
			lookup := func() {
				t.Helper()
				if _, err := r.Lookup(context.Background(), "example.com"); err != nil {
					t.Fatal(err)
				}
			}
			lookup()
			if tc.stillCached >= 0 {
				clock = start.Add(tc.stillCached)
				lookup()
				if n := d.Count("example.com", dns.TypeMX); n != 1 {
					t.Errorf("at +%v: %d MX queries, want 1", tc.stillCached, n)
				}
			}
			clock = start.Add(tc.expired)
			lookup()
			if n := d.Count("example.com", dns.TypeMX); n != 2 {
				t.Errorf("at +%v: %d MX queries, want 2", tc.expired, n)
			}
		})
	}
}

func TestLookupCachesNegativeAnswers(t *testing.T) {
	tests := map[string]struct {
		soa         string // "" for none
		stillCached time.Duration
		expired     time.Duration
	}{
		"NXDOMAIN is cached for the SOA minimum": {
			soa:         "example. 3600 IN SOA ns.example. h.example. 1 3600 600 86400 120",
			stillCached: 119 * time.Second, expired: 121 * time.Second,
		},
		"NXDOMAIN is cached no longer than the SOA's own TTL": {
			soa:         "example. 30 IN SOA ns.example. h.example. 1 3600 600 86400 120",
			stillCached: 29 * time.Second, expired: 31 * time.Second,
		},
		"NXDOMAIN is cached for five minutes at most": {
			soa:         "example. 86400 IN SOA ns.example. h.example. 1 3600 600 86400 86400",
			stillCached: 299 * time.Second, expired: 301 * time.Second,
		},
		"NXDOMAIN without an SOA is cached for a minute": {
			stillCached: 59 * time.Second, expired: 61 * time.Second,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			d := dnstest.Start(t)
			d.Set(func(d *dnstest.Server) {
				d.SOA = nil
				if tc.soa != "" {
					d.SOA = dnstest.MustRR(t, tc.soa).(*dns.SOA)
				}
			})
			start := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
			clock := start
			r := newResolver(d)
			r.Now = func() time.Time { return clock }
			for _, step := range []struct {
				at   time.Duration
				want int
			}{{0, 1}, {tc.stillCached, 1}, {tc.expired, 2}} {
				clock = start.Add(step.at)
				_, err := r.Lookup(context.Background(), "nowhere.example")
				checkError(t, err, failure.Permanent(550, "5.1.2", ""))
				if n := d.Count("nowhere.example", dns.TypeMX); n != step.want {
					t.Errorf("at +%v: %d queries, want %d", step.at, n, step.want)
				}
			}
		})
	}
}

func TestLookupDoesNotCacheTemporaryFailures(t *testing.T) {
	d := dnstest.Start(t)
	d.Add(t, "example.com. 300 IN A 192.0.2.7")
	d.Set(func(d *dnstest.Server) { d.Rcodes["example.com."] = dns.RcodeServerFailure })
	r := newResolver(d)
	_, err := r.Lookup(context.Background(), "example.com")
	checkError(t, err, failure.Temporary(451, "4.4.3", ""))

	d.Set(func(d *dnstest.Server) { delete(d.Rcodes, "example.com.") })
	hops, err := r.Lookup(context.Background(), "example.com")
	if err != nil {
		t.Fatalf("after the server recovered: %v", err)
	}
	if len(hops) != 1 {
		t.Errorf("hops = %v", hopStrings(hops))
	}
	if n := d.Count("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d MX queries, want 2", n)
	}
}

func TestLookupUsesTheConfiguredPort(t *testing.T) {
	d := dnstest.Start(t)
	d.Add(t,
		"example.com. 300 IN MX 10 mx1.example.com.",
		"mx1.example.com. 300 IN A 192.0.2.1",
		"mx1.example.com. 300 IN AAAA 2001:db8::1",
	)
	r := newResolver(d)
	r.Port = 2525
	for domain, want := range map[string][]string{
		"example.com": {"10 mx1.example.com 192.0.2.1:2525", "10 mx1.example.com [2001:db8::1]:2525"},
		"[192.0.2.9]": {"0 192.0.2.9 192.0.2.9:2525"},
	} {
		hops, err := r.Lookup(context.Background(), domain)
		if err != nil {
			t.Fatalf("%s: %v", domain, err)
		}
		if got := hopStrings(hops); !slices.Equal(got, want) {
			t.Errorf("%s: hops = %v, want %v", domain, got, want)
		}
	}
}

func TestLookupRetriesTruncatedAnswersOverTCP(t *testing.T) {
	d := dnstest.Start(t)
	d.Add(t,
		"example.com. 300 IN MX 10 mx1.example.com.",
		"mx1.example.com. 300 IN A 192.0.2.1",
	)
	d.Set(func(d *dnstest.Server) { d.TruncateUDP = true })
	hops, err := newResolver(d).Lookup(context.Background(), "example.com")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := hopStrings(hops), []string{"10 mx1.example.com 192.0.2.1:25"}; !slices.Equal(got, want) {
		t.Errorf("hops = %v, want %v", got, want)
	}
	var tcp int
	d.Set(func(d *dnstest.Server) { tcp = d.TCPQueries })
	// MX, A and AAAA: each once over UDP, once over TCP.
	if tcp != 3 {
		t.Errorf("%d TCP queries, want 3", tcp)
	}
}

func TestLookupSendsRecursiveQueriesWithEDNS0(t *testing.T) {
	d := dnstest.Start(t)
	d.Add(t, "example.com. 300 IN A 192.0.2.7")
	if _, err := newResolver(d).Lookup(context.Background(), "example.com"); err != nil {
		t.Fatal(err)
	}
	var last *dns.Msg
	d.Set(func(d *dnstest.Server) { last = d.Last })
	if !last.RecursionDesired {
		t.Error("RD bit not set")
	}
	opt := last.IsEdns0()
	if opt == nil {
		t.Fatal("no EDNS0 OPT record")
	}
	if opt.UDPSize() != 1232 {
		t.Errorf("EDNS0 buffer size %d, want 1232", opt.UDPSize())
	}
}

func TestResolverResolveHost(t *testing.T) {
	tests := map[string]struct {
		host    string
		port    uint16
		want    []string
		wantErr *failure.Error
		noDNS   bool
	}{
		"a name resolves to its IPv4 then its IPv6 addresses": {
			host: "Relay.Example.NET.", port: 587,
			want: []string{"0 relay.example.net 192.0.2.25:587", "0 relay.example.net [2001:db8::25]:587"},
		},
		"a port of zero means the resolver's port": {
			host: "relay.example.net",
			want: []string{"0 relay.example.net 192.0.2.25:25", "0 relay.example.net [2001:db8::25]:25"},
		},
		"a name behind a CNAME keeps its own name": {
			host: "smarthost.example.net", port: 25,
			want: []string{"0 smarthost.example.net 192.0.2.25:25", "0 smarthost.example.net [2001:db8::25]:25"},
		},
		"an IPv4 address needs no DNS": {
			host: "192.0.2.1", port: 25,
			want:  []string{"0 192.0.2.1 192.0.2.1:25"},
			noDNS: true,
		},
		"an IPv6 address needs no DNS": {
			host: "2001:db8::1", port: 2525,
			want:  []string{"0 2001:db8::1 [2001:db8::1]:2525"},
			noDNS: true,
		},
		"an address in brackets needs no DNS": {
			host: "[2001:db8::1]", port: 25,
			want:  []string{"0 2001:db8::1 [2001:db8::1]:25"},
			noDNS: true,
		},
		"an address of this cluster is allowed for a route": {
			host: "192.0.2.53", port: 10025,
			want:  []string{"0 192.0.2.53 192.0.2.53:10025"},
			noDNS: true,
		},
		"a nonexistent route host defers": {
			host: "gone.example.net", port: 25,
			wantErr: failure.Temporary(451, "4.4.4", ""),
		},
		"a route host whose lookup fails defers": {
			host: "broken.example.net", port: 25,
			wantErr: failure.Temporary(451, "4.4.3", ""),
		},
		"an invalid route host defers": {
			host: "bad host", port: 25,
			wantErr: failure.Temporary(451, "4.3.5", ""),
			noDNS:   true,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			d := dnstest.Start(t)
			d.Add(t,
				"relay.example.net. 300 IN A 192.0.2.25",
				"relay.example.net. 300 IN AAAA 2001:db8::25",
				"smarthost.example.net. 300 IN CNAME relay.example.net.",
			)
			d.Set(func(d *dnstest.Server) { d.Rcodes["broken.example.net."] = dns.RcodeServerFailure })
			hops, err := newResolver(d).ResolveHost(context.Background(), tc.host, tc.port)
			if tc.wantErr != nil {
				checkError(t, err, tc.wantErr)
			} else {
				if err != nil {
					t.Fatalf("ResolveHost: %v", err)
				}
				if got := hopStrings(hops); !slices.Equal(got, tc.want) {
					t.Errorf("hops = %v, want %v", got, tc.want)
				}
			}
			if n := d.Total(); tc.noDNS && n != 0 {
				t.Errorf("%d DNS queries, want none", n)
			}
		})
	}
}

func TestLookupFindsAnInternationalisedDomainByItsALabel(t *testing.T) {
	d := dnstest.Start(t)
	d.Add(t, "xn--bcher-kva.example. 300 IN MX 10 mx.xn--bcher-kva.example.",
		"mx.xn--bcher-kva.example. 300 IN A 127.0.0.5")
	hops, err := newResolver(d).Lookup(context.Background(), "Bücher.example")
	if err != nil {
		t.Fatal(err)
	}
	if len(hops) != 1 || hops[0].Addr.Addr().String() != "127.0.0.5" {
		t.Fatalf("hops %v", hopStrings(hops))
	}
}
