package policy

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
)

// Outbound defaults, RFC 5321 §4.5.3.2 where it has a word to say. They
// are the only ones: the deliverer takes every outbound setting from a
// compiled Delivery, and fills a zero timeout from these (see
// OutboundTimeouts.WithDefaults).
const (
	DefaultConnectTimeout    = 30 * time.Second
	DefaultGreetingTimeout   = 5 * time.Minute
	DefaultEhloTimeout       = 5 * time.Minute // the 5 minutes of the greeting and the other commands
	DefaultStartTLSTimeout   = 2 * time.Minute // STARTTLS, its reply and the TLS handshake
	DefaultAuthTimeout       = 2 * time.Minute // each step of the AUTH exchange
	DefaultMailTimeout       = 5 * time.Minute
	DefaultRcptTimeout       = 5 * time.Minute
	DefaultDataInitTimeout   = 2 * time.Minute
	DefaultDataBlockTimeout  = 3 * time.Minute
	DefaultDataDoneTimeout   = 10 * time.Minute
	DefaultOutboundSession   = 15 * time.Minute
	DefaultOutboundMinRate   = 512
	DefaultOutboundRateGrace = 30 * time.Second
	DefaultQueueLifetime     = 5 * 24 * time.Hour
	DefaultDeadDestination   = time.Minute
	DefaultMaxSessions       = 100
	DefaultMaxPerDestination = 20
	DefaultPerConnection     = 100 // messages one reused connection carries before QUIT
	DefaultSMTPPort          = 25
)

// DefaultRetryIntervals: a first retry within 5 minutes, three attempts in
// the first hour, then every 2 hours.
var DefaultRetryIntervals = []time.Duration{5 * time.Minute, 10 * time.Minute, 20 * time.Minute,
	40 * time.Minute, 80 * time.Minute, 2 * time.Hour}

// OutboundTimeouts bound one delivery session, that is one connection's
// use for one delivery. Each per-command timeout covers one command and
// its reply; Session is a hard wall-clock deadline for everything from the
// dial to the last reply, however the server paces its bytes. A compiled
// Delivery and its Routes have every field set (DefaultOutboundTimeouts,
// then spec.timeouts); the CRD has no field for Ehlo, StartTLS and Auth,
// which always take their defaults.
type OutboundTimeouts struct {
	// Connect bounds the TCP connection setup.
	Connect time.Duration
	// Greeting bounds the wait for the 220 banner (RFC 5321 §4.5.3.2.1).
	Greeting time.Duration
	// Ehlo bounds EHLO (or the HELO fallback) and its reply.
	Ehlo time.Duration
	// StartTLS bounds STARTTLS, its reply and the TLS handshake.
	StartTLS time.Duration
	// Auth bounds each step of the AUTH exchange.
	Auth time.Duration
	// Mail bounds MAIL FROM (RFC 5321 §4.5.3.2.2).
	Mail time.Duration
	// Rcpt bounds each RCPT TO (RFC 5321 §4.5.3.2.3).
	Rcpt time.Duration
	// DataInit bounds DATA and its 354 (RFC 5321 §4.5.3.2.4).
	DataInit time.Duration
	// DataBlock bounds each write of message data (RFC 5321 §4.5.3.2.5).
	DataBlock time.Duration
	// DataDone bounds the wait for the reply to the final dot
	// (RFC 5321 §4.5.3.2.6).
	DataDone time.Duration
	// Session is a hard wall-clock deadline for the whole session: nothing,
	// not even a server trickling a byte a second, keeps it past this.
	Session time.Duration
	// MinDataRate is the lowest average rate, in bytes per second, at which
	// the server must take message data once DataRateGrace has passed;
	// 0 turns the check off.
	MinDataRate int64
	// DataRateGrace is how long after the start of the data the rate is not
	// checked.
	DataRateGrace time.Duration
}

