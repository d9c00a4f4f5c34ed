// Package mtasts finds the SMTP MTA Strict Transport Security policy
// (RFC 8461) of a recipient domain: its _mta-sts TXT record, the policy
// fetched over HTTPS from mta-sts.<domain>, and a cache of policies shared
// by every deliverer of the cluster (a NATS KV bucket), so that a policy is
// fetched once per cluster and keeps protecting the domain for its max_age
// even while its record or its web server cannot be reached (that is what
// stops an attacker who blocks them from turning it off).
//
// It says which policy is in force; the deliverer decides what that means
// for each MX host (Policy.Match) and the outbound client enforces it.
//
// No maintained Go library for MTA-STS is served to this project
// (github.com/foxcpp/go-mtasts, maddy's, is not); the parsing here follows
// RFC 8461 §3.1 and §3.2 and is tested against its examples.
package mtasts

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Mode is a policy's mode (RFC 8461 §5).
type Mode string

// The modes.
const (
	// Enforce: deliver only to MX hosts the policy names, over TLS with a
	// certificate valid for the host's name.
	Enforce Mode = "enforce"
	// Testing: deliver as without a policy, and report what enforce would
	// have refused.
	Testing Mode = "testing"
	// None: the domain withdrew its policy.
	None Mode = "none"
)

// MaxMaxAge is the largest max_age a policy may give: a year (RFC 8461
// §3.2).
const MaxMaxAge = 31557600 * time.Second

// Policy is a domain's MTA-STS policy as fetched.
type Policy struct {
	// Domain is the policy domain (lower case A-labels).
	Domain string `json:"domain"`
	// ID is the id of the TXT record that announced the policy when it was
	// fetched; a record with another id means there is a new policy.
	ID     string        `json:"id"`
	Mode   Mode          `json:"mode"`
	MX     []string      `json:"mx"`
	MaxAge time.Duration `json:"maxAge"`
	// Fetched is when the policy was fetched.
	Fetched time.Time `json:"fetched"`
}

// Expires is when the policy stops applying unless fetched again.
func (p *Policy) Expires() time.Time { return p.Fetched.Add(p.MaxAge) }

// Match reports whether host (an MX host name) is one the policy names:
// equal to a pattern, or one label more than a "*." pattern (RFC 8461
// §4.1: "*.example.com" matches "mx.example.com", not
// "a.mx.example.com").
func (p *Policy) Match(host string) bool {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	for _, pat := range p.MX {
		if rest, ok := strings.CutPrefix(pat, "*."); ok {
			label, parent, found := strings.Cut(host, ".")
			if found && label != "" && parent == rest {
				return true
			}
			continue
		}
		if host == pat {
			return true
		}
	}
	return false
}

// ErrNoRecord says a domain publishes no usable _mta-sts record: none, or
// not exactly one that starts with "v=STSv1;" (RFC 8461 §3.1).
var ErrNoRecord = errors.New("no MTA-STS record")

// ParseRecord returns the id of the one MTA-STS record among a domain's
// _mta-sts TXT records.
func ParseRecord(txts []string) (string, error) {
	var rec string
	n := 0
	for _, t := range txts {
		if strings.HasPrefix(t, "v=STSv1;") {
			rec = t
			n++
		}
	}
	if n != 1 {
		return "", ErrNoRecord
	}
	id := ""
	for _, field := range strings.Split(rec, ";") {
		field = strings.Trim(field, " \t")
		if field == "" {
			continue
		}
		k, v, ok := strings.Cut(field, "=")
		if !ok {
			return "", fmt.Errorf("%w: field %q has no value", ErrNoRecord, field)
		}
		if k == "id" {
			if id != "" {
				return "", fmt.Errorf("%w: two ids", ErrNoRecord)
			}
			id = v
		}
	}
	if id == "" || len(id) > 32 || strings.ContainsFunc(id, func(r rune) bool { return !isAlnum(r) }) {
		return "", fmt.Errorf("%w: id %q is not 1 to 32 letters and digits", ErrNoRecord, id)
	}
	return id, nil
}

// ParsePolicy parses a policy file (RFC 8461 §3.2): "key: value" lines
// ending in CRLF (LF alone is accepted too), version STSv1, a mode, a
// max_age of at most a year, and at least one mx pattern unless the mode is
// none. Unknown keys are ignored; a repeated key other than mx is an error.
func ParsePolicy(body []byte) (*Policy, error) {
	p := &Policy{}
	seen := map[string]bool{}
	for _, line := range strings.Split(string(body), "\n") {
		line = strings.TrimSuffix(line, "\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("policy line %q has no colon", line)
		}
		k, v = strings.TrimSpace(k), strings.Trim(v, " \t")
		if k != "mx" && seen[k] {
			return nil, fmt.Errorf("policy key %q given twice", k)
		}
		seen[k] = true
		switch k {
		case "version":
			if v != "STSv1" {
				return nil, fmt.Errorf("policy version %q is not STSv1", v)
			}
		case "mode":
			switch m := Mode(v); m {
			case Enforce, Testing, None:
				p.Mode = m
			default:
				return nil, fmt.Errorf("policy mode %q is not enforce, testing or none", v)
			}
		case "max_age":
			if v == "" || len(v) > 10 || strings.ContainsFunc(v, func(r rune) bool { return r < '0' || r > '9' }) {
				return nil, fmt.Errorf("policy max_age %q is not a number of seconds", v)
			}
			n, _ := strconv.ParseInt(v, 10, 64)
			if n > int64(MaxMaxAge/time.Second) {
				return nil, fmt.Errorf("policy max_age %d exceeds a year", n)
			}
			p.MaxAge = time.Duration(n) * time.Second
		case "mx":
			pat := strings.ToLower(strings.TrimSuffix(v, "."))
			if !validPattern(pat) {
				return nil, fmt.Errorf("policy mx %q is not a host name or *.domain", v)
			}
			p.MX = append(p.MX, pat)
		}
	}
	switch {
	case !seen["version"]:
		return nil, errors.New("policy has no version")
	case p.Mode == "":
		return nil, errors.New("policy has no mode")
	case !seen["max_age"]:
		return nil, errors.New("policy has no max_age")
	case p.Mode != None && len(p.MX) == 0:
		return nil, errors.New("policy names no mx")
	}
	return p, nil
}

// validPattern accepts a host name, or "*." and a domain.
func validPattern(s string) bool {
	s = strings.TrimPrefix(s, "*.")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		if strings.ContainsFunc(label, func(r rune) bool { return !isAlnum(r) && r != '-' }) {
			return false
		}
	}
	return true
}

func isAlnum(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9'
}
