package resolve

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/jetmail/jetmail/deliverer/failure"
)

// MX resolution (RFC 5321 §5.1) talks to the configured recursive DNS
// servers directly, so that it can tell "does not exist" (bounce) from "could
// not ask" (defer), which the standard library's resolver folds together.
const (
	defaultSMTPPort   = 25
	defaultDNSTimeout = 5 * time.Second
	// ednsBufferSize is the EDNS0 UDP payload size recommended by DNS Flag
	// Day 2020: large enough for most MX and address RRsets, small enough
	// to avoid IP fragmentation.
	ednsBufferSize = 1232
	// maxPositiveTTL caps how long an answer is cached, whatever its TTL.
	maxPositiveTTL = time.Hour
	// maxNegativeTTL caps how long NXDOMAIN and NODATA are cached
	// (RFC 2308 §5 allows up to the SOA minimum; we want fixes to show up
	// soon).
	maxNegativeTTL = 5 * time.Minute
	// defaultNegativeTTL applies to negative answers without an SOA record.
	defaultNegativeTTL = 60 * time.Second
	// maxCNAMEDepth bounds CNAME chains, within one answer and across the
	// queries made to follow them.
	maxCNAMEDepth = 8
	// maxCacheEntries bounds the cache; past it, expired entries are swept
	// and, if that is not enough, arbitrary ones dropped.
	maxCacheEntries = 50000
	// resolvConf is read when Resolver.Servers is empty.
	resolvConf = "/etc/resolv.conf"
)

// Hop is one address to try, in order.
type Hop struct {
	// Host is the MX (or route) host name, lower case without trailing dot;
	// for an address literal, the IP as a string.
	Host string
	// Addr is where to connect.
	Addr netip.AddrPort
	// Pref is the MX preference (0 for implicit MX, literals and routes).
	Pref int
	// DNSSEC says that every answer that led here (the MX records, when
	// there were any, and the host's address records) was validated by
	// DNSSEC: the host's TLSA records may be used (RFC 7672 §2.2). Only
	// set when the Resolver's DNSSEC is.
	DNSSEC bool
}

// Resolver finds the hops for a recipient domain (RFC 5321 §5.1). It caches
// DNS answers for their TTL and is safe for concurrent use; it must not be
// copied after first use.
type Resolver struct {
	// Servers are the DNS servers ("host:port"), asked in order until one
	// gives an authoritative NOERROR or NXDOMAIN. Empty: the nameservers of
	// /etc/resolv.conf, read once.
	Servers []string
	// Port is the SMTP port for MX delivery and address literals; 0 means 25.
	Port uint16
	// Timeout bounds each DNS query (UDP plus any TCP retry) per server;
	// 0 means 5s.
	Timeout time.Duration
	// IsLocal reports whether a host name or address is this cluster itself;
	// such MX hosts/addresses are skipped to avoid loops. It is asked about
	// each MX host name with the zero Addr, then about each of its addresses.
	// Nil: nothing is local.
	IsLocal func(host string, addr netip.Addr) bool
	// DNSSEC says the Servers validate DNSSEC, so their AD bit is
	// trusted: queries ask for validation, and answers carry whether they
	// were validated (Hop.DNSSEC, TLSA). Off, nothing is taken as validated
	// and DANE is never used, as in Postfix without smtp_dns_support_level
	// = dnssec: a resolver that does not validate would say nothing true.
	DNSSEC bool
	// Now is the clock for the cache (tests); nil means time.Now.
	Now func() time.Time

	confOnce    sync.Once
	confServers []string
	confErr     error

	mu    sync.Mutex
	cache map[cacheKey]cacheEntry
}

type cacheKey struct {
	name  string // lower case, no trailing dot
	qtype uint16
}

// cacheEntry is one processed DNS answer.
type cacheEntry struct {
	rrs     []dns.RR // records of the asked type at the end of the CNAME chain
	nx      bool     // NXDOMAIN
	cname   string   // the chain ended at this name without its records: ask again
	secure  bool     // the server validated the answer (AD set; DNSSEC only)
	expires time.Time
}