// DefaultOutboundTimeouts returns the timeouts of RFC 5321 §4.5.3.2, a 30 s
// connect timeout, a 15 minute session deadline and a 512 B/s minimum data
// rate after 30 s. EHLO gets the 5 minutes of the other commands; STARTTLS
// (with its handshake) and each AUTH step get 2 minutes.
func DefaultOutboundTimeouts() OutboundTimeouts {
	return OutboundTimeouts{
		Connect:       DefaultConnectTimeout,
		Greeting:      DefaultGreetingTimeout,
		Ehlo:          DefaultEhloTimeout,
		StartTLS:      DefaultStartTLSTimeout,
		Auth:          DefaultAuthTimeout,
		Mail:          DefaultMailTimeout,
		Rcpt:          DefaultRcptTimeout,
		DataInit:      DefaultDataInitTimeout,
		DataBlock:     DefaultDataBlockTimeout,
		DataDone:      DefaultDataDoneTimeout,
		Session:       DefaultOutboundSession,
		MinDataRate:   DefaultOutboundMinRate,
		DataRateGrace: DefaultOutboundRateGrace,
	}
}

// WithDefaults returns t with every zero or negative duration taken from
// DefaultOutboundTimeouts, so a forgotten field never means "forever".
// MinDataRate is left alone, since zero turns the check off; a negative
// rate becomes zero.
func (t OutboundTimeouts) WithDefaults() OutboundTimeouts {
	d := DefaultOutboundTimeouts()
	for _, f := range []struct{ v, def *time.Duration }{
		{&t.Connect, &d.Connect}, {&t.Greeting, &d.Greeting}, {&t.Ehlo, &d.Ehlo},
		{&t.StartTLS, &d.StartTLS}, {&t.Auth, &d.Auth}, {&t.Mail, &d.Mail},
		{&t.Rcpt, &d.Rcpt}, {&t.DataInit, &d.DataInit}, {&t.DataBlock, &d.DataBlock},
		{&t.DataDone, &d.DataDone}, {&t.Session, &d.Session}, {&t.DataRateGrace, &d.DataRateGrace},
	} {
		if *f.v <= 0 {
			*f.v = *f.def
		}
	}
	if t.MinDataRate < 0 {
		t.MinDataRate = 0
	}
	return t
}

// TLSPolicy says whether a delivery session must be encrypted with STARTTLS
// (RFC 3207) and whether the next hop's certificate is checked. It is
// compiled from MailRoute spec.tls; MX delivery is TLSOpportunistic.
type TLSPolicy string

const (
	// TLSNone never sends STARTTLS.
	TLSNone TLSPolicy = "none"
	// TLSOpportunistic uses STARTTLS when the server offers it, without
	// checking the certificate. If the handshake fails the same hop is
	// dialed once more and the message sent in plaintext (RFC 7435).
	TLSOpportunistic TLSPolicy = "opportunistic"
	// TLSRequired needs STARTTLS to be offered and to succeed; the
	// certificate is not checked. Otherwise the hop fails with a temporary
	// 4.7.4 (STARTTLS not offered or refused) or 4.7.5 (handshake failed).
	TLSRequired TLSPolicy = "required"
	// TLSVerify is TLSRequired with a certificate that must verify for the
	// hop's host name; a failed check is a temporary 4.7.5.
	TLSVerify TLSPolicy = "verify"
	// TLSDANE is TLSRequired with a certificate that must match the hop's
	// TLSA records (RFC 7672). The deliverer sets it for a hop whose host
	// publishes usable TLSA records under DNSSEC; no MailRoute names it.
	TLSDANE TLSPolicy = "dane"
)

// compileTLS converts MailRoute spec.tls; empty is TLSOpportunistic.
func compileTLS(v v1alpha1.TLSPolicy) (TLSPolicy, bool) {
	switch v {
	case "", v1alpha1.TLSOpportunistic:
		return TLSOpportunistic, true
	case v1alpha1.TLSNone:
		return TLSNone, true
	case v1alpha1.TLSRequired:
		return TLSRequired, true
	case v1alpha1.TLSVerify:
		return TLSVerify, true
	}
	return "", false
}

