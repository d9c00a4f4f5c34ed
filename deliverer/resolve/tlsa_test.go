package resolve

import (
	"context"
	"testing"

	"github.com/miekg/dns"

	"github.com/jetmail/jetmail/internal/dnstest"
)

// signedZone publishes example.net with MX hosts in a signed zone
// (mx.signed.test) and an unsigned one (mx.plain.test), each with TLSA
// records at port 25.
func signedZone(t *testing.T) *dnstest.Server {
	t.Helper()
	d := dnstest.Start(t)
	d.Add(t,
		"example.net. 60 IN MX 10 mx.signed.test.",
		"example.net. 60 IN MX 20 mx.plain.test.",
		"mx.signed.test. 60 IN A 192.0.2.10",
		"mx.plain.test. 60 IN A 192.0.2.20",
		"alias.signed.test. 60 IN CNAME mx.plain.test.",
		"_25._tcp.mx.signed.test. 60 IN TLSA 3 1 1 "+"ab"+"0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab"+"cd",
		"_25._tcp.mx.plain.test. 60 IN TLSA 3 1 1 "+"ab"+"0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab"+"cd",
		"signed.net. 60 IN MX 10 mx.signed.test.",
	)
	d.Set(func(d *dnstest.Server) {
		d.Signed["signed.test."] = true
		d.Signed["signed.net."] = true
	})
	return d
}

// lastQuery is the last query d got, read under its lock.
func lastQuery(d *dnstest.Server) *dns.Msg {
	var q *dns.Msg
	d.Set(func(d *dnstest.Server) { q = d.Last })
	return q
}

func TestDNSSEC(t *testing.T) {
	ctx := context.Background()

	t.Run("a hop is DNSSEC only when its MX and address answers were validated", func(t *testing.T) {
		d := signedZone(t)
		r := newResolver(d)
		r.DNSSEC = true
		hops, err := r.Lookup(ctx, "signed.net")
		if err != nil || len(hops) != 1 || !hops[0].DNSSEC {
			t.Fatalf("signed.net: %+v, %v; want one DNSSEC hop", hops, err)
		}
		// example.net's MX answer is not validated: neither host's TLSA
		// may be used (RFC 7672 §2.2.1), even the one in a signed zone.
		hops, err = r.Lookup(ctx, "example.net")
		if err != nil || len(hops) != 2 || hops[0].DNSSEC || hops[1].DNSSEC {
			t.Fatalf("example.net: %+v, %v; want two hops without DNSSEC", hops, err)
		}
		if q := lastQuery(d); q == nil || !q.AuthenticatedData || q.IsEdns0() == nil || !q.IsEdns0().Do() {
			t.Errorf("the last query did not ask for validation (AD and DO): %v", q)
		}
	})

	t.Run("a route host's address records decide alone; a CNAME into an unsigned zone is not validated", func(t *testing.T) {
		d := signedZone(t)
		r := newResolver(d)
		r.DNSSEC = true
		hops, err := r.ResolveHost(ctx, "mx.signed.test", 25)
		if err != nil || len(hops) != 1 || !hops[0].DNSSEC {
			t.Fatalf("mx.signed.test: %+v, %v", hops, err)
		}
		hops, err = r.ResolveHost(ctx, "alias.signed.test", 25)
		if err != nil || len(hops) != 1 || hops[0].DNSSEC {
			t.Fatalf("alias.signed.test: %+v, %v; want not DNSSEC", hops, err)
		}
	})

	t.Run("without DNSSEC the AD bit is neither asked for nor trusted", func(t *testing.T) {
		d := signedZone(t)
		d.Set(func(d *dnstest.Server) { d.Signed["."] = true })
		r := newResolver(d)
		hops, err := r.Lookup(ctx, "signed.net")
		if err != nil || len(hops) != 1 || hops[0].DNSSEC {
			t.Fatalf("%+v, %v; want a hop without DNSSEC", hops, err)
		}
		if q := lastQuery(d); q.AuthenticatedData || q.IsEdns0().Do() {
			t.Errorf("query asked for DNSSEC: %v", q)
		}
		recs, err := r.TLSA(ctx, "mx.signed.test", 25)
		if err != nil || recs != nil || d.Count("_25._tcp.mx.signed.test", dns.TypeTLSA) != 0 {
			t.Errorf("TLSA without DNSSEC: %v, %v, %d queries", recs, err, d.Count("_25._tcp.mx.signed.test", dns.TypeTLSA))
		}
	})

	t.Run("TLSA: validated records, unvalidated ones ignored, none, and a failed lookup", func(t *testing.T) {
		d := signedZone(t)
		d.Set(func(d *dnstest.Server) { d.Rcodes["_25._tcp.bogus.signed.test."] = dns.RcodeServerFailure })
		r := newResolver(d)
		r.DNSSEC = true
		recs, err := r.TLSA(ctx, "mx.signed.test", 25)
		if err != nil || len(recs) != 1 || recs[0].Usage != 3 {
			t.Errorf("signed: %v, %v", recs, err)
		}
		if recs, err := r.TLSA(ctx, "MX.Plain.Test.", 25); err != nil || recs != nil {
			t.Errorf("unsigned zone: %v, %v; want nothing", recs, err)
		}
		if recs, err := r.TLSA(ctx, "other.signed.test", 25); err != nil || recs != nil {
			t.Errorf("no records: %v, %v; want nothing", recs, err)
		}
		if recs, err := r.TLSA(ctx, "mx.signed.test", 587); err != nil || recs != nil {
			t.Errorf("another port: %v, %v; want nothing", recs, err)
		}
		if _, err := r.TLSA(ctx, "bogus.signed.test", 25); err == nil {
			t.Error("a SERVFAIL (bogus) TLSA lookup gave no error")
		}
	})

	t.Run("TXT joins each record's strings", func(t *testing.T) {
		d := dnstest.Start(t)
		d.AddTXT(t, "_mta-sts.example.org", "v=STSv1; id=20261203;")
		d.Add(t, `_mta-sts.example.org. 60 IN TXT "v=spf1" " -all"`)
		r := newResolver(d)
		got, err := r.TXT(ctx, "_mta-sts", "Example.ORG.")
		if err != nil || len(got) != 2 || got[0] != "v=STSv1; id=20261203;" || got[1] != "v=spf1 -all" {
			t.Errorf("%q, %v", got, err)
		}
		if got, err := r.TXT(ctx, "_mta-sts", "nothing.example.org"); err != nil || got != nil {
			t.Errorf("missing: %q, %v", got, err)
		}
	})
}
