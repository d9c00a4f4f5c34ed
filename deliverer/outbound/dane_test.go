package outbound

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"

	"github.com/jetmail/jetmail/deliverer/resolve"
	"github.com/jetmail/jetmail/internal/dnstest"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// tlsaRecord parses a record made by mxtest.TLSA.
func tlsaRecord(t *testing.T, line string) *dns.TLSA {
	t.Helper()
	return dnstest.MustRR(t, line).(*dns.TLSA)
}

// reports collects what a Client reports.
type reports struct {
	mu  sync.Mutex
	got []TLSReport
}

func (r *reports) add(x TLSReport) { r.mu.Lock(); r.got = append(r.got, x); r.mu.Unlock() }

func (r *reports) list() []TLSReport {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]TLSReport(nil), r.got...)
}

func (r *reports) want(t *testing.T, policy, result string, testing bool) {
	t.Helper()
	got := r.list()
	if len(got) != 1 || got[0].Policy != policy || got[0].Result != result || got[0].Testing != testing {
		t.Errorf("reports %+v, want one %s %s testing=%v", got, policy, result, testing)
	}
}

// daneServer is an MX on loopback presenting cert, and a hop to it named
// host.
func daneServer(t *testing.T, host string, cert tls.Certificate) (*mxtest.MX, resolve.Hop) {
	t.Helper()
	srv := mxtest.Start(t, &mxtest.MX{}, func(s *smtp.Server) { s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}} })
	hop := srv.Hop
	hop.Host = host
	return srv, hop
}

func caAnchor(ca *mxtest.CA) func(tls.Certificate) *x509.Certificate {
	return func(tls.Certificate) *x509.Certificate { return ca.Cert }
}

func daneSecurity(hop resolve.Hop, names []string, recs ...*dns.TLSA) Security {
	return Security{Level: policy.TLSOpportunistic, Hosts: map[string]HostSecurity{
		HostKey(hop): {Policy: PolicyDANE, Level: policy.TLSDANE, TLSA: recs, Names: names},
	}}
}

