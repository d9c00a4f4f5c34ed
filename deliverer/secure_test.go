package deliverer

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest/observer"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/deliverer/mtasts"
	"github.com/jetmail/jetmail/internal/dnstest"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/spool"
)

// e2eDNSSEC trusts the test DNS server's AD bit (--dnssec).
func e2eDNSSEC() e2eReplicaOpt {
	return func(c *Config, _ *e2eConn) { c.Resolver.DNSSEC = true }
}

// e2eTrust makes ca the roots of the deliverer's TLS verification and of its
// MTA-STS fetches, which go to the policy server ps.
func e2eTrust(ca *mxtest.CA, ps *httptest.Server) e2eReplicaOpt {
	return func(c *Config, _ *e2eConn) {
		c.Client.RootCAs = ca.Pool
		c.STS = &mtasts.Fetcher{RootCAs: ca.Pool, Timeout: 3 * time.Second}
		if ps != nil {
			c.STS.Port = uint16(ps.Listener.Addr().(*net.TCPAddr).Port)
		}
	}
}

// tlsMX serves an MX on ip presenting cert (nil: no STARTTLS at all).
func (e *e2eEnv) tlsMX(ip string, cert *tls.Certificate) *mxtest.MX {
	e.t.Helper()
	if cert == nil {
		return e.startMX(ip, &mxtest.MX{})
	}
	return e.startMX(ip, &mxtest.MX{}, func(s *smtp.Server) { s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*cert}} })
}

// policyServer serves MTA-STS policies (host → body) over HTTPS on
// 127.0.0.1 with a certificate from ca for every mta-sts.<domain> given;
// the test DNS must point those names at 127.0.0.1.
func policyServer(t *testing.T, ca *mxtest.CA, policies map[string]string) *httptest.Server {
	t.Helper()
	var names []string
	for d := range policies {
		names = append(names, "mta-sts."+d)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, ok := policies[strings.TrimPrefix(strings.Split(r.Host, ":")[0], "mta-sts.")]
		if !ok || r.URL.Path != "/.well-known/mta-sts.txt" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, body)
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, time.Time{}, names...)}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func (r *e2eReplica) tlsCount(t *testing.T, policy string, enforced bool, result string) float64 {
	t.Helper()
	return e2eCount(t, r.d.metrics.tls.WithLabelValues(policy, fmt.Sprint(enforced), result))
}

