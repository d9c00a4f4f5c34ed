package policy

import (
	"net/netip"
	"strings"
	"unicode/utf8"

	"github.com/emersion/go-smtp"
)

// RFC 5321 §4.5.3.1 sizes. Anything up to them is always accepted; above
// them the address is refused with 501.
const (
	MaxLocalPart = 64  // §4.5.3.1.1
	MaxDomain    = 255 // §4.5.3.1.2
	MaxPath      = 256 // §4.5.3.1.3, including the angle brackets
)

// Address is a parsed mailbox.
type Address struct {
	Local  string
	Domain string // lower case, no trailing dot; "[1.2.3.4]" for a literal
	// Routed is set when the local part carries a routing trick that a
	// downstream server might honour: a percent hack (user%host), a bang
	// path (host!user) or an "@" hidden in a quoted local part. Such
	// addresses are only accepted from clients that may relay anyway.
	Routed bool
}

func (a Address) String() string { return a.Local + "@" + a.Domain }

// ParseAddress parses the mailbox go-smtp hands over (source routes already
// stripped, as RFC 5321 §C allows; quotes removed). role is "sender" or
// "recipient" and only picks the enhanced status code of a syntax error
// (5.1.7 or 5.1.3).
func ParseAddress(s string, smtputf8 bool, role string) (Address, *smtp.SMTPError) {
	bad := smtp.EnhancedCode{5, 1, 3}
	if role == "sender" {
		bad = smtp.EnhancedCode{5, 1, 7}
	}
	syntax := func(msg string) (Address, *smtp.SMTPError) {
		return Address{}, &smtp.SMTPError{Code: 501, EnhancedCode: bad, Message: msg}
	}
	if len(s)+2 > MaxPath {
		return syntax("Path too long")
	}
	if !utf8.ValidString(s) {
		return syntax("Address is not valid UTF-8")
	}
	if !smtputf8 && !isASCII(s) {
		return Address{}, &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 6, 7},
			Message: "Non-ASCII address requires SMTPUTF8"}
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return syntax("Control character in address")
		}
	}
	at := strings.LastIndexByte(s, '@')
	if at <= 0 || at == len(s)-1 {
		return syntax("Address must be local-part@domain")
	}
	a := Address{Local: s[:at], Domain: strings.ToLower(strings.TrimSuffix(s[at+1:], "."))}
	if len(a.Local) > MaxLocalPart {
		return syntax("Local part too long")
	}
	// Lower-casing can lengthen a UTF-8 domain: check the canonical form.
	if len(a.String())+2 > MaxPath {
		return syntax("Path too long")
	}
	if strings.ContainsAny(a.Local, "@%!") {
		a.Routed = true
	}
	if strings.HasPrefix(a.Domain, "[") {
		if _, ok := ParseLiteral(a.Domain); !ok {
			return syntax("Bad address literal")
		}
		return a, nil
	}
	if !ValidDomain(a.Domain) {
		return syntax("Bad domain")
	}
	return a, nil
}

// ValidDomain reports whether d is a domain name of LDH labels (or U-labels:
// any non-ASCII is allowed here and was checked against SMTPUTF8 before),
// each 1 to 63 octets, 255 in all (RFC 5321 §4.5.3.1.2). The one domain
// check, for addresses and for delivery alike.
func ValidDomain(d string) bool {
	if d == "" || len(d) > MaxDomain {
		return false
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			switch {
			case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c >= 0x80:
			default:
				return false
			}
		}
	}
	return true
}

// ParseLiteral parses an RFC 5321 §4.1.3 address literal, "[192.0.2.1]"
// or "[IPv6:2001:db8::1]", into its address (an IPv4-mapped IPv6 address
// comes back as IPv4). The one parser of literals, for addresses and for
// delivery alike.
func ParseLiteral(d string) (netip.Addr, bool) {
	if len(d) < 3 || d[0] != '[' || d[len(d)-1] != ']' {
		return netip.Addr{}, false
	}
	inner := d[1 : len(d)-1]
	if v6, ok := cutPrefixFold(inner, "ipv6:"); ok {
		a, err := netip.ParseAddr(v6)
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

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) < len(prefix) || !strings.EqualFold(s[:len(prefix)], prefix) {
		return s, false
	}
	return s[len(prefix):], true
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
