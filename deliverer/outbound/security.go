package outbound

// How each hop's session is secured: the route's or the default TLS
// policy, or what DANE (RFC 7672) or MTA-STS (RFC 8461) require of the
// hop's host; and the TLS-RPT (RFC 8460) words for what came of it.

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/miekg/dns"

	"github.com/jetmail/jetmail/deliverer/failure"
	"github.com/jetmail/jetmail/deliverer/resolve"
	"github.com/jetmail/jetmail/policy"
)

// Policy types, as TLS-RPT names them (RFC 8460 §4.4).
const (
	PolicyDANE = "tlsa"
	PolicySTS  = "sts"
	// PolicyNone: no DANE or MTA-STS policy applied; the route's or the
	// default TLS policy did.
	PolicyNone = "no-policy-found"
)

// TLS-RPT result types (RFC 8460 §4.3) of a session's TLS.
const (
	ResultSuccess              = "success"
	ResultStartTLSNotSupported = "starttls-not-supported"
	ResultHostMismatch         = "certificate-host-mismatch"
	ResultExpired              = "certificate-expired"
	ResultNotTrusted           = "certificate-not-trusted"
	ResultValidationFailure    = "validation-failure"
	ResultTLSAInvalid          = "tlsa-invalid"
	ResultDNSSECInvalid        = "dnssec-invalid"
)

// Security says how each hop's session must be secured: Level, unless
// Hosts holds an entry for the hop's host name.
type Security struct {
	// Level is the TLS policy of hops without an entry in Hosts: the
	// route's, or opportunistic for MX delivery.
	Level policy.TLSPolicy
	// Hosts are what DANE or MTA-STS decided for a host, by HostKey: TLSA
	// records are per host and port.
	Hosts map[string]HostSecurity
}

// HostKey names a hop's host and port in Security.Hosts.
func HostKey(hop resolve.Hop) string {
	return hop.Host + ":" + strconv.Itoa(int(hop.Addr.Port()))
}

// HostSecurity is how one host's sessions are secured.
type HostSecurity struct {
	// Policy is PolicyDANE, PolicySTS or PolicyNone.
	Policy string
	// Level is policy.TLSDANE (the certificate must match TLSA), TLSVerify
	// (MTA-STS enforce: valid for the host name), TLSRequired (TLSA
	// records that are all unusable: encrypted, unauthenticated), or
	// another level when Testing.
	Level policy.TLSPolicy
	// TLSA are the usable records under policy.TLSDANE.
	TLSA []*dns.TLSA
	// Names are the names a DANE-TA certificate may carry: the host name
	// and the recipient domain (RFC 7672 §3.2.2).
	Names []string
	// Testing is MTA-STS in testing mode: the session goes on as Level
	// says, and whether the certificate would have passed is reported.
	Testing bool
}

// For is the security of hop's sessions.
func (s Security) For(hop resolve.Hop) HostSecurity {
	if hs, ok := s.Hosts[HostKey(hop)]; ok {
		return hs
	}
	return HostSecurity{Policy: PolicyNone, Level: s.Level}
}

// label names the policy for error texts and logs: "DANE", "MTA-STS",
// "MTA-STS testing", or "".
func (hs HostSecurity) label() string {
	switch {
	case hs.Policy == PolicyDANE:
		return "DANE"
	case hs.Policy == PolicySTS && hs.Testing:
		return "MTA-STS testing"
	case hs.Policy == PolicySTS:
		return "MTA-STS"
	}
	return ""
}

// by is " (DANE)" and the like, for error texts.
func (hs HostSecurity) by() string {
	if l := hs.label(); l != "" {
		return " (" + l + ")"
	}
	return ""
}

// poolAuth tells connections secured differently apart in the pool: a
// connection authenticated by one TLSA set or name is not one authenticated
// by another.
func (hs HostSecurity) poolAuth() string {
	if hs.Level != policy.TLSDANE {
		return ""
	}
	var b strings.Builder
	b.WriteString(strings.Join(hs.Names, ","))
	for _, r := range hs.TLSA {
		// Not r.String(): it holds the TTL, which changes with the cache.
		fmt.Fprintf(&b, "|%d %d %d %s", r.Usage, r.Selector, r.MatchingType, strings.ToLower(r.Certificate))
	}
	return b.String()
}

// TLSReport is the outcome of securing one new session under a policy,
// or of a host the deliverer refused under one before connecting: what a
// TLS-RPT report (RFC 8460) counts.
type TLSReport struct {
	QueueID string
	Hop     resolve.Hop
	// Policy is PolicyDANE, PolicySTS or PolicyNone.
	Policy  string
	Testing bool
	// Result is ResultSuccess or a failure's result type.
	Result string
	// Err is why it failed; nil on success.
	Err *failure.Error
}

// certResult is the result type of a certificate verification error.
func certResult(err error) string {
	var he x509.HostnameError
	var ie x509.CertificateInvalidError
	var ue x509.UnknownAuthorityError
	switch {
	case errors.As(err, &he):
		return ResultHostMismatch
	case errors.As(err, &ie) && ie.Reason == x509.Expired:
		return ResultExpired
	case errors.As(err, &ue):
		return ResultNotTrusted
	}
	return ResultValidationFailure
}
