// Package dnstest runs a DNS server on loopback (miekg/dns, UDP and TCP)
// that answers from a zone held in memory, for the tests of the resolver
// and of delivery: records in zone file syntax, failures by name (rcodes,
// silence, truncation, unchased CNAMEs), and counts of the queries it got.
package dnstest

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Server is a recursive DNS server on loopback serving a zone from memory.
// Its exported fields change how it answers; change them under Set.
type Server struct {
	// Addr is host:port, the same for UDP and TCP.
	Addr string

	mu      sync.Mutex
	records map[question][]dns.RR
	Rcodes  map[string]int  // name → rcode for every query about it
	Silent  map[string]bool // names never answered
	// NoChase answers a CNAME without the records of its target, as an
	// authoritative server for another zone would.
	NoChase bool
	// TruncateUDP answers every UDP query with an empty truncated reply.
	TruncateUDP bool
	// SOA goes in the authority section of negative answers; nil for none.
	SOA *dns.SOA
	// OnQuery, if set, is called for each query before it is answered.
	OnQuery func()
	// Signed are the zones ("example.com.") this server, playing a
	// validating resolver, says are DNSSEC-validated: an answer about a
	// name in one of them (and about every name of its CNAME chain) gets
	// the AD bit when the query asked for DNSSEC (DO or AD). A bogus
	// answer is a SERVFAIL: set it in Rcodes.
	Signed map[string]bool

	queries map[question]int
	// TCPQueries counts the queries that came over TCP.
	TCPQueries int
	// Last is the last query received.
	Last *dns.Msg
}

type question struct {
	name  string // lower case, fully qualified
	qtype uint16
}

// Start runs a Server on a random loopback port, UDP and TCP.
func Start(t *testing.T) *Server {
	t.Helper()
	var (
		pc  net.PacketConn
		ln  net.Listener
		err error
	)
	for range 20 {
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ln, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
	}
	if err != nil {
		t.Fatalf("no port free for both UDP and TCP: %v", err)
	}
	d := &Server{
		Addr:    pc.LocalAddr().String(),
		records: make(map[question][]dns.RR),
		Rcodes:  make(map[string]int),
		Silent:  make(map[string]bool),
		Signed:  make(map[string]bool),
		queries: make(map[question]int),
		SOA:     MustRR(t, "example.com. 120 IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 120").(*dns.SOA),
	}
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: d}, {Listener: ln, Handler: d}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			t.Fatal("DNS server did not start")
		}
		t.Cleanup(func() { srv.Shutdown() })
	}
	return d
}

// MustRR parses one record in zone file syntax.
func MustRR(t *testing.T, s string) dns.RR {
	t.Helper()
	rr, err := dns.NewRR(s)
	if err != nil {
		t.Fatalf("bad record %q: %v", s, err)
	}
	return rr
}

// Add puts records, in zone file syntax, into the zone.
func (d *Server) Add(t *testing.T, lines ...string) {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, line := range lines {
		rr := MustRR(t, line)
		q := question{strings.ToLower(rr.Header().Name), rr.Header().Rrtype}
		d.records[q] = append(d.records[q], rr)
	}
}

// Set runs f with the server's configuration locked.
func (d *Server) Set(f func(d *Server)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f(d)
}

// Count returns how many queries for name and qtype the server received.
func (d *Server) Count(name string, qtype uint16) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.queries[question{dns.Fqdn(name), qtype}]
}

// Total is how many queries the server received.
func (d *Server) Total() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, c := range d.queries {
		n += c
	}
	return n
}

// signed reports whether name is in one of the Signed zones.
func (d *Server) signed(name string) bool {
	for {
		if d.Signed[name] {
			return true
		}
		_, rest, ok := strings.Cut(name, ".")
		if !ok || rest == "" {
			return false
		}
		name = rest
	}
}

func (d *Server) exists(name string) bool {
	for q := range d.records {
		if q.name == name {
			return true
		}
	}
	return false
}

// ServeDNS answers from the zone, following CNAMEs as a recursive server
// would unless NoChase is set.
func (d *Server) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	if len(req.Question) != 1 {
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	_, udp := w.RemoteAddr().(*net.UDPAddr)

	d.mu.Lock()
	d.queries[question{name, q.Qtype}]++
	if !udp {
		d.TCPQueries++
	}
	d.Last = req.Copy()
	onQuery := d.OnQuery
	d.mu.Unlock()
	if onQuery != nil {
		onQuery()
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	if d.Silent[name] {
		return
	}
	resp := new(dns.Msg)
	resp.SetReply(req)
	resp.RecursionAvailable = true
	if rc, ok := d.Rcodes[name]; ok {
		resp.Rcode = rc
		w.WriteMsg(resp)
		return
	}
	if udp && d.TruncateUDP {
		resp.Truncated = true
		w.WriteMsg(resp)
		return
	}
	found := false
	secure := d.signed(name)
	for range 8 {
		if rrs := d.records[question{name, q.Qtype}]; len(rrs) > 0 {
			resp.Answer = append(resp.Answer, rrs...)
			found = true
			break
		}
		cname := d.records[question{name, dns.TypeCNAME}]
		if len(cname) == 0 || q.Qtype == dns.TypeCNAME {
			break
		}
		resp.Answer = append(resp.Answer, cname[0])
		if d.NoChase {
			found = true
			break
		}
		name = strings.ToLower(cname[0].(*dns.CNAME).Target)
		secure = secure && d.signed(name)
	}
	opt := req.IsEdns0()
	resp.AuthenticatedData = secure && (req.AuthenticatedData || opt != nil && opt.Do())
	if !found {
		if !d.exists(name) {
			resp.Rcode = dns.RcodeNameError
		}
		if d.SOA != nil {
			resp.Ns = []dns.RR{d.SOA}
		}
	}
	w.WriteMsg(resp)
}

// AddTXT publishes a TXT record of any length at name, split into strings
// of at most 255 octets as a zone file must.
func (d *Server) AddTXT(t *testing.T, name, value string) {
	t.Helper()
	var parts []string
	for len(value) > 255 {
		parts = append(parts, value[:255])
		value = value[255:]
	}
	rr := &dns.TXT{Hdr: dns.RR_Header{Name: dns.Fqdn(name), Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 300},
		Txt: append(parts, value)}
	d.mu.Lock()
	defer d.mu.Unlock()
	q := question{strings.ToLower(rr.Hdr.Name), dns.TypeTXT}
	d.records[q] = append(d.records[q], rr)
}

// LookupTXT asks the server at addr for the TXT records of name over UDP,
// as a verifier's resolver would, and returns each record's strings joined.
func LookupTXT(addr string) func(name string) ([]string, error) {
	return func(name string) ([]string, error) {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), dns.TypeTXT)
		c := &dns.Client{Timeout: 2 * time.Second}
		r, _, err := c.Exchange(m, addr)
		if err != nil {
			return nil, err
		}
		if r.Rcode != dns.RcodeSuccess {
			return nil, fmt.Errorf("%s: %s", name, dns.RcodeToString[r.Rcode])
		}
		var out []string
		for _, rr := range r.Answer {
			if txt, ok := rr.(*dns.TXT); ok {
				out = append(out, strings.Join(txt.Txt, ""))
			}
		}
		return out, nil
	}
}
