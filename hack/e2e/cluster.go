//go:build e2e

// Package e2e is the cluster-proof end-to-end test of jetmail (hack/e2e.sh).
// It runs every moving part as a real process on loopback: a 3-node NATS
// JetStream cluster (nats-server), the envtest kube-apiserver and etcd, two
// `jetmail controller`, two `jetmail gateway` and two `jetmail deliverer`
// processes. The test process itself is the rest of the world: a DNS
// server, the SMTP servers mail is delivered to (the sinks), and the SMTP
// clients that send it.
//
// While mail flows it kills and restarts gateways, deliverers, NATS nodes
// and the controller leader, and then counts by Message-ID what reached the
// sinks: no acknowledged message may be lost, no retransmission may be
// stored twice, and duplicate deliveries must stay within what the
// deliverer kills can explain (the window between a remote's 250 and the
// record of it).
//
// Files: cluster.go runs and kills processes (NATS, jetmail roles,
// envtest); sinks.go and dns.go are the world mail goes to; traffic.go
// sends; checker.go counts; e2e_test.go is the scenario.
package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/freeport"
)

// world is one run: its folder, the child processes, and the clock that
// every event of the run is measured against.
type world struct {
	t     *testing.T
	dir   string
	start time.Time

	mu    sync.Mutex
	procs []*proc
}

// newWorld makes the run folder ($E2E_RUN_DIR, or a new one under
// $TMPDIR) and arranges for every child process to be killed when the
// test ends, and for the folder to be kept, and printed, if it failed.
func newWorld(t *testing.T) *world {
	dir := os.Getenv("E2E_RUN_DIR")
	if dir == "" {
		var err error
		dir, err = os.MkdirTemp("", "jetmail-e2e-"+time.Now().Format("20060102-150405")+"-")
		if err != nil {
			t.Fatal(err)
		}
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, dir: dir, start: time.Now()}
	t.Logf("run directory (logs of every process): %s", dir)
	t.Cleanup(func() {
		w.killAll()
		if t.Failed() || os.Getenv("E2E_KEEP") != "" {
			var logs []string
			for _, p := range w.procs {
				logs = append(logs, p.logPath)
			}
			t.Logf("run directory kept: %s\nlogs:\n  %s", dir, strings.Join(logs, "\n  "))
			fmt.Printf("e2e: run directory kept: %s\n", dir)
			return
		}
		os.RemoveAll(dir)
	})
	return w
}

// since is the time from the start of the run, for logs and reports.
func (w *world) since(t time.Time) string {
	return fmt.Sprintf("+%.1fs", t.Sub(w.start).Seconds())
}

func (w *world) logf(format string, args ...any) {
	w.t.Helper()
	w.t.Logf("%s "+format, append([]any{w.since(time.Now())}, args...)...)
}

// killAll kills every child process group, stopped ones included.
func (w *world) killAll() {
	w.mu.Lock()
	procs := append([]*proc(nil), w.procs...)
	w.mu.Unlock()
	for _, p := range procs {
		p.kill()
	}
}

// proc is one child process (a nats-server or a jetmail role) that the
// scenario may kill, stop and start again. Each start appends to the same
// log file, after a marker line.
type proc struct {
	w       *world
	name    string
	bin     string
	args    []string
	env     []string
	logPath string

	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{} // closed when the current process has exited
	expected bool          // the current process is meant to exit (we signalled it)
	starts   int
	// unexpected lists exits nobody asked for: a crash, or a role giving up.
	unexpected []string
}

// newProc registers a child process without starting it.
func (w *world) newProc(name, bin string, args, env []string) *proc {
	p := &proc{w: w, name: name, bin: bin, args: args, env: env, logPath: filepath.Join(w.dir, name+".log")}
	w.mu.Lock()
	w.procs = append(w.procs, p)
	w.mu.Unlock()
	return p
}

