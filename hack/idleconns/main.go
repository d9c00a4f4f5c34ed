// Command idleconns holds many idle SMTP connections open against a gateway
// and reports the gateway's resident memory, to check that connections cost
// little. Connections come from many loopback source addresses so the
// per-client-IP limit does not refuse them.
//
//	go run ./hack/idleconns -addr 127.0.0.1:2525 -n 5000 -pid $(pgrep -f 'jetmail serve')
package main

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:2525", "gateway SMTP address (loopback)")
	n := flag.Int("n", 5000, "connections to hold")
	perIP := flag.Int("per-ip", 40, "connections per source address (below the gateway's per-IP limit)")
	pid := flag.Int("pid", 0, "gateway process ID, for its RSS")
	hold := flag.Duration("hold", 3*time.Second, "how long to hold them before measuring")
	flag.Parse()

	before := rss(*pid)
	conns := make([]net.Conn, 0, *n)
	deadline := time.Now().Add(2 * time.Minute)
	for i := 0; i < *n && time.Now().Before(deadline); i++ {
		src := fmt.Sprintf("127.0.%d.%d", 1+(i / *perIP)/250, 1+(i / *perIP)%250)
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		c, err := d.Dial("tcp", *addr)
		if err != nil {
			fmt.Fprintf(os.Stderr, "connection %d: %v\n", i, err)
			os.Exit(1)
		}
		r := bufio.NewReader(c)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		greeting, err := r.ReadString('\n')
		if err != nil || !strings.HasPrefix(greeting, "220") {
			fmt.Fprintf(os.Stderr, "connection %d: greeting %q %v\n", i, greeting, err)
			os.Exit(1)
		}
		fmt.Fprintf(c, "EHLO idle%d.test\r\n", i)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				fmt.Fprintf(os.Stderr, "connection %d: EHLO: %v\n", i, err)
				os.Exit(1)
			}
			if len(line) > 3 && line[3] == ' ' {
				break
			}
		}
		conns = append(conns, c)
	}
	time.Sleep(*hold)
	after := rss(*pid)
	fmt.Printf("idle connections: %d held; gateway RSS %.1f MiB before, %.1f MiB with them open (%.1f KiB per connection)\n",
		len(conns), float64(before)/1024, float64(after)/1024, float64(after-before)/float64(len(conns)))
	for _, c := range conns {
		c.Close()
	}
}

// rss reads VmRSS in KiB from /proc.
func rss(pid int) int64 {
	if pid == 0 {
		return 0
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(line, "VmRSS:")), "%d", &kb)
			return kb
		}
	}
	return 0
}
