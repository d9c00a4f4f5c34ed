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

// Outbound defaults, RFC 5321 §4.5.3.2 where it has a word to say.
const (
	DefaultConnectTimeout    = 30 * time.Second
	DefaultGreetingTimeout   = 5 * time.Minute
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
	DefaultPerConnection     = 100
	DefaultSMTPPort          = 25
)

// DefaultRetryIntervals: a first retry within 5 minutes, three attempts in
// the first hour, then every 2 hours.
var DefaultRetryIntervals = []time.Duration{5 * time.Minute, 10 * time.Minute, 20 * time.Minute,
	40 * time.Minute, 80 * time.Minute, 2 * time.Hour}

// OutboundTimeouts bound one outbound session.
type OutboundTimeouts struct {
	Connect, Greeting, Mail, Rcpt, DataInit, DataBlock, DataDone, Session time.Duration
	MinDataRate                                                           int64
	DataRateGrace                                                         time.Duration
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
	PerConnection   int
	Port            uint16
	Postmaster      string

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
	Name     string
	Hops     []RouteHop
	TLS      string
	Auth     *Credentials
	Timeouts OutboundTimeouts
}

// RouteHop is one next hop of a route.
type RouteHop struct {
	Host string // name or IP
	Port uint16
	// Literal is set for "[ip]" hops: no DNS at all.
	Literal bool
}

func (h RouteHop) String() string { return net.JoinHostPort(h.Host, strconv.Itoa(int(h.Port))) }

// Credentials log in to a next hop.
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
		Timeouts:        defaultOutbound(),
		RetryIntervals:  DefaultRetryIntervals,
		QueueLifetime:   DefaultQueueLifetime,
		DeadDestination: DefaultDeadDestination,
		MaxSessions:     DefaultMaxSessions,
		MaxPerDest:      DefaultMaxPerDestination,
		PerConnection:   DefaultPerConnection,
		Port:            DefaultSMTPPort,
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
		r := &Route{Name: "relayhost " + relayhost, Hops: []RouteHop{hop}, TLS: string(v1alpha1.TLSOpportunistic), Timeouts: d.Timeouts}
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
	if sp.Postmaster != "" {
		if _, err := ParseAddress(sp.Postmaster, true, "recipient"); err != nil {
			return fmt.Errorf("%s: spec.postmaster: %q is not an address", name, sp.Postmaster)
		}
		d.Postmaster = sp.Postmaster
	}
	return nil
}

func (d *Delivery) compileRoute(name string, o *v1alpha1.MailRoute, secrets Secrets, opts CompileOptions) (*Route, error) {
	r := &Route{Name: name, TLS: string(o.Spec.TLS), Timeouts: d.Timeouts}
	switch o.Spec.TLS {
	case "":
		r.TLS = string(v1alpha1.TLSOpportunistic)
	case v1alpha1.TLSNone, v1alpha1.TLSOpportunistic, v1alpha1.TLSRequired, v1alpha1.TLSVerify:
	default:
		return nil, fmt.Errorf("%s: spec.tls: %q is not one of none, opportunistic, required, verify", name, o.Spec.TLS)
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

func defaultOutbound() OutboundTimeouts {
	return OutboundTimeouts{
		Connect: DefaultConnectTimeout, Greeting: DefaultGreetingTimeout, Mail: DefaultMailTimeout,
		Rcpt: DefaultRcptTimeout, DataInit: DefaultDataInitTimeout, DataBlock: DefaultDataBlockTimeout,
		DataDone: DefaultDataDoneTimeout, Session: DefaultOutboundSession,
		MinDataRate: DefaultOutboundMinRate, DataRateGrace: DefaultOutboundRateGrace,
	}
}

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