// answer is the result of a query after following CNAMEs.
type answer struct {
	rrs    []dns.RR
	nx     bool
	secure bool // every answer on the way was validated
}

// Lookup returns the hops for domain, ordered: by MX preference ascending,
// equal preferences shuffled on every call (so load spreads across them),
// and for each MX host its IPv4 addresses then its IPv6 addresses.
//
// Errors are *Error: permanent when the DNS says the domain cannot receive
// mail (nonexistent, null MX, no usable MX host, a loop back to this
// cluster), temporary when the DNS could not be asked or answered with a
// failure.
func (r *Resolver) Lookup(ctx context.Context, domain string) ([]Hop, error) {
	port := r.port()
	if strings.HasPrefix(domain, "[") {
		addr, ok := parseDomainLiteral(domain)
		if !ok {
			return nil, failure.Permanent(550, "5.1.2", "invalid address literal %q", domain)
		}
		if r.isLocal(addr.String(), addr) {
			return nil, loopError(domain)
		}
		return []Hop{{Host: addr.String(), Addr: netip.AddrPortFrom(addr, port)}}, nil
	}
	name, ok := normalizeDomain(domain)
	if !ok {
		return nil, failure.Permanent(550, "5.1.2", "invalid domain %q", domain)
	}

	mx, err := r.query(ctx, name, dns.TypeMX)
	if err != nil {
		return nil, err
	}
	if mx.nx {
		return nil, failure.Permanent(550, "5.1.2", "domain %s does not exist", name)
	}
	if len(mx.rrs) == 0 {
		return r.implicitMX(ctx, name, port, mx.secure)
	}

	type mxHost struct {
		pref int
		host string
	}
	hosts := make([]mxHost, 0, len(mx.rrs))
	for _, rr := range mx.rrs {
		rec, ok := rr.(*dns.MX)
		if !ok {
			continue
		}
		host := canonicalName(rec.Mx)
		if host == "" {
			// Target "." (RFC 7505). Alone it is a null MX; next to real
			// MX records (which RFC 7505 forbids) it is just unusable.
			continue
		}
		hosts = append(hosts, mxHost{pref: int(rec.Preference), host: host})
	}
	if len(hosts) == 0 {
		return nil, failure.Permanent(556, "5.1.10", "domain does not accept mail (null MX)")
	}
	// Shuffle, then sort stably: equal preferences end up in random order.
	rand.Shuffle(len(hosts), func(i, j int) { hosts[i], hosts[j] = hosts[j], hosts[i] })
	slices.SortStableFunc(hosts, func(a, b mxHost) int { return a.pref - b.pref })

	// RFC 5321 §5.1: if this cluster is one of the MX hosts, only hosts
	// with a lower preference value may be used; anything else would send
	// the mail back to us or to a backup MX that forwards it to us.
	type resolved struct {
		mxHost
		addrs  []netip.Addr
		err    error
		secure bool
	}
	cutoff := math.MaxInt
	var candidates []resolved
	for _, h := range hosts {
		if err := ctx.Err(); err != nil {
			return nil, failure.Temporary(451, "4.4.3", "MX lookup for %s: %v", name, err)
		}
		if h.pref >= cutoff {
			break
		}
		if r.isLocal(h.host, netip.Addr{}) {
			cutoff = h.pref
			break
		}
		addrs, secure, err := r.resolveAddrs(ctx, h.host)
		if slices.ContainsFunc(addrs, func(a netip.Addr) bool { return r.isLocal(h.host, a) }) {
			cutoff = h.pref
			break
		}
		candidates = append(candidates, resolved{mxHost: h, addrs: addrs, err: err, secure: mx.secure && secure})
	}

	var (
		hops    []Hop
		seen    = make(map[netip.Addr]bool)
		tempErr error
		usable  bool
	)
	for _, c := range candidates {
		if c.pref >= cutoff {
			continue
		}
		usable = true
		if c.err != nil && tempErr == nil {
			tempErr = c.err
		}
		for _, a := range c.addrs {
			if seen[a] {
				continue
			}
			seen[a] = true
			hops = append(hops, Hop{Host: c.host, Addr: netip.AddrPortFrom(a, port), Pref: c.pref, DNSSEC: c.secure})
		}
	}
	switch {
	case len(hops) > 0:
		return hops, nil
	case !usable:
		return nil, loopError(name)
	case tempErr != nil:
		return nil, failure.Temporary(451, "4.4.3", "no MX host of %s could be resolved: %s", name, errorText(tempErr))
	default:
		return nil, failure.Permanent(550, "5.4.4", "no address for any MX host")
	}
}