// Delivery is the compiled outbound configuration.
type Delivery struct {
	Sources []string

	Timeouts       OutboundTimeouts
	RetryIntervals []time.Duration
	QueueLifetime  time.Duration
	DelayWarning   time.Duration // 0: off
	// DeadDestination is how long a destination whose every next hop
	// failed is left alone before one attempt probes it again.
	DeadDestination time.Duration
	MaxSessions     int
	MaxPerDest      int
	// PerConnection is how many messages one reused connection carries
	// before QUIT. The deliverer reads it from the configuration in force
	// each time it decides whether a connection may carry another message.
	PerConnection int
	Port          uint16
	Postmaster    string
	// DANE authenticates MX hosts by their TLSA records when the
	// deliverer's resolver validates DNSSEC; MTASTS applies recipient
	// domains' MTA-STS policies. Both on by default.
	DANE, MTASTS bool

	localNames map[string]bool
	localAddrs map[netip.Addr]bool

	exact    map[string]*Route
	suffixes []*routeSuffix // longest first
	catchAll *Route
}

type routeSuffix struct {
	suffix string // ".example.org"
	route  *Route
}

// Route is a compiled MailRoute.
type Route struct {
	// Name is "MailRoute namespace/name", for logs.
	Name string
	Hops []RouteHop
	TLS  TLSPolicy
	// Auth is nil when the route does not log in.
	Auth *Credentials
	// Timeouts are the DeliveryPolicy's, changed by the route's
	// spec.timeouts; every field is set.
	Timeouts OutboundTimeouts
	// DANE authenticates the route's hosts by their TLSA records;
	// MTASTS holds them to the recipient domain's MTA-STS policy. Both
	// off by default: a route names its hosts itself.
	DANE, MTASTS bool
}

// RouteHop is one next hop of a route.
type RouteHop struct {
	Host string // name or IP
	Port uint16
	// Literal is set for "[ip]" hops: no DNS at all.
	Literal bool
}

func (h RouteHop) String() string { return net.JoinHostPort(h.Host, strconv.Itoa(int(h.Port))) }

// Credentials log in to a next hop with AUTH PLAIN, or LOGIN when the
// server offers only LOGIN (RFC 4954). The deliverer sends them only over
// TLS unless told otherwise.
type Credentials struct {
	Username, Password string
}

// DefaultDelivery is the outbound configuration when nothing is configured.
func DefaultDelivery() *Delivery {
	d, err := CompileDelivery(nil, nil, nil, CompileOptions{})
	if err != nil {
		panic(err)
	}
	return d
}