func TestDeliverDANE(t *testing.T) {
	ca := mxtest.NewCA(t, "Test CA")
	other := mxtest.NewCA(t, "Other CA")

	delivered := func(t *testing.T, srv *mxtest.MX, res []RcptResult) {
		t.Helper()
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); !res[0].TLS || len(txns) != 1 || !txns[0].TLS {
			t.Errorf("TLS %v, server transactions %+v", res[0].TLS, txns)
		}
		if res[0].TLSPolicy != "DANE" {
			t.Errorf("TLSPolicy %q, want DANE", res[0].TLSPolicy)
		}
	}
	refused := func(t *testing.T, srv *mxtest.MX, res []RcptResult, enhanced, text string) {
		t.Helper()
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, enhanced, text)
		if n := len(srv.Transactions()); n != 0 {
			t.Errorf("the server got %d transactions, want none", n)
		}
	}

	for _, tc := range []struct {
		name                        string
		usage, selector, matchingTy uint8
	}{
		{"DANE-EE SPKI SHA-256", 3, 1, 1},
		{"DANE-EE certificate SHA-512", 3, 0, 2},
		{"DANE-EE SPKI full", 3, 1, 0},
	} {
		t.Run(tc.name+" matches: delivered, whatever the certificate's names and dates", func(t *testing.T) {
			// Expired, and for another name: DANE-EE checks neither
			// (RFC 7672 §3.1.1).
			cert := other.Issue(t, time.Now().Add(-time.Hour), "elsewhere.test")
			srv, hop := daneServer(t, "mx.dane.test", cert)
			c := newTestClient(t)
			var rep reports
			c.Report = rep.add
			rec := tlsaRecord(t, mxtest.TLSA(t, "mx.dane.test", 25, tc.usage, tc.selector, tc.matchingTy, cert.Leaf))
			res := c.Deliver(context.Background(), []resolve.Hop{hop}, daneSecurity(hop, []string{"mx.dane.test"}, rec), nil, shortTimeouts(), 0, testTransfer("a@dane.test"))
			delivered(t, srv, res)
			rep.want(t, PolicyDANE, ResultSuccess, false)
			mxtest.CheckNoConnLeak(t, c, srv.Counter)
		})
	}

	t.Run("a certificate that matches no record: deferred 4.7.5, nothing sent", func(t *testing.T) {
		cert := ca.Issue(t, time.Time{}, "mx.dane.test")
		published := ca.Issue(t, time.Time{}, "mx.dane.test") // another key
		srv, hop := daneServer(t, "mx.dane.test", cert)
		c := newTestClient(t)
		c.RootCAs = ca.Pool // a certificate authority would vouch for it: DANE does not ask
		var rep reports
		c.Report = rep.add
		rec := tlsaRecord(t, mxtest.TLSA(t, "mx.dane.test", 25, 3, 1, 1, published.Leaf))
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, daneSecurity(hop, []string{"mx.dane.test"}, rec), nil, shortTimeouts(), 0, testTransfer("a@dane.test"))
		refused(t, srv, res, "4.7.5", "TLSA")
		rep.want(t, PolicyDANE, ResultValidationFailure, false)
		if srv.Accepted.Load() != 1 {
			t.Errorf("%d connections, want 1: no plaintext retry", srv.Accepted.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	// DANE-TA (RFC 7672 §3.1.2): the published anchor must be in the
	// server's chain above its certificate, which must be valid now and
	// name the host or the recipient domain.
	names := []string{"mx.dane.test", "dane.test"}
	for _, tc := range []struct {
		name     string
		cert     tls.Certificate
		selector uint8
		anchor   func(cert tls.Certificate) *x509.Certificate
		result   string // "": delivered
	}{
		{"the chain leads to the anchor and names the host", ca.Issue(t, time.Time{}, "mx.dane.test"), 1, caAnchor(ca), ""},
		{"a certificate for the recipient domain passes too", ca.Issue(t, time.Time{}, "dane.test"), 0, caAnchor(ca), ""},
		{"the anchor matches but the certificate names another host", ca.Issue(t, time.Time{}, "mx.elsewhere.test"), 1, caAnchor(ca), ResultHostMismatch},
		{"an expired certificate under the anchor", ca.Issue(t, time.Now().Add(-time.Minute), "mx.dane.test"), 1, caAnchor(ca), ResultExpired},
		{"the server's own certificate is no anchor", ca.Issue(t, time.Time{}, "mx.dane.test"), 1, func(c tls.Certificate) *x509.Certificate { return c.Leaf }, ResultValidationFailure},
	} {
		t.Run("DANE-TA: "+tc.name, func(t *testing.T) {
			srv, hop := daneServer(t, "mx.dane.test", tc.cert)
			c := newTestClient(t)
			var rep reports
			c.Report = rep.add
			rec := tlsaRecord(t, mxtest.TLSA(t, "mx.dane.test", 25, 2, tc.selector, 1, tc.anchor(tc.cert)))
			res := c.Deliver(context.Background(), []resolve.Hop{hop}, daneSecurity(hop, names, rec), nil, shortTimeouts(), 0, testTransfer("a@dane.test"))
			if tc.result == "" {
				delivered(t, srv, res)
				rep.want(t, PolicyDANE, ResultSuccess, false)
			} else {
				refused(t, srv, res, "4.7.5", "TLSA")
				rep.want(t, PolicyDANE, tc.result, false)
			}
			mxtest.CheckNoConnLeak(t, c, srv.Counter)
		})
	}

	t.Run("downgrade: an MX that does not offer STARTTLS gets nothing in plaintext", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{}) // no TLS configured: no STARTTLS in EHLO
		hop := srv.Hop
		hop.Host = "mx.dane.test"
		cert := ca.Issue(t, time.Time{}, "mx.dane.test")
		c := newTestClient(t)
		var rep reports
		c.Report = rep.add
		rec := tlsaRecord(t, mxtest.TLSA(t, "mx.dane.test", 25, 3, 1, 1, cert.Leaf))
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, daneSecurity(hop, []string{"mx.dane.test"}, rec), nil, shortTimeouts(), 0, testTransfer("a@dane.test"))
		refused(t, srv, res, "4.7.4", "STARTTLS")
		rep.want(t, PolicyDANE, ResultStartTLSNotSupported, false)
		if srv.Accepted.Load() != 1 {
			t.Errorf("%d connections, want 1", srv.Accepted.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("downgrade: STARTTLS refused with 454 under DANE", func(t *testing.T) {
		sc := &mxtest.Script{Exts: []string{"STARTTLS"}, StartTLS: func(c net.Conn, r *bufio.Reader) bool {
			_, err := io.WriteString(c, "454 4.7.0 TLS not available\r\n")
			return err == nil
		}}
		srv := mxtest.StartScripted(t, false, sc.Handle)
		hop := srv.Hop
		hop.Host = "mx.dane.test"
		cert := ca.Issue(t, time.Time{}, "mx.dane.test")
		c := newTestClient(t)
		rec := tlsaRecord(t, mxtest.TLSA(t, "mx.dane.test", 25, 3, 1, 1, cert.Leaf))
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, daneSecurity(hop, []string{"mx.dane.test"}, rec), nil, shortTimeouts(), 0, testTransfer("a@dane.test"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.7.4", "(DANE)")
		if sc.Txns.Load() != 0 || srv.Accepted.Load() != 1 {
			t.Errorf("%d transactions over %d connections, want 0 over 1", sc.Txns.Load(), srv.Accepted.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a connection pooled without DANE is not reused for a DANE delivery", func(t *testing.T) {
		cert := ca.Issue(t, time.Time{}, "mx.dane.test")
		published := ca.Issue(t, time.Time{}, "mx.dane.test")
		srv, hop := daneServer(t, "mx.dane.test", cert)
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, Security{Level: policy.TLSOpportunistic}, nil, shortTimeouts(), 0, testTransfer("a@dane.test"))
		wantStatuses(t, res, spool.RcptDelivered)
		rec := tlsaRecord(t, mxtest.TLSA(t, "mx.dane.test", 25, 3, 1, 1, published.Leaf))
		res = c.Deliver(context.Background(), []resolve.Hop{hop}, daneSecurity(hop, []string{"mx.dane.test"}, rec), nil, shortTimeouts(), 0, testTransfer("b@dane.test"))
		wantStatuses(t, res, spool.RcptDeferred)
		if n := len(srv.Transactions()); n != 1 {
			t.Errorf("%d transactions, want only the first", n)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})
}

func TestDeliverMTASTSTesting(t *testing.T) {
	ca := mxtest.NewCA(t, "Test CA")
	t.Run("testing mode delivers over a certificate enforce would refuse, and reports it", func(t *testing.T) {
		cert := ca.Issue(t, time.Time{}, "mx.other.test")
		srv, hop := daneServer(t, "mx.sts.test", cert)
		c := newTestClient(t)
		c.RootCAs = ca.Pool
		var rep reports
		c.Report = rep.add
		sec := Security{Level: policy.TLSOpportunistic, Hosts: map[string]HostSecurity{
			HostKey(hop): {Policy: PolicySTS, Level: policy.TLSOpportunistic, Testing: true}}}
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, sec, nil, shortTimeouts(), 0, testTransfer("a@sts.test"))
		wantStatuses(t, res, spool.RcptDelivered)
		if !res[0].TLS || res[0].TLSPolicy != "MTA-STS testing" {
			t.Errorf("TLS %v policy %q", res[0].TLS, res[0].TLSPolicy)
		}
		rep.want(t, PolicySTS, ResultHostMismatch, true)
		if r := rep.list(); len(r) == 1 && (r[0].Err == nil || !strings.Contains(r[0].Err.Text, "not enforced")) {
			t.Errorf("report error %v, want one saying it was not enforced", r[0].Err)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("enforce (verify) refuses the same certificate", func(t *testing.T) {
		cert := ca.Issue(t, time.Time{}, "mx.other.test")
		srv, hop := daneServer(t, "mx.sts.test", cert)
		c := newTestClient(t)
		c.RootCAs = ca.Pool
		var rep reports
		c.Report = rep.add
		sec := Security{Level: policy.TLSOpportunistic, Hosts: map[string]HostSecurity{
			HostKey(hop): {Policy: PolicySTS, Level: policy.TLSVerify}}}
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, sec, nil, shortTimeouts(), 0, testTransfer("a@sts.test"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.7.5", "(MTA-STS)")
		rep.want(t, PolicySTS, ResultHostMismatch, false)
		if len(srv.Transactions()) != 0 || srv.Accepted.Load() != 1 {
			t.Errorf("%d transactions over %d connections, want 0 over 1", len(srv.Transactions()), srv.Accepted.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})
}

func TestUsableTLSA(t *testing.T) {
	hex := func(n int) string { return strings.Repeat("ab", n) }
	recs := []*dns.TLSA{
		{Usage: 3, Selector: 1, MatchingType: 1, Certificate: hex(32)}, // usable
		{Usage: 2, Selector: 0, MatchingType: 2, Certificate: hex(64)}, // usable
		{Usage: 3, Selector: 1, MatchingType: 0, Certificate: hex(91)}, // usable: full SPKI
		{Usage: 1, Selector: 1, MatchingType: 1, Certificate: hex(32)}, // PKIX-EE: not for SMTP
		{Usage: 0, Selector: 1, MatchingType: 1, Certificate: hex(32)}, // PKIX-TA
		{Usage: 3, Selector: 2, MatchingType: 1, Certificate: hex(32)}, // unknown selector
		{Usage: 3, Selector: 1, MatchingType: 3, Certificate: hex(32)}, // unknown matching type
		{Usage: 3, Selector: 1, MatchingType: 1, Certificate: hex(31)}, // SHA-256 of the wrong length
		{Usage: 3, Selector: 1, MatchingType: 0, Certificate: ""},      // empty
	}
	got := UsableTLSA(recs)
	if len(got) != 3 || got[0] != recs[0] || got[1] != recs[1] || got[2] != recs[2] {
		t.Errorf("usable: %v", got)
	}
}
