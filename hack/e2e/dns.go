//go:build e2e

package e2e

import (
	"fmt"
	"testing"

	"github.com/jetmail/jetmail/internal/dnstest"
)

// The recipient domains and where their MX records point. Every shape of
// destination the deliverers must handle has its own domains:
//
//   - normal: one MX, or two of equal preference, on the normal sinks;
//   - failover: the preferred MX is down (connection refused), a backup
//     at a lower preference works. We chose failover over leaving the
//     mail to defer: deferral forever would make every message to that
//     domain "lost" by the checker's rules, while failover checks that a
//     refused connection costs nothing but a retry on the next MX;
//   - tarpit: the preferred MX accepts and never greets; the greeting
//     timeout (DeliveryPolicy timeouts.greeting) must cut it, then the
//     backup MX takes the mail;
//   - grey: the only MX answers 451 to every RCPT for the first greyFor of
//     the traffic, then accepts: the mail is deferred and retried
//     (DeliveryPolicy retryIntervals);
//   - routed: a MailRoute sends it to hostC by address, skipping its MX
//     (hostD); the scenario then changes the route to hostMoved.
//   - senders: the senders' own domain, where DSNs arrive.
const (
	domainCount   = 30
	sendersDomain = "senders.test"
	routedDomain  = "d26.test"
)

// domainKind says which shape of destination domain i is.
func domainKind(i int) string {
	switch i {
	case 20, 21:
		return "failover"
	case 22, 23:
		return "tarpit"
	case 24, 25:
		return "grey"
	case 26:
		return "routed"
	}
	return "normal"
}

func domainName(i int) string { return fmt.Sprintf("d%02d.test", i) }

// startDNS serves the zone the deliverers resolve MX records in (--dns).
func startDNS(t *testing.T) *dnstest.Server {
	t.Helper()
	d := dnstest.Start(t)
	hosts := map[string]string{
		"mx-a": hostA, "mx-b": hostB, "mx-c": hostC, "mx-d": hostD, "mx-moved": hostMoved,
		"mx-senders": hostSenders, "mx-down": hostDown, "mx-tarpit": hostTarpit, "mx-grey": hostGrey,
	}
	for name, ip := range hosts {
		d.Add(t, fmt.Sprintf("%s.sinks.test. 300 IN A %s", name, ip))
	}
	normal := []string{"mx-a", "mx-b", "mx-c", "mx-d"}
	mx := func(dom string, pref int, host string) {
		d.Add(t, fmt.Sprintf("%s. 300 IN MX %d %s.sinks.test.", dom, pref, host))
	}
	for i := 0; i < domainCount; i++ {
		dom := domainName(i)
		switch domainKind(i) {
		case "normal":
			mx(dom, 10, normal[i%4])
			if i%3 == 0 {
				// Two MX of equal preference: the deliverers shuffle them.
				mx(dom, 10, normal[(i+1)%4])
			}
		case "failover":
			mx(dom, 10, "mx-down")
			mx(dom, 20, normal[i%4])
		case "tarpit":
			mx(dom, 10, "mx-tarpit")
			mx(dom, 20, normal[i%4])
		case "grey":
			mx(dom, 10, "mx-grey")
		case "routed":
			// Never used while the MailRoute is in force: mail seen on
			// hostD for this domain means the route was ignored.
			mx(dom, 10, "mx-d")
		}
	}
	mx(sendersDomain, 10, "mx-senders")
	return d
}