// implicitMX delivers to the domain's own addresses when it has no MX
// records (RFC 5321 §5.1).
// mxSecure says the MX lookup that found none was validated.
func (r *Resolver) implicitMX(ctx context.Context, name string, port uint16, mxSecure bool) ([]Hop, error) {
	if r.isLocal(name, netip.Addr{}) {
		return nil, loopError(name)
	}
	addrs, secure, err := r.resolveAddrs(ctx, name)
	if err != nil {
		return nil, err
	}
	if len(addrs) == 0 {
		return nil, failure.Permanent(550, "5.1.2", "domain %s has no MX and no address records", name)
	}
	hops := make([]Hop, 0, len(addrs))
	for _, a := range addrs {
		if r.isLocal(name, a) {
			return nil, loopError(name)
		}
		hops = append(hops, Hop{Host: name, Addr: netip.AddrPortFrom(a, port), DNSSEC: mxSecure && secure})
	}
	return hops, nil
}

// ResolveHost resolves a host name (A then AAAA) to hops at the given port
// (0 means the Resolver's Port), for static routes. A literal IP (or "[ip]",
// or "[IPv6:ip]") needs no DNS.
//
// A route is the operator's explicit choice, so IsLocal is not applied (a
// route to a content filter on this host is legitimate), and a host that
// does not resolve is a temporary error: a typo in a route defers mail until
// it is fixed instead of bouncing it.
func (r *Resolver) ResolveHost(ctx context.Context, host string, port uint16) ([]Hop, error) {
	if port == 0 {
		port = r.port()
	}
	if addr, ok := parseHostIP(host); ok {
		return []Hop{{Host: addr.String(), Addr: netip.AddrPortFrom(addr, port)}}, nil
	}
	name, ok := normalizeDomain(host)
	if !ok {
		return nil, failure.Temporary(451, "4.3.5", "invalid route host %q", host)
	}
	addrs, secure, err := r.resolveAddrs(ctx, name)
	if err != nil {
		return nil, err
	}
	if len(addrs) == 0 {
		return nil, failure.Temporary(451, "4.4.4", "no address for route host %s", name)
	}
	hops := make([]Hop, 0, len(addrs))
	for _, a := range addrs {
		hops = append(hops, Hop{Host: name, Addr: netip.AddrPortFrom(a, port), DNSSEC: secure})
	}
	return hops, nil
}

// resolveAddrs returns the IPv4 then the IPv6 addresses of name, and
// whether every answer that gave them was validated. The error is a
// temporary *Error, only when no address was found and a lookup failed; no
// addresses and no error means the name has none (NXDOMAIN or NODATA for
// both types).
func (r *Resolver) resolveAddrs(ctx context.Context, name string) ([]netip.Addr, bool, error) {
	var (
		addrs  []netip.Addr
		errs   []error
		secure = true
	)
	for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA} {
		ans, err := r.query(ctx, name, qtype)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		secure = secure && ans.secure
		for _, rr := range ans.rrs {
			var ip net.IP
			switch rec := rr.(type) {
			case *dns.A:
				ip = rec.A.To4()
			case *dns.AAAA:
				ip = rec.AAAA.To16()
			}
			if a, ok := netip.AddrFromSlice(ip); ok {
				addrs = append(addrs, a)
			}
		}
	}
	if len(addrs) == 0 && len(errs) > 0 {
		return nil, false, errs[0]
	}
	return addrs, secure, nil
}

