package outbound

// DANE for SMTP (RFC 7672 §3): authenticating a server's certificate with
// its TLSA records instead of a certificate authority.

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// TLSA certificate usages, selectors and matching types (RFC 6698 §2.1).
const (
	usageDANETA = 2
	usageDANEEE = 3
)

// UsableTLSA returns the records DANE for SMTP can use (RFC 7672 §3.1):
// usage DANE-TA(2) or DANE-EE(3), selector Cert(0) or SPKI(1), matching
// Full(0), SHA2-256(1) or SHA2-512(2) with data of the length it implies.
// PKIX-TA(0) and PKIX-EE(1) are not used for SMTP.
func UsableTLSA(recs []*dns.TLSA) []*dns.TLSA {
	var out []*dns.TLSA
	for _, r := range recs {
		if r.Usage != usageDANETA && r.Usage != usageDANEEE || r.Selector > 1 {
			continue
		}
		n := len(r.Certificate)
		switch r.MatchingType {
		case 0:
			if n == 0 || n%2 != 0 {
				continue
			}
		case 1:
			if n != 64 {
				continue
			}
		case 2:
			if n != 128 {
				continue
			}
		default:
			continue
		}
		out = append(out, r)
	}
	return out
}

// matchTLSA reports whether cert matches r's selector, matching type and
// data.
func matchTLSA(r *dns.TLSA, cert *x509.Certificate) bool {
	want, err := dns.CertificateToDANE(r.Selector, r.MatchingType, cert)
	return err == nil && strings.EqualFold(want, r.Certificate)
}

// errNoTLSAMatch says no record matched.
var errNoTLSAMatch = errors.New("no certificate the server sent matches its TLSA records")

// verifyDANE checks a server's certificate chain against usable TLSA
// records. DANE-EE(3) matches the server's own certificate, whatever its
// names and dates (RFC 7672 §3.1.1). DANE-TA(2) matches a certificate the
// server sent above its own, which is then the only trust anchor: the
// server's certificate must chain to it, be within its dates and carry one
// of names (RFC 7672 §3.1.2, §3.2.2). A DANE-TA record for a trust anchor
// the server does not send (a bare public key) is not matched.
func verifyDANE(chain []*x509.Certificate, recs []*dns.TLSA, names []string, now time.Time) (string, error) {
	if len(chain) == 0 {
		return ResultValidationFailure, errors.New("the server sent no certificate")
	}
	leaf := chain[0]
	for _, r := range recs {
		if r.Usage == usageDANEEE && matchTLSA(r, leaf) {
			return ResultSuccess, nil
		}
	}
	var lastErr error
	for _, r := range recs {
		if r.Usage != usageDANETA {
			continue
		}
		for i := 1; i < len(chain); i++ {
			if !matchTLSA(r, chain[i]) {
				continue
			}
			roots, inter := x509.NewCertPool(), x509.NewCertPool()
			roots.AddCert(chain[i])
			for _, c := range chain[1:i] {
				inter.AddCert(c)
			}
			for _, name := range names {
				_, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inter,
					CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
				if err == nil {
					return ResultSuccess, nil
				}
				lastErr = err
			}
		}
	}
	if lastErr != nil {
		return certResult(lastErr), fmt.Errorf("the certificate chains to a TLSA trust anchor but does not verify: %w", lastErr)
	}
	return ResultValidationFailure, errNoTLSAMatch
}