// CompileDelivery validates and compiles DeliveryPolicy (at most one) and
// MailRoute objects.
func CompileDelivery(dps []v1alpha1.DeliveryPolicy, routes []v1alpha1.MailRoute, secrets Secrets, opts CompileOptions) (*Delivery, error) {
	d := &Delivery{
		Timeouts:        DefaultOutboundTimeouts(),
		RetryIntervals:  DefaultRetryIntervals,
		QueueLifetime:   DefaultQueueLifetime,
		DeadDestination: DefaultDeadDestination,
		MaxSessions:     DefaultMaxSessions,
		MaxPerDest:      DefaultMaxPerDestination,
		PerConnection:   DefaultPerConnection,
		Port:            DefaultSMTPPort,
		DANE:            true,
		MTASTS:          true,
		localNames:      map[string]bool{},
		localAddrs:      map[netip.Addr]bool{},
		exact:           map[string]*Route{},
	}
	if len(dps) > 1 {
		return nil, fmt.Errorf("%s: a DeliveryPolicy is already defined by %s; there can be only one",
			objName("DeliveryPolicy", dps[1].Namespace, dps[1].Name), objName("DeliveryPolicy", dps[0].Namespace, dps[0].Name))
	}
	if len(dps) == 1 {
		if err := d.compilePolicy(&dps[0]); err != nil {
			return nil, err
		}
	}
	// owner records which route claimed each domain pattern.
	owner := map[string]string{}
	add := func(name, pattern string, r *Route) error {
		pattern = strings.ToLower(strings.TrimSuffix(pattern, "."))
		if prev, ok := owner[pattern]; ok {
			return fmt.Errorf("%s: domain %q is already routed by %s", name, pattern, prev)
		}
		owner[pattern] = name
		switch {
		case pattern == "*":
			d.catchAll = r
		case strings.HasPrefix(pattern, "*."):
			if !ValidDomain(pattern[2:]) {
				return fmt.Errorf("%s: spec.domains: %q is not a domain pattern", name, pattern)
			}
			d.suffixes = append(d.suffixes, &routeSuffix{suffix: pattern[1:], route: r})
		default:
			if !ValidDomain(pattern) {
				return fmt.Errorf("%s: spec.domains: %q is not a domain name", name, pattern)
			}
			d.exact[pattern] = r
		}
		return nil
	}
	for i := range routes {
		o := &routes[i]
		name := objName("MailRoute", o.Namespace, o.Name)
		d.Sources = append(d.Sources, name)
		r, err := d.compileRoute(name, o, secrets, opts)
		if err != nil {
			return nil, err
		}
		if len(o.Spec.Domains) == 0 {
			return nil, fmt.Errorf("%s: spec.domains: at least one domain is required", name)
		}
		for _, p := range o.Spec.Domains {
			if err := add(name, p, r); err != nil {
				return nil, err
			}
		}
	}
	if relayhost := opts.Relayhost; relayhost != "" {
		hop, err := parseHop(relayhost)
		if err != nil {
			return nil, fmt.Errorf("--relayhost: %w", err)
		}
		r := &Route{Name: "relayhost " + relayhost, Hops: []RouteHop{hop}, TLS: TLSOpportunistic, Timeouts: d.Timeouts}
		if err := add("--relayhost", "*", r); err != nil {
			return nil, err
		}
		d.Sources = append(d.Sources, r.Name)
	}
	sort.Slice(d.suffixes, func(i, j int) bool { return len(d.suffixes[i].suffix) > len(d.suffixes[j].suffix) })
	return d, nil
}

func (d *Delivery) compilePolicy(o *v1alpha1.DeliveryPolicy) error {
	name := objName("DeliveryPolicy", o.Namespace, o.Name)
	d.Sources = append(d.Sources, name)
	sp := &o.Spec
	if err := mergeOutbound(name, "spec.timeouts", &d.Timeouts, sp.Timeouts); err != nil {
		return err
	}
	if len(sp.RetryIntervals) > 0 {
		d.RetryIntervals = nil
		for i, r := range sp.RetryIntervals {
			if r.Duration <= 0 {
				return fmt.Errorf("%s: spec.retryIntervals[%d]: must be positive, got %s", name, i, r.Duration)
			}
			d.RetryIntervals = append(d.RetryIntervals, r.Duration)
		}
	}
	if err := positive(name, "spec.queueLifetime", sp.QueueLifetime, &d.QueueLifetime); err != nil {
		return err
	}
	if err := positive(name, "spec.delayWarning", sp.DelayWarning, &d.DelayWarning); err != nil {
		return err
	}
	if err := positive(name, "spec.deadDestinationTime", sp.DeadDestinationTime, &d.DeadDestination); err != nil {
		return err
	}
	for _, f := range []struct {
		field string
		v     *int32
		dst   *int
	}{
		{"spec.maxSessions", sp.MaxSessions, &d.MaxSessions},
		{"spec.maxSessionsPerDestination", sp.MaxSessionsPerDestination, &d.MaxPerDest},
		{"spec.messagesPerConnection", sp.MessagesPerConnection, &d.PerConnection},
	} {
		if f.v == nil {
			continue
		}
		if *f.v < 1 {
			return fmt.Errorf("%s: %s: must be at least 1", name, f.field)
		}
		*f.dst = int(*f.v)
	}
	if sp.Port != nil {
		if *sp.Port < 1 || *sp.Port > 65535 {
			return fmt.Errorf("%s: spec.port: %d is not a port", name, *sp.Port)
		}
		d.Port = uint16(*sp.Port)
	}
	for i, h := range sp.LocalHosts {
		if a, err := netip.ParseAddr(strings.Trim(h, "[]")); err == nil {
			d.localAddrs[a.Unmap()] = true
			continue
		}
		h = strings.ToLower(strings.TrimSuffix(h, "."))
		if !ValidDomain(h) {
			return fmt.Errorf("%s: spec.localHosts[%d]: %q is neither a host name nor an address", name, i, h)
		}
		d.localNames[h] = true
	}
	if sp.DANE != nil {
		d.DANE = *sp.DANE
	}
	if sp.MTASTS != nil {
		d.MTASTS = *sp.MTASTS
	}
	if sp.Postmaster != "" {
		if _, err := ParseAddress(sp.Postmaster, true, "recipient"); err != nil {
			return fmt.Errorf("%s: spec.postmaster: %q is not an address", name, sp.Postmaster)
		}
		d.Postmaster = sp.Postmaster
	}
	return nil
}

