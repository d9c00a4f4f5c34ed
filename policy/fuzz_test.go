package policy_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/jetmail/jetmail/policy"
)

// FuzzParseAddress checks that ParseAddress never panics and that whatever it
// accepts is within the RFC 5321 limits and is a fixed point: the canonical
// String() of an accepted address parses to the same Address.
func FuzzParseAddress(f *testing.F) {
	for _, seed := range []struct {
		s    string
		utf8 bool
	}{
		{"user@example.org", false},
		{"User@Example.ORG.", false},
		{"postmaster@[1.2.3.4]", false},
		{"postmaster@[IPv6:2001:db8::1]", false},
		{"u@[IPv6:::ffff:1.2.3.4]", false},
		{"u@[999.1.1.1]", false},
		{"relay%victim.test@example.org", false},
		{"victim.test!relay@example.org", false},
		{"relay@victim.test@example.org", false},
		{"jürgen@bücher.example", true},
		{"jürgen@bücher.example", false},
		{"x@ȺȺȺ.example", true},
		{"K@\u212a.example", true},
		{strings.Repeat("l", 64) + "@example.org", false},
		{strings.Repeat("l", 65) + "@example.org", false},
		{"u@" + strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + ".org", false},
		{"@", false},
		{"a@.", false},
		{"a@b..", false},
		{"\x00@\x7f", false},
		{"a@[", false},
		{"a@[]", false},
		{"a\xff@example.org", true},
	} {
		f.Add(seed.s, seed.utf8)
	}
	f.Fuzz(func(t *testing.T, s string, smtputf8 bool) {
		for _, role := range []string{"sender", "recipient"} {
			a, err := policy.ParseAddress(s, smtputf8, role)
			if err != nil {
				if err.Code != 501 && err.Code != 553 {
					t.Fatalf("ParseAddress(%q) refused with %d; want 501 or 553", s, err.Code)
				}
				continue
			}
			if len(a.Local) == 0 || len(a.Local) > policy.MaxLocalPart {
				t.Fatalf("ParseAddress(%q) accepted a local part of %d octets", s, len(a.Local))
			}
			literal := strings.HasPrefix(a.Domain, "[")
			if !literal && !policy.ValidDomain(a.Domain) {
				t.Fatalf("ParseAddress(%q) accepted the invalid domain %q", s, a.Domain)
			}
			if literal && !strings.HasSuffix(a.Domain, "]") {
				t.Fatalf("ParseAddress(%q) accepted the malformed literal %q", s, a.Domain)
			}
			if a.Domain != strings.ToLower(a.Domain) {
				t.Fatalf("ParseAddress(%q) left upper case in the domain %q", s, a.Domain)
			}
			if !utf8.ValidString(a.String()) {
				t.Fatalf("ParseAddress(%q) accepted invalid UTF-8", s)
			}
			if !smtputf8 && strings.ContainsFunc(a.String(), func(r rune) bool { return r >= 0x80 }) {
				t.Fatalf("ParseAddress(%q) accepted non-ASCII without SMTPUTF8", s)
			}
			if strings.ContainsAny(a.Local, "%!@") != a.Routed {
				t.Fatalf("ParseAddress(%q): Routed = %v for local part %q", s, a.Routed, a.Local)
			}
			again, err := policy.ParseAddress(a.String(), smtputf8, role)
			if err != nil {
				t.Fatalf("ParseAddress(%q) = %+v, but its String() %q is refused: %d %s", s, a, a.String(), err.Code, err.Message)
			}
			if again != a {
				t.Fatalf("ParseAddress(%q) = %+v; re-parsing %q gives %+v", s, a, a.String(), again)
			}
		}
	})
}

func TestParseAddressCanonicalFormStaysWithinThePathLimit(t *testing.T) {
	// 254 octets as sent (256 with brackets); the lower-case domain is one octet longer.
	d := "\u023a" + strings.Repeat("a", 60) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 61)
	in := "u@" + d
	if len(in) != policy.MaxPath-2 {
		t.Fatalf("test input has %d octets; want %d", len(in), policy.MaxPath-2)
	}
	a, err := policy.ParseAddress(in, true, "recipient")
	if err != nil {
		return // refusing it is consistent
	}
	if n := len(a.String()) + 2; n > policy.MaxPath {
		t.Fatalf("accepted %d-octet input; its canonical path has %d octets, over the %d limit", len(in)+2, n, policy.MaxPath)
	}
}

func TestParseAddressRefusesAnIPv6ZoneInALiteral(t *testing.T) {
	// RFC 5321 §4.1.3 IPv6-addr has no zone; a zone names an interface of
	// the host that parses it, which means nothing to the sender.
	a, err := policy.ParseAddress("u@[IPv6:fe80::1%eth0]", false, "recipient")
	if err == nil {
		t.Fatalf("accepted %+v", a)
	}
}
