package resolve

// The records that secure delivery: TLSA for DANE (RFC 7672) and the
// _mta-sts TXT record (RFC 8461 §3.1).

import (
	"context"
	"fmt"
	"strings"

	"github.com/miekg/dns"

	"github.com/jetmail/jetmail/deliverer/failure"
)

// TLSA returns the TLSA records of the SMTP service at host and port
// (_port._tcp.host, RFC 7672 §2.2.2) when the DNS validated them. It asks
// only when the Resolver's DNSSEC is set; the caller asks only for a hop
// whose DNSSEC is set.
//
// The three outcomes are those DANE needs: records (the hop must be
// authenticated by them), none (no records, or an answer that was not
// validated: the zone is not signed, so DANE does not apply), or an error:
// the lookup failed or the validating resolver answered SERVFAIL, which is
// what it answers for bogus data. A host whose TLSA lookup fails must not
// be used (RFC 7672 §2.2): an attacker who can block the lookup could
// otherwise turn DANE off.
func (r *Resolver) TLSA(ctx context.Context, host string, port uint16) ([]*dns.TLSA, error) {
	if !r.DNSSEC {
		return nil, nil
	}
	name, ok := normalizeDomain(host)
	if !ok {
		return nil, failure.Temporary(451, "4.7.5", "invalid host name %q for a TLSA lookup", host)
	}
	if port == 0 {
		port = r.port()
	}
	ans, err := r.query(ctx, fmt.Sprintf("_%d._tcp.%s", port, name), dns.TypeTLSA)
	if err != nil {
		return nil, err
	}
	if !ans.secure || ans.nx {
		return nil, nil
	}
	var out []*dns.TLSA
	for _, rr := range ans.rrs {
		if t, ok := rr.(*dns.TLSA); ok {
			out = append(out, t)
		}
	}
	return out, nil
}

// TXT returns the TXT records at label under domain ("_mta-sts",
// "example.org"), each one's strings joined, and nothing when the name has
// none or does not exist. Errors are temporary.
func (r *Resolver) TXT(ctx context.Context, label, domain string) ([]string, error) {
	d, ok := normalizeDomain(domain)
	if !ok {
		return nil, failure.Permanent(550, "5.1.2", "invalid domain %q", domain)
	}
	ans, err := r.query(ctx, label+"."+d, dns.TypeTXT)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, rr := range ans.rrs {
		if t, ok := rr.(*dns.TXT); ok {
			out = append(out, strings.Join(t.Txt, ""))
		}
	}
	return out, nil
}