func (d *Delivery) compileRoute(name string, o *v1alpha1.MailRoute, secrets Secrets, opts CompileOptions) (*Route, error) {
	tlsp, ok := compileTLS(o.Spec.TLS)
	if !ok {
		return nil, fmt.Errorf("%s: spec.tls: %q is not one of none, opportunistic, required, verify", name, o.Spec.TLS)
	}
	r := &Route{Name: name, TLS: tlsp, Timeouts: d.Timeouts,
		DANE: o.Spec.DANE != nil && *o.Spec.DANE, MTASTS: o.Spec.MTASTS != nil && *o.Spec.MTASTS}
	if tlsp == TLSNone && (r.DANE || r.MTASTS) {
		return nil, fmt.Errorf("%s: spec.tls: none cannot go with spec.dane or spec.mtaSTS, which need TLS", name)
	}
	if len(o.Spec.NextHops) == 0 {
		return nil, fmt.Errorf("%s: spec.nextHops: at least one next hop is required", name)
	}
	for i, h := range o.Spec.NextHops {
		hop, err := parseHop(h)
		if err != nil {
			return nil, fmt.Errorf("%s: spec.nextHops[%d]: %w", name, i, err)
		}
		r.Hops = append(r.Hops, hop)
	}
	if a := o.Spec.Auth; a != nil {
		var raw string
		switch {
		case a.SecretRef != nil && a.File != "":
			return nil, fmt.Errorf("%s: spec.auth: set secretRef or file, not both", name)
		case a.SecretRef != nil:
			if secrets == nil {
				return nil, fmt.Errorf("%s: spec.auth.secretRef: no Secrets available", name)
			}
			u, err := secrets(o.Namespace, a.SecretRef.Name, "username")
			if err != nil {
				return nil, fmt.Errorf("%s: spec.auth.secretRef: %w", name, err)
			}
			p, err := secrets(o.Namespace, a.SecretRef.Name, "password")
			if err != nil {
				return nil, fmt.Errorf("%s: spec.auth.secretRef: %w", name, err)
			}
			raw = string(u) + ":" + string(p)
		case a.File != "" && !opts.AllowFiles:
			return nil, fmt.Errorf("%s: spec.auth.file: files are read only by jetmail serve; use spec.auth.secretRef", name)
		case a.File != "":
			b, err := readFile(a.File)
			if err != nil {
				return nil, fmt.Errorf("%s: spec.auth.file: %w", name, err)
			}
			raw = strings.TrimSpace(string(b))
		}
		user, pass, ok := strings.Cut(raw, ":")
		if !ok || user == "" {
			return nil, fmt.Errorf("%s: spec.auth: credentials must be username and password", name)
		}
		r.Auth = &Credentials{Username: user, Password: pass}
	}
	if err := mergeOutbound(name, "spec.timeouts", &r.Timeouts, o.Spec.Timeouts); err != nil {
		return nil, err
	}
	return r, nil
}

