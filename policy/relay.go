package policy

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
)

// Defaults for what no RelayPolicy sets. None of them means "unlimited".
const (
	DefaultMaxMessageBytes     = 10 << 20
	DefaultMaxRecipients       = 100
	DefaultCommandTimeout      = 5 * time.Minute
	DefaultDataTimeout         = 10 * time.Minute
	DefaultSessionTimeout      = 30 * time.Minute
	DefaultMinDataRate         = 1024
	DefaultDataRateGrace       = 30 * time.Second
	DefaultMaxConnections      = 10000
	DefaultMaxConnectionsPerIP = 50
	DefaultMaxErrors           = 20
	DefaultMaxReceivedHeaders  = 100
)

// Relay is the compiled relay policy of the gateways.
type Relay struct {
	// Sources names the objects it was compiled from, for logs.
	Sources []string

	relayNets     []netip.Prefix
	normalizeNets []netip.Prefix
	domains       map[string]bool // exact accepted domains
	parents       []string        // ".example.org": subdomains accepted
	badSenders    map[string]bool // lower-case exact addresses
	badDomains    map[string]bool // lower-case domains from "@domain"
	users         map[string][]byte

	MaxMessageBytes   int64
	MaxRecipients     int
	AllowInsecureAuth bool

	CommandTimeout time.Duration
	DataTimeout    time.Duration
	SessionTimeout time.Duration
	MinDataRate    int64 // bytes per second; 0: not enforced
	DataRateGrace  time.Duration

	MaxConnections      int
	MaxConnectionsPerIP int
	MaxErrors           int
	MaxReceivedHeaders  int

	// DKIM holds the DKIMKeys: which mail the gateway signs, with what.
	DKIM *Signing
}

// Default is the policy in force when no RelayPolicy exists: loopback
// clients may relay, nobody else may send anywhere. Safe by default, useful
// at once.
func Default() *Relay {
	r, err := CompileRelay(nil, nil, CompileOptions{})
	if err != nil {
		panic(err) // the empty set always compiles
	}
	return r
}

// Secrets resolves a Secret key in a namespace, for AUTH user lists.
type Secrets func(namespace, name, key string) ([]byte, error)

