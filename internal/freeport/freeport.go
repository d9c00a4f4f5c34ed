// Package freeport hands tests loopback TCP ports for the servers they start
// in other processes or later in the same one.
//
// The usual trick, listening on port 0 and closing, returns a port from the
// kernel's ephemeral range, which the kernel hands out again at once: to the
// next listener on port 0, or as the source port of any outgoing connection.
// With test packages running in parallel, a child process then found its
// port taken before it could bind it. So ports are drawn at random below the
// ephemeral range (Linux's default starts at 32768), where the kernel never
// allocates on its own, checked free, and never handed out twice in a
// process.
package freeport

import (
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"testing"
)

// Below Linux's default ip_local_port_range (32768-60999), above the fixed
// ports the hack/ scripts use.
const lo, hi = 20000, 32768

var (
	mu    sync.Mutex
	given = map[int]bool{}
)

// Port returns a loopback TCP port that is free now and was not returned
// before in this process.
func Port(t testing.TB) int {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	for range 1000 {
		p := lo + rand.IntN(hi-lo)
		if given[p] {
			continue
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			continue
		}
		l.Close()
		given[p] = true
		return p
	}
	t.Fatal("freeport: no free loopback port in 1000 tries")
	return 0
}

// Addr is Port as "127.0.0.1:port".
func Addr(t testing.TB) string {
	t.Helper()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(Port(t)))
}
