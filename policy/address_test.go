package policy_test

import (
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/jetmail/jetmail/policy"
)

// label63 is one DNS label of the maximum 63 octets.
var label63 = strings.Repeat("a", 63)

// domainOf returns a valid domain of exactly n octets made of labels of at
// most 63 octets.
func domainOf(n int) string {
	var labels []string
	for n > 0 {
		l := min(63, n)
		if n-l == 1 { // never leave a one-octet remainder that needs a dot
			l--
		}
		labels = append(labels, strings.Repeat("d", l))
		n -= l + 1
	}
	return strings.Join(labels, ".")
}

func TestDomainOfHelper(t *testing.T) {
	for _, n := range []int{1, 63, 64, 65, 127, 253, 254, 255, 256} {
		d := domainOf(n)
		if len(d) != n {
			t.Fatalf("domainOf(%d) has %d octets", n, len(d))
		}
		for _, l := range strings.Split(d, ".") {
			if l == "" || len(l) > 63 {
				t.Fatalf("domainOf(%d) has a label of %d octets", n, len(l))
			}
		}
	}
}

func TestParseAddress(t *testing.T) {
	local64 := strings.Repeat("l", 64)
	// A path of 256 octets with its angle brackets: 254 between them.
	path254 := "u@" + domainOf(252)
	for name, tc := range map[string]struct {
		in       string
		utf8     bool
		role     string
		want     policy.Address
		code     int
		enhanced smtp.EnhancedCode
	}{
		"a plain address is accepted": {
			in: "user@example.org", want: policy.Address{Local: "user", Domain: "example.org"}},
		"the domain is folded to lower case and the local part is not": {
			in: "User.Name@Example.ORG", want: policy.Address{Local: "User.Name", Domain: "example.org"}},
		"a trailing dot on the domain is dropped": {
			in: "user@example.org.", want: policy.Address{Local: "user", Domain: "example.org"}},
		"a local part of exactly 64 octets is accepted": {
			in: local64 + "@example.org", want: policy.Address{Local: local64, Domain: "example.org"}},
		"a local part of 65 octets is refused": {
			in: local64 + "l@example.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a sender with a local part of 65 octets is refused with 5.1.7": {
			in: local64 + "l@example.org", role: "sender", code: 501, enhanced: smtp.EnhancedCode{5, 1, 7}},
		"a path of exactly 256 octets with brackets is accepted": {
			in: path254, want: policy.Address{Local: "u", Domain: domainOf(252)}},
		"a path of 257 octets with brackets is refused": {
			in: "uu@" + domainOf(252), code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a sender path of 257 octets is refused with 5.1.7": {
			in: "uu@" + domainOf(252), role: "sender", code: 501, enhanced: smtp.EnhancedCode{5, 1, 7}},
		"a label of 63 octets is accepted": {
			in: "u@" + label63 + ".org", want: policy.Address{Local: "u", Domain: label63 + ".org"}},
		"a label of 64 octets is refused": {
			in: "u@" + label63 + "a.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an IPv4 address literal is accepted": {
			in: "postmaster@[1.2.3.4]", want: policy.Address{Local: "postmaster", Domain: "[1.2.3.4]"}},
		"an IPv6 address literal is accepted": {
			in: "postmaster@[IPv6:::1]", want: policy.Address{Local: "postmaster", Domain: "[ipv6:::1]"}},
		"an IPv4 literal with an octet over 255 is refused": {
			in: "u@[999.1.1.1]", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an IPv6 address without the IPv6 tag is refused": {
			in: "u@[::1]", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an IPv4 address with the IPv6 tag is refused": {
			in: "u@[IPv6:1.2.3.4]", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an unclosed address literal is refused": {
			in: "u@[1.2.3.4", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an empty address literal is refused": {
			in: "u@[]", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"non-ASCII without SMTPUTF8 is refused with 553 5.6.7": {
			in: "jürgen@example.org", code: 553, enhanced: smtp.EnhancedCode{5, 6, 7}},
		"a non-ASCII domain without SMTPUTF8 is refused with 553 5.6.7": {
			in: "user@bücher.example", code: 553, enhanced: smtp.EnhancedCode{5, 6, 7}},
		"non-ASCII with SMTPUTF8 is accepted": {
			in: "jürgen@bücher.example", utf8: true, want: policy.Address{Local: "jürgen", Domain: "bücher.example"}},
		"invalid UTF-8 is refused even with SMTPUTF8": {
			in: "j\xffrgen@example.org", utf8: true, code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a NUL is refused": {
			in: "us\x00er@example.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a carriage return is refused": {
			in: "user@example.org\r", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a line feed is refused": {
			in: "us\ner@example.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a tab is refused": {
			in: "us\ter@example.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a DEL is refused": {
			in: "us\x7fer@example.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a sender with a control character is refused with 5.1.7": {
			in: "us\x01er@example.org", role: "sender", code: 501, enhanced: smtp.EnhancedCode{5, 1, 7}},
		"an address without @ is refused": {
			in: "postmaster", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an empty local part is refused": {
			in: "@example.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an empty domain is refused": {
			in: "user@", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a domain that is only a dot is refused": {
			in: "user@.", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an empty label is refused": {
			in: "user@example..org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a label starting with a hyphen is refused": {
			in: "user@-example.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a label ending with a hyphen is refused": {
			in: "user@example-.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"an underscore in the domain is refused": {
			in: "user@ex_ample.org", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"the empty string is refused": {
			in: "", code: 501, enhanced: smtp.EnhancedCode{5, 1, 3}},
		"a percent hack sets Routed": {
			in: "user%victim.test@example.org", want: policy.Address{Local: "user%victim.test", Domain: "example.org", Routed: true}},
		"a bang path sets Routed": {
			in: "victim.test!user@example.org", want: policy.Address{Local: "victim.test!user", Domain: "example.org", Routed: true}},
		"an @ in the (unquoted) local part sets Routed": {
			in: "user@victim.test@example.org", want: policy.Address{Local: "user@victim.test", Domain: "example.org", Routed: true}},
		"plus addressing is not routing": {
			in: "user+tag@example.org", want: policy.Address{Local: "user+tag", Domain: "example.org"}},
	} {
		t.Run(name, func(t *testing.T) {
			role := tc.role
			if role == "" {
				role = "recipient"
			}
			got, err := policy.ParseAddress(tc.in, tc.utf8, role)
			if tc.code == 0 {
				if err != nil {
					t.Fatalf("ParseAddress(%q) = %v; want %+v", tc.in, err, tc.want)
				}
				if got != tc.want {
					t.Fatalf("ParseAddress(%q) = %+v; want %+v", tc.in, got, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("ParseAddress(%q) = %+v, nil; want %d %v", tc.in, got, tc.code, tc.enhanced)
			}
			if err.Code != tc.code || err.EnhancedCode != tc.enhanced {
				t.Fatalf("ParseAddress(%q) = %d %v %q; want %d %v", tc.in, err.Code, err.EnhancedCode, err.Message, tc.code, tc.enhanced)
			}
			if err.Message == "" {
				t.Fatalf("ParseAddress(%q) refused without a message", tc.in)
			}
			if got != (policy.Address{}) {
				t.Fatalf("ParseAddress(%q) refused but returned %+v", tc.in, got)
			}
		})
	}
}

func TestValidDomain(t *testing.T) {
	for name, tc := range map[string]struct {
		d    string
		want bool
	}{
		"a domain of 255 octets in 63-octet labels is valid": {label63 + "." + label63 + "." + label63 + "." + label63, true},
		"a domain of exactly 255 octets is valid":            {domainOf(255), true},
		"a domain of 256 octets is not valid":                {domainOf(256), false},
		"a single label is valid":                            {"localhost", true},
		"digits and hyphens inside a label are valid":        {"a-1.example", true},
		"upper case is valid":                                {"EXAMPLE.org", true},
		"a U-label is valid":                                 {"bücher.example", true},
		"the empty string is not valid":                      {"", false},
		"a trailing dot is not valid here":                   {"example.org.", false},
		"a leading dot is not valid":                         {".example.org", false},
		"a space is not valid":                               {"exa mple.org", false},
		"a wildcard is not valid":                            {"*.example.org", false},
		"an address literal is not a domain":                 {"[1.2.3.4]", false},
	} {
		t.Run(name, func(t *testing.T) {
			if got := policy.ValidDomain(tc.d); got != tc.want {
				t.Fatalf("ValidDomain(%q) (%d octets) = %v; want %v", tc.d, len(tc.d), got, tc.want)
			}
		})
	}
}

func TestAddressString(t *testing.T) {
	a := policy.Address{Local: "User", Domain: "example.org"}
	if got := a.String(); got != "User@example.org" {
		t.Fatalf("String() = %q", got)
	}
}
