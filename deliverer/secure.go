package deliverer

// How a delivery's next hops are secured: the route's or the default TLS
// policy, DANE (RFC 7672) for a host that publishes TLSA records under
// DNSSEC, and the recipient domain's MTA-STS policy (RFC 8461). DANE wins
// on a host that has both (RFC 8461 §2). A host a policy forbids is dropped
// here, before any connection; the outbound client enforces the rest on
// each session.

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"

	"go.uber.org/zap"

	"github.com/jetmail/jetmail/deliverer/failure"
	"github.com/jetmail/jetmail/deliverer/mtasts"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/deliverer/resolve"
	"github.com/jetmail/jetmail/policy"
)

// secure returns the hops that may be used and how each is secured. level
// is the route's TLS policy, or opportunistic for MX delivery; dane and sts
// say whether DANE and MTA-STS apply; mx says the hops are domain's MX
// hosts (a DANE-TA certificate may then name the domain too). With no hop
// left, the error says why (temporary, 4.7.5: a policy can change, and
// RFC 8461 §5.1 wants the policy looked up again before mail is returned).
func (a *attempt) secure(ctx context.Context, domain string, hops []resolve.Hop, level policy.TLSPolicy, dane, sts, mx bool) ([]resolve.Hop, outbound.Security, *failure.Error) {
	d := a.d
	sec := outbound.Security{Level: level}
	if level == policy.TLSNone || (!dane && !sts) {
		return hops, sec, nil
	}
	sec.Hosts = map[string]outbound.HostSecurity{}

	refused := map[string]bool{} // by outbound.HostKey
	var reasons []string
	refuse := func(hop resolve.Hop, pol, result string, e *failure.Error) {
		refused[outbound.HostKey(hop)] = true
		reasons = append(reasons, e.Text)
		d.reportTLS(a.log, outbound.TLSReport{QueueID: a.m.Envelope.QueueID, Hop: hop, Policy: pol, Result: result, Err: e})
	}
	hosts := distinctHosts(hops)
	// encrypt are the hosts with TLSA records of which none is usable:
	// TLS is mandatory there (RFC 7672 §2.2), but DANE authenticates
	// nothing, so MTA-STS still applies to them.
	encrypt := map[string]bool{}

	if dane && d.cfg.Resolver.DNSSEC {
		for _, h := range hosts {
			if !h.DNSSEC {
				continue // RFC 7672 §2.2.1: no TLSA without a validated address
			}
			recs, err := d.cfg.Resolver.TLSA(ctx, h.Host, h.Addr.Port())
			switch {
			case err != nil && ctx.Err() != nil:
				// A shutdown cut the lookup short: that says nothing of the host.
				return nil, sec, failure.Temporary(451, "4.4.0", "delivery to %s interrupted: %v", domain, context.Cause(ctx))
			case err != nil:
				// RFC 7672 §2.2: a host whose TLSA lookup fails is not used.
				refuse(h, outbound.PolicyDANE, outbound.ResultDNSSECInvalid,
					failure.Temporary(451, "4.7.5", "DANE: the TLSA lookup for %s failed: %s", h.Host, errText(err)))
			case len(recs) == 0:
			case len(outbound.UsableTLSA(recs)) == 0:
				encrypt[outbound.HostKey(h)] = true
				d.reportTLS(a.log, outbound.TLSReport{QueueID: a.m.Envelope.QueueID, Hop: h, Policy: outbound.PolicyDANE, Result: outbound.ResultTLSAInvalid,
					Err: failure.Temporary(451, "4.7.5", "DANE: none of the %d TLSA records of %s is usable; TLS is required, unauthenticated", len(recs), h.Host)})
			default:
				hs := outbound.HostSecurity{Policy: outbound.PolicyDANE, Level: policy.TLSDANE, TLSA: outbound.UsableTLSA(recs), Names: []string{h.Host}}
				if mx {
					hs.Names = append(hs.Names, domain)
				}
				sec.Hosts[outbound.HostKey(h)] = hs
			}
		}
	}

	if sts {
		p, err := d.sts.Lookup(ctx, domain)
		if err != nil {
			a.log.Warn("MTA-STS policy", zap.String("domain", domain), zap.Error(err), zap.Bool("cached_policy", p != nil))
		}
		if p != nil && p.Mode != mtasts.None {
			enforce := p.Mode == mtasts.Enforce
			for _, h := range hosts {
				k := outbound.HostKey(h)
				if _, ok := sec.Hosts[k]; ok || refused[k] {
					continue // DANE authenticates it, or it is out
				}
				hs := outbound.HostSecurity{Policy: outbound.PolicySTS, Level: policy.TLSVerify}
				if !enforce {
					hs.Level, hs.Testing = level, true
				}
				if !p.Match(h.Host) {
					e := failure.Temporary(451, "4.7.5", "MTA-STS: %s is not an MX host the policy of %s names (mode %s, id %s)", h.Host, domain, p.Mode, p.ID)
					if enforce {
						refuse(h, outbound.PolicySTS, outbound.ResultValidationFailure, e)
						continue
					}
					d.reportTLS(a.log, outbound.TLSReport{QueueID: a.m.Envelope.QueueID, Hop: h, Policy: outbound.PolicySTS, Testing: true, Result: outbound.ResultValidationFailure, Err: e})
				}
				sec.Hosts[k] = hs
			}
		}
	}

	// Mandatory TLS for unusable TLSA records raises the level; it never
	// lowers one (verify stays verify).
	for k := range encrypt {
		hs, ok := sec.Hosts[k]
		if !ok {
			hs = outbound.HostSecurity{Policy: outbound.PolicyDANE, Level: level}
		}
		if hs.Level == policy.TLSOpportunistic {
			hs.Level = policy.TLSRequired
		}
		sec.Hosts[k] = hs
	}

	if len(refused) == 0 {
		return hops, sec, nil
	}
	kept := make([]resolve.Hop, 0, len(hops))
	for _, h := range hops {
		if !refused[outbound.HostKey(h)] {
			kept = append(kept, h)
		}
	}
	if len(kept) == 0 {
		return nil, sec, failure.Temporary(451, "4.7.5", "no next hop of %s may be used: %s", domain, strings.Join(reasons, "; "))
	}
	return kept, sec, nil
}