// CompileRelay merges and validates RelayPolicy objects. Lists add up;
// a scalar set by two objects to different values is an error naming both.
func CompileRelay(objs []v1alpha1.RelayPolicy, secrets Secrets, opts CompileOptions) (*Relay, error) {
	r := &Relay{
		domains:    map[string]bool{},
		badSenders: map[string]bool{},
		badDomains: map[string]bool{},
		users:      map[string][]byte{},
	}
	if len(objs) == 0 {
		r.Sources = []string{"built-in default (loopback may relay)"}
		r.relayNets = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	}
	sc := scalars{}
	for i := range objs {
		o := &objs[i]
		name := objName("RelayPolicy", o.Namespace, o.Name)
		r.Sources = append(r.Sources, name)
		sp := &o.Spec
		for j, c := range sp.RelayNetworks {
			p, err := parsePrefix(c)
			if err != nil {
				return nil, fmt.Errorf("%s: spec.relayNetworks[%d]: %w", name, j, err)
			}
			r.relayNets = append(r.relayNets, p)
		}
		for j, c := range sp.NormalizeLineEndingsFrom {
			p, err := parsePrefix(c)
			if err != nil {
				return nil, fmt.Errorf("%s: spec.normalizeLineEndingsFrom[%d]: %w", name, j, err)
			}
			r.normalizeNets = append(r.normalizeNets, p)
		}
		for j, d := range sp.AcceptedDomains {
			d = strings.ToLower(strings.TrimSuffix(d, "."))
			parent := strings.TrimPrefix(strings.TrimPrefix(d, "*"), ".")
			if !ValidDomain(parent) {
				return nil, fmt.Errorf("%s: spec.acceptedDomains[%d]: %q is not a domain name", name, j, d)
			}
			if strings.HasPrefix(d, ".") || strings.HasPrefix(d, "*.") {
				r.parents = append(r.parents, "."+parent)
			} else {
				r.domains[parent] = true
			}
		}
		for j, s := range sp.RejectSenders {
			s = strings.ToLower(s)
			switch {
			case strings.HasPrefix(s, "@") && ValidDomain(s[1:]):
				r.badDomains[s[1:]] = true
			case strings.Count(s, "@") == 1 && !strings.HasPrefix(s, "@") && ValidDomain(s[strings.IndexByte(s, '@')+1:]):
				r.badSenders[s] = true
			default:
				return nil, fmt.Errorf("%s: spec.rejectSenders[%d]: %q is neither user@domain nor @domain", name, j, s)
			}
		}
		if v := sp.MaxMessageBytes; v != nil {
			if *v < 1024 {
				return nil, fmt.Errorf("%s: spec.maxMessageBytes: %d is below 1024", name, *v)
			}
			if err := sc.set("spec.maxMessageBytes", name, *v); err != nil {
				return nil, err
			}
			r.MaxMessageBytes = *v
		}
		if v := sp.MaxRecipients; v != nil {
			if *v < DefaultMaxRecipients {
				return nil, fmt.Errorf("%s: spec.maxRecipients: %d is below the %d RFC 5321 §4.5.3.1.8 requires", name, *v, DefaultMaxRecipients)
			}
			if err := sc.set("spec.maxRecipients", name, int64(*v)); err != nil {
				return nil, err
			}
			r.MaxRecipients = int(*v)
		}
		if a := sp.Auth; a != nil {
			if err := r.compileAuth(name, o.Namespace, a, secrets, opts); err != nil {
				return nil, err
			}
			if a.AllowInsecure {
				r.AllowInsecureAuth = true
			}
		}
		if t := sp.Timeouts; t != nil {
			for _, d := range []struct {
				field string
				src   *metav1.Duration
				dst   *time.Duration
			}{
				{"spec.timeouts.command", t.Command, &r.CommandTimeout},
				{"spec.timeouts.data", t.Data, &r.DataTimeout},
				{"spec.timeouts.session", t.Session, &r.SessionTimeout},
				{"spec.timeouts.dataRateGrace", t.DataRateGrace, &r.DataRateGrace},
			} {
				if d.src == nil {
					continue
				}
				if d.src.Duration <= 0 {
					return nil, fmt.Errorf("%s: %s: must be positive, got %s", name, d.field, d.src.Duration)
				}
				if err := sc.set(d.field, name, int64(d.src.Duration)); err != nil {
					return nil, err
				}
				*d.dst = d.src.Duration
			}
			if v := t.MinDataRate; v != nil {
				if *v < 0 {
					return nil, fmt.Errorf("%s: spec.timeouts.minDataRate: must not be negative", name)
				}
				if err := sc.set("spec.timeouts.minDataRate", name, *v); err != nil {
					return nil, err
				}
				r.MinDataRate = *v
			}
		}
		if l := sp.Limits; l != nil {
			for _, f := range []struct {
				field string
				src   *int32
				dst   *int
				min   int32
			}{
				{"spec.limits.maxConnections", l.MaxConnections, &r.MaxConnections, 1},
				{"spec.limits.maxConnectionsPerIP", l.MaxConnectionsPerIP, &r.MaxConnectionsPerIP, 1},
				{"spec.limits.maxErrors", l.MaxErrors, &r.MaxErrors, 1},
				{"spec.limits.maxReceivedHeaders", l.MaxReceivedHeaders, &r.MaxReceivedHeaders, 1},
			} {
				if f.src == nil {
					continue
				}
				if *f.src < f.min {
					return nil, fmt.Errorf("%s: %s: must be at least %d", name, f.field, f.min)
				}
				if err := sc.set(f.field, name, int64(*f.src)); err != nil {
					return nil, err
				}
				*f.dst = int(*f.src)
			}
		}
	}
	r.defaults(sc)
	return r, nil
}

func (r *Relay) defaults(set scalars) {
	set64 := func(v *int64, d int64) {
		if *v == 0 {
			*v = d
		}
	}
	setInt := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	setDur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	set64(&r.MaxMessageBytes, DefaultMaxMessageBytes)
	setInt(&r.MaxRecipients, DefaultMaxRecipients)
	setDur(&r.CommandTimeout, DefaultCommandTimeout)
	setDur(&r.DataTimeout, DefaultDataTimeout)
	setDur(&r.SessionTimeout, DefaultSessionTimeout)
	setDur(&r.DataRateGrace, DefaultDataRateGrace)
	if _, ok := set["spec.timeouts.minDataRate"]; !ok {
		r.MinDataRate = DefaultMinDataRate // 0 set explicitly turns the check off
	}
	setInt(&r.MaxConnections, DefaultMaxConnections)
	setInt(&r.MaxConnectionsPerIP, DefaultMaxConnectionsPerIP)
	setInt(&r.MaxErrors, DefaultMaxErrors)
	setInt(&r.MaxReceivedHeaders, DefaultMaxReceivedHeaders)
	sort.Strings(r.parents)
}

