package resolve

// Domain names as written in addresses and routes: canonical forms,
// A-labels and address literals.

import (
	"net/netip"
	"strings"

	"golang.org/x/net/idna"
)

// canonicalName lower-cases a DNS name and strips its trailing dot; the
// root "." becomes "".
func canonicalName(s string) string {
	return strings.ToLower(strings.TrimSuffix(s, "."))
}

// normalizeDomain canonicalizes a domain and checks it is a plausible host
// name: dot-separated labels of 1 to 63 letters, digits and hyphens, not
// starting or ending with a hyphen (RFC 5321 §4.1.2 "Domain"), 253 octets
// at most. Internationalized names must already be A-labels.
func normalizeDomain(s string) (string, bool) {
	s = canonicalName(s)
	// An internationalised domain (SMTPUTF8 mail) is looked up by its
	// A-label form (RFC 5890): bücher.example is xn--bcher-kva.example.
	if strings.ContainsFunc(s, func(r rune) bool { return r >= 0x80 }) {
		a, err := idna.Lookup.ToASCII(s)
		if err != nil {
			return "", false
		}
		s = a
	}
	if s == "" || len(s) > 253 {
		return "", false
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return "", false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return "", false
			}
		}
	}
	return s, true
}

// parseDomainLiteral parses an RFC 5321 §4.1.3 address literal:
// "[192.0.2.1]" or "[IPv6:2001:db8::1]".
func parseDomainLiteral(s string) (netip.Addr, bool) {
	if len(s) < 2 || s[0] != '[' || s[len(s)-1] != ']' {
		return netip.Addr{}, false
	}
	inner := s[1 : len(s)-1]
	if len(inner) > 5 && strings.EqualFold(inner[:5], "IPv6:") {
		a, err := netip.ParseAddr(inner[5:])
		if err != nil || !a.Is6() || a.Zone() != "" {
			return netip.Addr{}, false
		}
		return a.Unmap(), true
	}
	a, err := netip.ParseAddr(inner)
	if err != nil || !a.Is4() {
		return netip.Addr{}, false
	}
	return a, true
}

// parseHostIP accepts a route host given as an IP: bare, in brackets, or as
// an address literal.
func parseHostIP(s string) (netip.Addr, bool) {
	if a, ok := parseDomainLiteral(s); ok {
		return a, true
	}
	s = strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}