// wantDeferred waits for qid's first deferral and checks its reply.
func (e *e2eEnv) wantDeferred(qid, rcpt, enhanced, text string) {
	e.t.Helper()
	st := e.waitState(qid, 15*time.Second, "the first deferral", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
	rs := e2eRcptState(st, rcpt)
	if rs.Status != spool.RcptDeferred || rs.Enhanced != enhanced || !strings.Contains(rs.Text, text) {
		e.t.Errorf("%s: %s %s %q, want deferred %s containing %q", rcpt, rs.Status, rs.Enhanced, rs.Text, enhanced, text)
	}
}

// wantLog fails unless a line with message msg carries every field of
// fields and, if reason is not "", a reason containing it.
func wantLog(t *testing.T, logs *observer.ObservedLogs, msg string, fields map[string]string, reason string) {
	t.Helper()
	for _, e := range logs.FilterMessage(msg).All() {
		m := e.ContextMap()
		ok := reason == "" || strings.Contains(fmt.Sprint(m["reason"]), reason)
		for k, v := range fields {
			ok = ok && fmt.Sprint(m[k]) == v
		}
		if ok {
			return
		}
	}
	var got []map[string]any
	for _, e := range logs.FilterMessage(msg).All() {
		got = append(got, e.ContextMap())
	}
	t.Errorf("no %q line with %v (reason %q); got %v", msg, fields, reason, got)
}

func TestOutboundTrust(t *testing.T) {
	ca := mxtest.NewCA(t, "Test CA")

	t.Run("DANE: the MX whose certificate matches its TLSA records gets the mail, the one that does not gets nothing", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		good, bad, published := ca.Issue(t, time.Time{}, "mx2.dane.test"), ca.Issue(t, time.Time{}, "mx1.dane.test"), ca.Issue(t, time.Time{}, "mx1.dane.test")
		e.dns.Add(t,
			"dane.test. 60 IN MX 10 mx1.dane.test.", "mx1.dane.test. 60 IN A "+e2eMX1,
			"dane.test. 60 IN MX 20 mx2.dane.test.", "mx2.dane.test. 60 IN A "+e2eMX2,
			mxtest.TLSA(t, "mx1.dane.test", e.port, 3, 1, 1, published.Leaf),
			mxtest.TLSA(t, "mx2.dane.test", e.port, 3, 1, 1, good.Leaf))
		e.dns.Set(func(d *dnstest.Server) { d.Signed["dane.test."] = true })
		mx1, mx2 := e.tlsMX(e2eMX1, &bad), e.tlsMX(e2eMX2, &good)
		var logs *observer.ObservedLogs
		r := e.startDeliverer(e2eDNSSEC(), observed(&logs))
		qid := e.enqueue(e2eSender, "dan@dane.test")
		e.waitEmpty(15 * time.Second)
		// The refusal and the delivery each say which policy applied.
		wantLog(t, logs, "tls policy", map[string]string{"relay": "mx1.dane.test", "tls_policy": "tlsa", "result": "validation-failure", "queue_id": qid}, "TLSA")
		wantLog(t, logs, "delivery", map[string]string{"relay": "mx2.dane.test", "tls_policy": "DANE", "status": "delivered"}, "")
		if txns := mx2.Transactions(); len(txns) != 1 || !txns[0].TLS {
			t.Errorf("mx2 got %+v, want one mail over TLS", txns)
		}
		if n := len(mx1.Transactions()); n != 0 {
			t.Errorf("mx1, whose certificate does not match, got %d mails", n)
		}
		if r.tlsCount(t, "tlsa", true, "validation-failure") != 1 || r.tlsCount(t, "tlsa", true, "success") != 1 {
			t.Errorf("tls counts: validation-failure %v, success %v", r.tlsCount(t, "tlsa", true, "validation-failure"), r.tlsCount(t, "tlsa", true, "success"))
		}
		r.stop(t)
	})

	t.Run("DANE downgrade: an MX that drops STARTTLS gets nothing in plaintext; dane: false in the DeliveryPolicy lets it through at the next attempt", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		cert := ca.Issue(t, time.Time{}, "mx1.strip.test")
		e.dns.Add(t, "strip.test. 60 IN MX 10 mx1.strip.test.", "mx1.strip.test. 60 IN A "+e2eMX1,
			mxtest.TLSA(t, "mx1.strip.test", e.port, 3, 1, 1, cert.Leaf))
		e.dns.Set(func(d *dnstest.Server) { d.Signed["strip.test."] = true })
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) { sp.DeadDestinationTime = e2eDur(time.Second) }, nil, nil)
		mx := e.tlsMX(e2eMX1, nil) // the attacker's: no STARTTLS
		r := e.startDeliverer(e2eDNSSEC())
		qid := e.enqueue(e2eSender, "eve@strip.test")
		e.wantDeferred(qid, "eve@strip.test", "4.7.4", "(DANE)")
		if n := len(mx.Transactions()); n != 0 {
			t.Fatalf("%d mails sent in plaintext under DANE", n)
		}
		if r.tlsCount(t, "tlsa", true, "starttls-not-supported") < 1 {
			t.Error("the refusal was not counted")
		}
		off := false
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) { sp.DeadDestinationTime = e2eDur(time.Second); sp.DANE = &off }, nil, nil)
		e.waitEmpty(20 * time.Second)
		if txns := mx.Transactions(); len(txns) != 1 || txns[0].TLS {
			t.Errorf("with DANE off the MX got %+v, want one plaintext mail", txns)
		}
		r.stop(t)
	})

	t.Run("DANE needs validation: TLSA records without the AD bit are ignored, and without --dnssec nothing is asked", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		cert, published := ca.Issue(t, time.Time{}, "mx1.unsigned.test"), ca.Issue(t, time.Time{}, "mx1.unsigned.test")
		e.dns.Add(t, "unsigned.test. 60 IN MX 10 mx1.unsigned.test.", "mx1.unsigned.test. 60 IN A "+e2eMX1,
			mxtest.TLSA(t, "mx1.unsigned.test", e.port, 3, 1, 1, published.Leaf))
		mx := e.tlsMX(e2eMX1, &cert)
		r := e.startDeliverer(e2eDNSSEC())
		e.enqueue(e2eSender, "una@unsigned.test")
		e.waitEmpty(15 * time.Second)
		if txns := mx.Transactions(); len(txns) != 1 || !txns[0].TLS {
			t.Errorf("got %+v, want one mail over opportunistic TLS", txns)
		}
		if r.tlsCount(t, "no-policy-found", false, "success") != 1 {
			t.Errorf("no-policy-found success %v", r.tlsCount(t, "no-policy-found", false, "success"))
		}
		r.stop(t)

		e.dns.Set(func(d *dnstest.Server) { d.Signed["unsigned.test."] = true })
		tlsa := fmt.Sprintf("_%d._tcp.mx1.unsigned.test", e.port)
		before := e.dns.Count(tlsa, dns.TypeTLSA)
		r = e.startDeliverer() // no --dnssec
		e.enqueue(e2eSender, "una@unsigned.test")
		e.waitEmpty(15 * time.Second)
		if n := len(mx.Transactions()); n != 2 || e.dns.Count(tlsa, dns.TypeTLSA) != before {
			t.Errorf("%d mails, %d TLSA queries without --dnssec", n, e.dns.Count(tlsa, dns.TypeTLSA)-before)
		}
		r.stop(t)
	})

	t.Run("DANE: a host whose TLSA lookup fails is not used; unusable records still mean TLS", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		cert := ca.Issue(t, time.Time{}, "mx2.servfail.test")
		e.dns.Add(t,
			"servfail.test. 60 IN MX 10 mx1.servfail.test.", "mx1.servfail.test. 60 IN A "+e2eMX1,
			"servfail.test. 60 IN MX 20 mx2.servfail.test.", "mx2.servfail.test. 60 IN A "+e2eMX2,
			// PKIX-EE only: not usable for SMTP (RFC 7672 §3.1).
			mxtest.TLSA(t, "mx2.servfail.test", e.port, 1, 1, 1, cert.Leaf))
		e.dns.Set(func(d *dnstest.Server) {
			d.Signed["servfail.test."] = true
			d.Rcodes[fmt.Sprintf("_%d._tcp.mx1.servfail.test.", e.port)] = dns.RcodeServerFailure // bogus
		})
		mx1, mx2 := e.tlsMX(e2eMX1, &cert), e.tlsMX(e2eMX2, &cert)
		r := e.startDeliverer(e2eDNSSEC())
		e.enqueue(e2eSender, "sam@servfail.test")
		e.waitEmpty(15 * time.Second)
		if n := mx1.Counter.Accepted.Load(); n != 0 {
			t.Errorf("mx1, whose TLSA lookup failed, was connected to %d times", n)
		}
		if txns := mx2.Transactions(); len(txns) != 1 || !txns[0].TLS {
			t.Errorf("mx2 got %+v", txns)
		}
		if r.tlsCount(t, "tlsa", true, "dnssec-invalid") != 1 || r.tlsCount(t, "tlsa", true, "tlsa-invalid") != 1 {
			t.Errorf("dnssec-invalid %v, tlsa-invalid %v", r.tlsCount(t, "tlsa", true, "dnssec-invalid"), r.tlsCount(t, "tlsa", true, "tlsa-invalid"))
		}
		r.stop(t)
	})

	t.Run("MTA-STS enforce: only named MX hosts with valid certificates get mail; the policy is shared in the bucket", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		ps := policyServer(t, ca, map[string]string{
			"sts.test": "version: STSv1\r\nmode: enforce\r\nmx: mx2.sts.test\r\nmx: *.named.sts.test\r\nmax_age: 86400\r\n",
		})
		e.dns.Add(t,
			"sts.test. 60 IN MX 10 mx1.sts.test.", "mx1.sts.test. 60 IN A "+e2eMX1, // not in the policy
			"sts.test. 60 IN MX 20 mx2.sts.test.", "mx2.sts.test. 60 IN A "+e2eMX2,
			"mta-sts.sts.test. 60 IN A 127.0.0.1")
		e.dns.AddTXT(t, "_mta-sts.sts.test", "v=STSv1; id=20261203T1;")
		cert := ca.Issue(t, time.Time{}, "mx1.sts.test", "mx2.sts.test")
		mx1, mx2 := e.tlsMX(e2eMX1, &cert), e.tlsMX(e2eMX2, &cert)
		var logs *observer.ObservedLogs
		r := e.startDeliverer(e2eTrust(ca, ps), observed(&logs))
		e.enqueue(e2eSender, "stan@sts.test")
		e.waitEmpty(15 * time.Second)
		wantLog(t, logs, "tls policy", map[string]string{"relay": "mx1.sts.test", "tls_policy": "sts", "result": "validation-failure"}, "not an MX host the policy of sts.test names")
		wantLog(t, logs, "delivery", map[string]string{"relay": "mx2.sts.test", "tls_policy": "MTA-STS", "status": "delivered"}, "")
		if n := mx1.Counter.Accepted.Load(); n != 0 {
			t.Errorf("mx1, not in the policy, was connected to %d times", n)
		}
		if txns := mx2.Transactions(); len(txns) != 1 || !txns[0].TLS {
			t.Errorf("mx2 got %+v", txns)
		}
		if r.tlsCount(t, "sts", true, "validation-failure") != 1 || r.tlsCount(t, "sts", true, "success") != 1 {
			t.Errorf("sts counts: refused %v, success %v", r.tlsCount(t, "sts", true, "validation-failure"), r.tlsCount(t, "sts", true, "success"))
		}
		if n := e2eCount(t, r.d.metrics.stsFetches.WithLabelValues("success")); n != 1 {
			t.Errorf("%v fetches", n)
		}
		js, _ := jetstream.New(e.connect())
		kv, err := js.KeyValue(context.Background(), mtasts.Bucket)
		if err != nil {
			t.Fatal(err)
		}
		entry, err := kv.Get(context.Background(), "sts.test")
		var p mtasts.Policy
		if err != nil || json.Unmarshal(entry.Value(), &p) != nil || p.ID != "20261203T1" || p.Mode != mtasts.Enforce {
			t.Errorf("bucket entry: %v, %+v", err, p)
		}
		r.stop(t)
	})

	t.Run("MTA-STS enforce: a certificate not valid for the MX name defers 4.7.5; testing mode delivers and reports", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		ps := policyServer(t, ca, map[string]string{
			"strict.test": "version: STSv1\nmode: enforce\nmx: mx1.strict.test\nmax_age: 86400\n",
			"trial.test":  "version: STSv1\nmode: testing\nmx: mx9.trial.test\nmax_age: 86400\n",
		})
		e.dns.Add(t,
			"strict.test. 60 IN MX 10 mx1.strict.test.", "mx1.strict.test. 60 IN A "+e2eMX1,
			"trial.test. 60 IN MX 10 mx1.trial.test.", "mx1.trial.test. 60 IN A "+e2eMX1,
			"mta-sts.strict.test. 60 IN A 127.0.0.1", "mta-sts.trial.test. 60 IN A 127.0.0.1")
		e.dns.AddTXT(t, "_mta-sts.strict.test", "v=STSv1; id=1;")
		e.dns.AddTXT(t, "_mta-sts.trial.test", "v=STSv1; id=1;")
		wrong := ca.Issue(t, time.Time{}, "imposter.test")
		mx := e.tlsMX(e2eMX1, &wrong)
		r := e.startDeliverer(e2eTrust(ca, ps))
		qid := e.enqueue(e2eSender, "sid@strict.test")
		e.wantDeferred(qid, "sid@strict.test", "4.7.5", "MTA-STS")
		e.enqueue(e2eSender, "tim@trial.test")
		mxtest.Within(t, 15*time.Second, "the testing-mode mail", func() bool { return len(mx.Transactions()) == 1 })
		if txns := mx.Transactions(); txns[0].Rcpts[0] != "tim@trial.test" || !txns[0].TLS {
			t.Errorf("got %+v, want only tim's mail, over TLS", txns)
		}
		if r.tlsCount(t, "sts", true, "certificate-host-mismatch") < 1 {
			t.Error("the enforced refusal was not counted")
		}
		// Testing: the MX not named and the certificate, both reported.
		if r.tlsCount(t, "sts", false, "validation-failure") != 1 || r.tlsCount(t, "sts", false, "certificate-host-mismatch") != 1 {
			t.Errorf("testing counts: mx %v, certificate %v", r.tlsCount(t, "sts", false, "validation-failure"), r.tlsCount(t, "sts", false, "certificate-host-mismatch"))
		}
		r.stop(t)
	})

	t.Run("unusable TLSA records do not stand in for MTA-STS: enforce still checks the certificate", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		ps := policyServer(t, ca, map[string]string{
			"pkix.test": "version: STSv1\nmode: enforce\nmx: mx1.pkix.test\nmax_age: 86400\n",
		})
		stranger := mxtest.NewCA(t, "Stranger") // nobody trusts it
		cert := stranger.Issue(t, time.Time{}, "mx1.pkix.test")
		e.dns.Add(t, "pkix.test. 60 IN MX 10 mx1.pkix.test.", "mx1.pkix.test. 60 IN A "+e2eMX1,
			"mta-sts.pkix.test. 60 IN A 127.0.0.1",
			// PKIX-EE: published, validated, and of no use to SMTP.
			mxtest.TLSA(t, "mx1.pkix.test", e.port, 1, 1, 1, cert.Leaf))
		e.dns.AddTXT(t, "_mta-sts.pkix.test", "v=STSv1; id=1;")
		e.dns.Set(func(d *dnstest.Server) { d.Signed["pkix.test."] = true })
		mx := e.tlsMX(e2eMX1, &cert)
		r := e.startDeliverer(e2eDNSSEC(), e2eTrust(ca, ps))
		qid := e.enqueue(e2eSender, "pat@pkix.test")
		e.wantDeferred(qid, "pat@pkix.test", "4.7.5", "MTA-STS")
		if n := len(mx.Transactions()); n != 0 {
			t.Errorf("%d mails went over a certificate nobody vouches for", n)
		}
		if r.tlsCount(t, "tlsa", true, "tlsa-invalid") < 1 || r.tlsCount(t, "sts", true, "certificate-not-trusted") < 1 {
			t.Errorf("tlsa-invalid %v, sts certificate-not-trusted %v", r.tlsCount(t, "tlsa", true, "tlsa-invalid"), r.tlsCount(t, "sts", true, "certificate-not-trusted"))
		}
		r.stop(t)
	})

	t.Run("DANE wins over MTA-STS on a host that has both", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		ps := policyServer(t, ca, map[string]string{
			"both.test": "version: STSv1\nmode: enforce\nmx: other.both.test\nmax_age: 86400\n",
		})
		other := mxtest.NewCA(t, "Unknown CA") // no certificate authority vouches: only DANE can
		cert := other.Issue(t, time.Time{}, "mx1.both.test")
		e.dns.Add(t, "both.test. 60 IN MX 10 mx1.both.test.", "mx1.both.test. 60 IN A "+e2eMX1,
			"mta-sts.both.test. 60 IN A 127.0.0.1",
			mxtest.TLSA(t, "mx1.both.test", e.port, 3, 1, 1, cert.Leaf))
		e.dns.AddTXT(t, "_mta-sts.both.test", "v=STSv1; id=1;")
		e.dns.Set(func(d *dnstest.Server) { d.Signed["both.test."] = true })
		mx := e.tlsMX(e2eMX1, &cert)
		r := e.startDeliverer(e2eDNSSEC(), e2eTrust(ca, ps))
		e.enqueue(e2eSender, "bo@both.test")
		e.waitEmpty(15 * time.Second)
		if txns := mx.Transactions(); len(txns) != 1 || !txns[0].TLS {
			t.Errorf("got %+v", txns)
		}
		if r.tlsCount(t, "tlsa", true, "success") != 1 || r.tlsCount(t, "sts", true, "validation-failure") != 0 {
			t.Error("MTA-STS was applied to a DANE host")
		}
		r.stop(t)
	})
}