// query asks for name's records of qtype, from the cache or the DNS,
// following CNAME chains the server did not resolve itself.
func (r *Resolver) query(ctx context.Context, name string, qtype uint16) (answer, error) {
	cur, secure := name, true
	for range maxCNAMEDepth {
		e, err := r.queryOnce(ctx, cur, qtype)
		if err != nil {
			return answer{}, err
		}
		secure = secure && e.secure
		if e.cname == "" {
			return answer{rrs: e.rrs, nx: e.nx, secure: secure}, nil
		}
		cur = e.cname
	}
	return answer{}, failure.Temporary(451, "4.4.3", "DNS lookup of %s %s: CNAME chain too long", name, dns.TypeToString[qtype])
}

// queryOnce answers one question from the cache, else from the DNS, caching
// NOERROR and NXDOMAIN answers; failures are not cached.
func (r *Resolver) queryOnce(ctx context.Context, name string, qtype uint16) (cacheEntry, error) {
	key := cacheKey{name: name, qtype: qtype}
	if e, ok := r.cached(key); ok {
		return e, nil
	}
	msg, err := r.exchange(ctx, name, qtype)
	if err != nil {
		return cacheEntry{}, err
	}
	e, ttl := processAnswer(msg, name, qtype)
	e.secure = r.DNSSEC && msg.AuthenticatedData
	r.store(key, e, ttl)
	return e, nil
}

// processAnswer turns a NOERROR or NXDOMAIN response into a cache entry and
// the time it may be cached.
func processAnswer(msg *dns.Msg, name string, qtype uint16) (cacheEntry, time.Duration) {
	if msg.Rcode == dns.RcodeNameError {
		// An NXDOMAIN answer may carry a CNAME chain to the missing name;
		// either way there is nothing at the end of it.
		return cacheEntry{nx: true}, negativeTTL(msg)
	}
	var e cacheEntry
	cur := name
	for range maxCNAMEDepth {
		for _, rr := range msg.Answer {
			if rr.Header().Rrtype == qtype && canonicalName(rr.Header().Name) == cur {
				e.rrs = append(e.rrs, rr)
			}
		}
		if len(e.rrs) > 0 {
			break
		}
		next := ""
		for _, rr := range msg.Answer {
			if c, ok := rr.(*dns.CNAME); ok && canonicalName(c.Hdr.Name) == cur {
				next = canonicalName(c.Target)
				break
			}
		}
		if next == "" || next == cur {
			break
		}
		cur = next
	}
	if len(e.rrs) == 0 && cur != name {
		e.cname = cur
	}
	if len(e.rrs) == 0 && e.cname == "" {
		return e, negativeTTL(msg) // NODATA
	}
	ttl := maxPositiveTTL
	for _, rr := range msg.Answer {
		ttl = min(ttl, time.Duration(rr.Header().Ttl)*time.Second)
	}
	return e, ttl
}

// negativeTTL is how long to cache NXDOMAIN or NODATA: the smaller of the
// SOA's TTL and its minimum field (RFC 2308 §5), capped.
func negativeTTL(msg *dns.Msg) time.Duration {
	for _, rr := range msg.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			ttl := time.Duration(min(soa.Hdr.Ttl, soa.Minttl)) * time.Second
			return min(ttl, maxNegativeTTL)
		}
	}
	return defaultNegativeTTL
}

// exchange asks the servers in order until one answers NOERROR or NXDOMAIN.
// Any other outcome is a temporary *Error.
func (r *Resolver) exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	servers, err := r.servers()
	if err != nil {
		return nil, failure.Temporary(451, "4.4.3", "DNS lookup of %s %s: %v", name, dns.TypeToString[qtype], err)
	}
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	q.RecursionDesired = true
	// With DNSSEC, ask for validation: DO for the records and their
	// signatures, AD for the verdict (RFC 6840 §5.7).
	q.SetEdns0(ednsBufferSize, r.DNSSEC)
	q.AuthenticatedData = r.DNSSEC

	var last error
	for _, server := range servers {
		if err := ctx.Err(); err != nil {
			last = err
			break
		}
		resp, err := r.exchangeWith(ctx, q, server)
		if err != nil {
			last = fmt.Errorf("%s: %w", server, err)
			continue
		}
		if resp.Rcode == dns.RcodeSuccess || resp.Rcode == dns.RcodeNameError {
			return resp, nil
		}
		last = fmt.Errorf("%s: %s", server, dns.RcodeToString[resp.Rcode])
	}
	return nil, failure.Temporary(451, "4.4.3", "DNS lookup of %s %s: %v", name, dns.TypeToString[qtype], last)
}