// start runs the process (again), in a process group of its own so that a
// signal reaches everything it started, and killed with the test process
// if that dies first (Pdeathsig).
func (p *proc) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && !p.exited() {
		return fmt.Errorf("%s is already running", p.name)
	}
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	p.starts++
	fmt.Fprintf(f, "=== e2e: start #%d of %s at %s: %s %s\n", p.starts, p.name, p.w.since(time.Now()), p.bin, strings.Join(p.args, " "))
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.expected = cmd, done, false
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		fmt.Fprintf(f, "=== e2e: %s exited at %s: %v\n", p.name, p.w.since(time.Now()), err)
		f.Close()
		if !p.expected && p.cmd == cmd {
			p.unexpected = append(p.unexpected, fmt.Sprintf("%s (start #%d) exited by itself at %s: %v", p.name, p.starts, p.w.since(time.Now()), err))
		}
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// exited reports whether the current process has exited; p.mu held.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// running reports whether the process runs (or is stopped) right now.
func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil && !p.exited()
}

// pid is the current process's id, 0 when none.
func (p *proc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// signal sends sig to the process group. exiting says whether the process
// is expected to end because of it (SIGKILL, SIGTERM), so that its exit is
// not reported as a crash.
func (p *proc) signal(sig syscall.Signal, exiting bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.exited() {
		return fmt.Errorf("%s is not running", p.name)
	}
	if exiting {
		p.expected = true
	}
	return syscall.Kill(-p.cmd.Process.Pid, sig)
}

// wait waits up to timeout for the current process to exit.
func (p *proc) wait(timeout time.Duration) error {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("%s still running after %s", p.name, timeout)
	}
}

// kill SIGKILLs the process group (a stopped process too) and waits for it.
func (p *proc) kill() {
	if p.signal(syscall.SIGKILL, true) == nil {
		_ = p.wait(10 * time.Second)
	}
}

// crashes lists the exits nobody asked for.
func (p *proc) crashes() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.unexpected...)
}

// logTail returns the last n lines of the process's log, for failures.
func (p *proc) logTail(n int) string {
	f, err := os.Open(p.logPath)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var lines []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		lines = append(lines, s.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// grepLog returns the lines of the process's log that contain every one
// of the strings.
func (p *proc) grepLog(subs ...string) []string {
	f, err := os.Open(p.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for s.Scan() {
		line := s.Text()
		for _, sub := range subs {
			if !strings.Contains(line, sub) {
				continue next
			}
		}
		out = append(out, line)
	}
	return out
}

// freePort returns a loopback TCP port that is free and was not returned
// before in this run (freeport: never one the kernel hands out by itself).
func freePort(t *testing.T) int {
	t.Helper()
	return freeport.Port(t)
}

// poll calls cond every interval until it returns nil or timeout passes,
// and returns its last error.
func poll(timeout, interval time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", timeout, err)
		}
		time.Sleep(interval)
	}
}

var httpClient = &http.Client{Timeout: 3 * time.Second}

// httpGet fetches a loopback URL with a short timeout.
func httpGet(url string) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	return resp.StatusCode, b, err
}

// metric sums the samples of a Prometheus metric (every label set) in a
// /metrics text page; ok is false when the page has none.
func metric(page []byte, name string) (sum float64, ok bool) {
	for _, line := range strings.Split(string(page), "\n") {
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue // a longer name with the same prefix
		}
		f := strings.Fields(rest[strings.LastIndexByte(rest, '}')+1:])
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		sum += v
		ok = true
	}
	return sum, ok
}

// jsonGet fetches a URL and decodes its JSON body into v.
func jsonGet(url string, v any) error {
	code, b, err := httpGet(url)
	if err != nil {
		return err
	}
	if code != http.StatusOK {
		return fmt.Errorf("GET %s: %d %s", url, code, strings.TrimSpace(string(b)))
	}
	return json.Unmarshal(b, v)
}