// distinctHosts is the first hop of each host name and port, in order.
func distinctHosts(hops []resolve.Hop) []resolve.Hop {
	seen := map[string]bool{}
	var out []resolve.Hop
	for _, h := range hops {
		if k := outbound.HostKey(h); !seen[k] {
			seen[k] = true
			out = append(out, h)
		}
	}
	return out
}

// reportTLS counts one TLS outcome, and logs it unless it is a success or
// an opportunistic session that found no TLS (too common to log).
func (d *Deliverer) reportTLS(log *zap.Logger, r outbound.TLSReport) {
	enforced := !r.Testing && r.Policy != outbound.PolicyNone
	d.metrics.tls.WithLabelValues(r.Policy, strconv.FormatBool(enforced), r.Result).Inc()
	if r.Result == outbound.ResultSuccess || r.Policy == outbound.PolicyNone {
		return
	}
	fields := []zap.Field{zap.String("relay", r.Hop.Host), zap.String("tls_policy", r.Policy),
		zap.Bool("enforced", enforced), zap.String("result", r.Result)}
	if r.QueueID != "" {
		fields = append(fields, zap.String("queue_id", r.QueueID))
	}
	if r.Hop.Addr.IsValid() {
		fields = append(fields, zap.String("relay_addr", r.Hop.Addr.String()))
	}
	if r.Err != nil {
		fields = append(fields, zap.String("reason", r.Err.Text))
	}
	log.Warn("tls policy", fields...)
}

// newPolicies sets up MTA-STS: the fetcher (cfg.STS, or one that trusts
// the Client's roots and resolves with the Resolver) and the lookups.
func newPolicies(cfg *Config, m *metrics) *mtasts.Policies {
	f := cfg.STS
	if f == nil {
		f = &mtasts.Fetcher{RootCAs: cfg.Client.RootCAs}
	}
	if f.Dial == nil {
		f.Dial = resolvingDialer(cfg.Resolver)
	}
	return &mtasts.Policies{
		TXT:     cfg.Resolver.TXT,
		Fetcher: f,
		Now:     cfg.Now,
		Fetched: func(_ string, err error) {
			result := "success"
			if fe, ok := err.(*mtasts.FetchError); ok {
				result = fe.Result
			} else if err != nil {
				result = mtasts.ResultFetchError
			}
			m.stsFetches.WithLabelValues(result).Inc()
		},
	}
}

// resolvingDialer dials host:port after resolving host with r, the
// deliverer's own resolver, trying each address in turn.
func resolvingDialer(r *resolve.Resolver) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			return nil, err
		}
		hops, err := r.ResolveHost(ctx, host, uint16(p))
		if err != nil {
			return nil, fmt.Errorf("resolving %s: %s", host, errText(err))
		}
		var last error
		var dialer net.Dialer
		for _, h := range hops {
			c, err := dialer.DialContext(ctx, network, h.Addr.String())
			if err == nil {
				return c, nil
			}
			last = err
		}
		return nil, last
	}
}

func errText(err error) string {
	if e := failure.Classify(err); e != nil {
		return e.Text
	}
	return err.Error()
}