// exchangeWith sends q to one server over UDP, retrying over TCP if the
// answer was truncated, all within the per-query timeout.
func (r *Resolver) exchangeWith(ctx context.Context, q *dns.Msg, server string) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout())
	defer cancel()
	resp, err := exchangeOver(ctx, "udp", q, server)
	if resp != nil && resp.Truncated {
		resp, err = exchangeOver(ctx, "tcp", q, server)
	}
	if err != nil {
		return nil, err
	}
	if len(resp.Question) != 1 || resp.Question[0].Qtype != q.Question[0].Qtype ||
		!strings.EqualFold(resp.Question[0].Name, q.Question[0].Name) {
		return nil, errors.New("answer does not match the question")
	}
	return resp, nil
}

// exchangeOver does one exchange on network. The dns package only honours
// the context's deadline, so cancellation closes the connection.
func exchangeOver(ctx context.Context, network string, q *dns.Msg, server string) (*dns.Msg, error) {
	c := &dns.Client{Net: network}
	if deadline, ok := ctx.Deadline(); ok {
		// Without this the package's own 2s default would apply.
		c.Timeout = time.Until(deadline)
	}
	conn, err := c.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	resp, _, err := c.ExchangeWithConnContext(ctx, q, conn)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return resp, err
}

func (r *Resolver) servers() ([]string, error) {
	if len(r.Servers) > 0 {
		return r.Servers, nil
	}
	r.confOnce.Do(func() {
		conf, err := dns.ClientConfigFromFile(resolvConf)
		if err != nil {
			r.confErr = fmt.Errorf("no DNS servers: %w", err)
			return
		}
		for _, s := range conf.Servers {
			r.confServers = append(r.confServers, net.JoinHostPort(s, conf.Port))
		}
		if len(r.confServers) == 0 {
			r.confErr = fmt.Errorf("no DNS servers in %s", resolvConf)
		}
	})
	return r.confServers, r.confErr
}

func (r *Resolver) cached(key cacheKey) (cacheEntry, bool) {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.cache[key]
	if !ok {
		return cacheEntry{}, false
	}
	if !now.Before(e.expires) {
		delete(r.cache, key)
		return cacheEntry{}, false
	}
	return e, true
}

func (r *Resolver) store(key cacheKey, e cacheEntry, ttl time.Duration) {
	if ttl <= 0 {
		return
	}
	now := r.now()
	e.expires = now.Add(ttl)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cache == nil {
		r.cache = make(map[cacheKey]cacheEntry)
	}
	if len(r.cache) >= maxCacheEntries {
		for k, old := range r.cache {
			if !now.Before(old.expires) {
				delete(r.cache, k)
			}
		}
		for k := range r.cache {
			if len(r.cache) < maxCacheEntries*3/4 {
				break
			}
			delete(r.cache, k)
		}
	}
	r.cache[key] = e
}

func (r *Resolver) port() uint16 {
	if r.Port == 0 {
		return defaultSMTPPort
	}
	return r.Port
}

func (r *Resolver) timeout() time.Duration {
	if r.Timeout <= 0 {
		return defaultDNSTimeout
	}
	return r.Timeout
}

func (r *Resolver) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func (r *Resolver) isLocal(host string, addr netip.Addr) bool {
	return r.IsLocal != nil && r.IsLocal(host, addr)
}

func loopError(domain string) *failure.Error {
	return failure.Permanent(554, "5.4.6", "mail for %s loops back to myself", domain)
}

func errorText(err error) string {
	var e *failure.Error
	if errors.As(err, &e) {
		return e.Text
	}
	return err.Error()
}