func (r *Relay) compileAuth(name, ns string, a *v1alpha1.RelayAuth, secrets Secrets, opts CompileOptions) error {
	var data []byte
	switch {
	case a.UsersSecretRef != nil && a.UsersFile != "":
		return fmt.Errorf("%s: spec.auth: set usersSecretRef or usersFile, not both", name)
	case a.UsersSecretRef != nil:
		if secrets == nil {
			return fmt.Errorf("%s: spec.auth.usersSecretRef: no Secrets available", name)
		}
		var err error
		data, err = secrets(ns, a.UsersSecretRef.Name, a.UsersSecretRef.Key)
		if err != nil {
			return fmt.Errorf("%s: spec.auth.usersSecretRef: %w", name, err)
		}
	case a.UsersFile != "" && !opts.AllowFiles:
		return fmt.Errorf("%s: spec.auth.usersFile: files are read only by jetmail serve; use spec.auth.usersSecretRef", name)
	case a.UsersFile != "":
		var err error
		data, err = readFile(a.UsersFile)
		if err != nil {
			return fmt.Errorf("%s: spec.auth.usersFile: %w", name, err)
		}
	default:
		return nil
	}
	users, err := ParseUsers(data)
	if err != nil {
		return fmt.Errorf("%s: spec.auth: %w", name, err)
	}
	for u, h := range users {
		r.users[u] = h
	}
	return nil
}

// ParseUsers reads "user:bcrypt-hash" lines; blank lines and # comments are
// skipped.
func ParseUsers(data []byte) (map[string][]byte, error) {
	users := map[string][]byte{}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		user, hash, ok := strings.Cut(line, ":")
		if !ok || user == "" {
			return nil, fmt.Errorf("users line %d: want user:bcrypt-hash", i+1)
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return nil, fmt.Errorf("users line %d (%s): not a bcrypt hash: %w", i+1, user, err)
		}
		users[user] = []byte(hash)
	}
	return users, nil
}

// HasUsers reports whether SMTP AUTH is configured.
func (r *Relay) HasUsers() bool { return len(r.users) > 0 }

// Authenticate checks a user name and password against the bcrypt hashes.
func (r *Relay) Authenticate(user, pass string) bool {
	h, ok := r.users[user]
	if !ok {
		// Spend the same time as a wrong password, so user names cannot be
		// probed by timing.
		_ = bcrypt.CompareHashAndPassword(dummyHash, []byte(pass))
		return false
	}
	return bcrypt.CompareHashAndPassword(h, []byte(pass)) == nil
}

var dummyHash, _ = bcrypt.GenerateFromPassword([]byte("jetmail"), bcrypt.DefaultCost)

// MayRelay reports whether a client may send to any domain.
func (r *Relay) MayRelay(ip netip.Addr, authenticated bool) bool {
	return authenticated || inNets(r.relayNets, ip)
}

// Normalize reports whether bare CR/LF from ip are normalized, not refused.
func (r *Relay) Normalize(ip netip.Addr) bool { return inNets(r.normalizeNets, ip) }

// CheckSender vets MAIL FROM. from is "" for the null reverse path.
func (r *Relay) CheckSender(from string, smtputf8 bool) *smtp.SMTPError {
	if from == "" {
		return nil
	}
	a, err := ParseAddress(from, smtputf8, "sender")
	if err != nil {
		return err
	}
	if r.badSenders[strings.ToLower(a.String())] || r.badDomains[a.Domain] {
		return &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Sender address rejected"}
	}
	return nil
}

// CheckRecipient vets RCPT TO for a client that may or may not relay.
func (r *Relay) CheckRecipient(to string, mayRelay, smtputf8 bool) *smtp.SMTPError {
	a, err := ParseAddress(to, smtputf8, "recipient")
	if err != nil {
		return err
	}
	if mayRelay {
		return nil
	}
	if a.Routed || !r.Accepts(a.Domain) {
		return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Relay access denied"}
	}
	return nil
}

// Accepts reports whether domain is one of the accepted domains (rcpthosts).
func (r *Relay) Accepts(domain string) bool {
	domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	if r.domains[domain] {
		return true
	}
	for _, p := range r.parents {
		if strings.HasSuffix(domain, p) {
			return true
		}
	}
	return false
}

func inNets(nets []netip.Prefix, ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, p := range nets {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

func parsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		if p != p.Masked() {
			return netip.Prefix{}, fmt.Errorf("%q has host bits set; did you mean %s?", s, p.Masked())
		}
		return p, nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	return netip.Prefix{}, fmt.Errorf("%q is not a CIDR or IP address", s)
}

// scalars detects one setting given two different values by two objects.
type scalars map[string]struct {
	by string
	v  int64
}

func (s scalars) set(field, by string, v int64) error {
	if prev, ok := s[field]; ok && prev.v != v {
		return fmt.Errorf("%s: %s conflicts with %s, which sets it to a different value", by, field, prev.by)
	}
	s[field] = struct {
		by string
		v  int64
	}{by, v}
	return nil
}

func objName(kind, ns, name string) string {
	if ns == "" {
		return kind + "/" + name
	}
	return kind + " " + ns + "/" + name
}