// parseHop reads "host", "host:port", "[ip]" or "[ip]:port".
func parseHop(s string) (RouteHop, error) {
	host, port := s, DefaultSMTPPort
	if h, p, err := net.SplitHostPort(s); err == nil {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return RouteHop{}, fmt.Errorf("%q: bad port", s)
		}
		host, port = h, n
		if strings.HasPrefix(s, "[") {
			host = "[" + h + "]"
		}
	}
	if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		a, err := netip.ParseAddr(host[1 : len(host)-1])
		if err != nil {
			return RouteHop{}, fmt.Errorf("%q: bad address literal", s)
		}
		return RouteHop{Host: a.String(), Port: uint16(port), Literal: true}, nil
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return RouteHop{Host: a.String(), Port: uint16(port), Literal: true}, nil
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if !ValidDomain(host) {
		return RouteHop{}, fmt.Errorf("%q is not host, host:port or [ip]:port", s)
	}
	return RouteHop{Host: host, Port: uint16(port)}, nil
}

// mergeOutbound applies spec.timeouts. Ehlo, StartTLS and Auth have no
// field in the API and keep what dst has.
func mergeOutbound(name, path string, dst *OutboundTimeouts, src *v1alpha1.OutboundTimeouts) error {
	if src == nil {
		return nil
	}
	for _, f := range []struct {
		field string
		v     *metav1.Duration
		dst   *time.Duration
	}{
		{"connect", src.Connect, &dst.Connect}, {"greeting", src.Greeting, &dst.Greeting},
		{"mail", src.Mail, &dst.Mail}, {"rcpt", src.Rcpt, &dst.Rcpt},
		{"dataInit", src.DataInit, &dst.DataInit}, {"dataBlock", src.DataBlock, &dst.DataBlock},
		{"dataDone", src.DataDone, &dst.DataDone}, {"session", src.Session, &dst.Session},
		{"dataRateGrace", src.DataRateGrace, &dst.DataRateGrace},
	} {
		if err := positive(name, path+"."+f.field, f.v, f.dst); err != nil {
			return err
		}
	}
	if src.MinDataRate != nil {
		if *src.MinDataRate < 0 {
			return fmt.Errorf("%s: %s.minDataRate: must not be negative", name, path)
		}
		dst.MinDataRate = *src.MinDataRate
	}
	return nil
}

func positive(name, field string, v *metav1.Duration, dst *time.Duration) error {
	if v == nil {
		return nil
	}
	if v.Duration <= 0 {
		return fmt.Errorf("%s: %s: must be positive, got %s", name, field, v.Duration)
	}
	*dst = v.Duration
	return nil
}

// Route returns the static route for a recipient domain, or nil for MX
// delivery. An exact domain wins over "*.suffix" (longest first), which
// wins over the catch-all.
func (d *Delivery) Route(domain string) *Route {
	domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	if r, ok := d.exact[domain]; ok {
		return r
	}
	for _, s := range d.suffixes {
		if strings.HasSuffix(domain, s.suffix) {
			return s.route
		}
	}
	return d.catchAll
}

// IsLocal reports whether a host name or address is this cluster.
func (d *Delivery) IsLocal(host string, addr netip.Addr) bool {
	if host != "" && d.localNames[strings.ToLower(strings.TrimSuffix(host, "."))] {
		return true
	}
	return addr.IsValid() && d.localAddrs[addr.Unmap()]
}

// RetryDelay is the wait before attempt number n+1 after n attempts
// (n >= 1), with up to 10% random jitter so retries of a burst spread out.
func (d *Delivery) RetryDelay(n int) time.Duration {
	if n < 1 {
		n = 1
	}
	i := n - 1
	if i >= len(d.RetryIntervals) {
		i = len(d.RetryIntervals) - 1
	}
	base := d.RetryIntervals[i]
	return base + time.Duration(rand.Int64N(int64(base)/10+1))
}
