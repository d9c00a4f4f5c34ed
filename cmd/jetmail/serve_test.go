package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/spool"

	"github.com/jetmail/jetmail/internal/freeport"
)

// buildJetmail builds the real binary once per test run.
func buildJetmail(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "jetmail")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func freePort(t *testing.T) string {
	t.Helper()
	return freeport.Addr(t)
}

// syncBuffer collects a child's output while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type serveProc struct {
	cmd                  *exec.Cmd
	smtp, metrics, natsA string
	log                  *syncBuffer
}

func startServe(t *testing.T, bin, dataDir string, extra ...string) *serveProc {
	t.Helper()
	p := &serveProc{smtp: freePort(t), metrics: freePort(t), natsA: freePort(t), log: &syncBuffer{}}
	args := append([]string{"serve", "--data-dir", dataDir, "--smtp-listen", p.smtp,
		"--metrics-listen", p.metrics, "--nats-listen", p.natsA, "--hostname", "mx.test"}, extra...)
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout = p.log
	p.cmd.Stderr = p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + p.metrics + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve not ready after 30s; log:\n%s", p.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return p
}

// stop sends SIGTERM and expects a clean exit.
func (p *serveProc) stop(t *testing.T) {
	t.Helper()
	stopProcess(t, p.cmd, p.log)
}

// stopProcess sends cmd SIGTERM and expects a clean exit within 20 s.
func stopProcess(t *testing.T, cmd *exec.Cmd, log fmt.Stringer) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s exited with %v; log:\n%s", cmd.Args[1], err, log)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("%s did not exit after SIGTERM; log:\n%s", cmd.Args[1], log)
	}
}

// serveSpool opens the spool of a running serve through its NATS address,
// with the key serve wrote to dataDir.
func serveSpool(t *testing.T, p *serveProc, dataDir string) *spool.Spool {
	t.Helper()
	auth, err := natsAuth(filepath.Join(dataDir, spool.EmbeddedKeyFile), "")
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect("nats://"+p.natsA, append(spool.NATSOptions(), auth...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sp, err := spool.Open(ctx, nc, spool.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

// sendMail runs one SMTP transaction and returns the final reply.
func sendMail(t *testing.T, addr, from, to, data string) string {
	t.Helper()
	c := smtptest.DialReady(t, addr)
	defer c.Close()
	reply := c.Mail(from, []string{to}, data, 250)
	c.Send("QUIT\r\n")
	return reply
}

func TestServeKeepsTheQueueAcrossRestarts(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	dataDir := t.TempDir()

	// Nothing is delivered here (--no-deliver): the point is the queue.
	p := startServe(t, bin, dataDir, "--no-deliver")
	reply := sendMail(t, p.smtp, "alice@example.org", "bob@example.net", "Subject: persist\r\nMessage-ID: <persist@x>\r\n\r\nkeep me\r\n")
	if !strings.HasPrefix(reply, "250 2.0.0 Ok: queued as ") {
		t.Fatalf("reply %q", reply)
	}
	qid := strings.TrimPrefix(reply, "250 2.0.0 Ok: queued as ")
	p.stop(t)
	if !strings.Contains(p.log.String(), "fsync_before_ack\": true") {
		t.Errorf("serve did not log fsync-before-ack; log:\n%s", p.log)
	}

	p2 := startServe(t, bin, dataDir, "--no-deliver")
	// The embedded NATS server lets in only the holder of the key that
	// serve wrote to the data directory, readable by its owner alone.
	keyFile := filepath.Join(dataDir, spool.EmbeddedKeyFile)
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file %s: %v, %v; want mode 0600", keyFile, fi, err)
	}
	if nc, err := nats.Connect("nats://"+p2.natsA, nats.MaxReconnects(0)); err == nil {
		nc.Close()
		t.Fatal("the embedded NATS server let in a client without credentials")
	} else if !strings.Contains(strings.ToLower(err.Error()), "authorization") {
		t.Errorf("connecting without credentials: %v, want an authorization violation", err)
	}
	sp := serveSpool(t, p2, dataDir)
	var found []string
	if err := sp.Scan(context.Background(), func(m *spool.Message) error {
		body, err := sp.ReadBody(context.Background(), m)
		if err != nil {
			return err
		}
		if !strings.Contains(string(body), "keep me") {
			t.Errorf("body %q", body)
		}
		found = append(found, m.Envelope.QueueID)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0] != qid {
		t.Fatalf("after restart the queue holds %v, want [%s]", found, qid)
	}
	// The duplicate guard survived the restart too.
	reply = sendMail(t, p2.smtp, "alice@example.org", "bob@example.net", "Subject: persist\r\nMessage-ID: <persist@x>\r\n\r\nkeep me\r\n")
	if reply != "250 2.0.0 Ok: queued as "+qid {
		t.Errorf("retransmission after restart: %q", reply)
	}
	p2.stop(t)
}

func TestServeRefusesRelayFromOutsideLoopbackByDefault(t *testing.T) {
	// The default policy is unit-tested in policy; here the point is that
	// serve with -f loads RelayPolicy files and rejects a broken one
	// with a message that names the object and field.
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: broken}\nspec:\n  relayNetworks: [10.0.0.1/8]\n"), 0o600)
	out, err := exec.Command(bin, "serve", "--data-dir", t.TempDir(), "-f", bad).CombinedOutput()
	if err == nil {
		t.Fatalf("serve accepted a broken policy:\n%s", out)
	}
	if !strings.Contains(string(out), "RelayPolicy/broken: spec.relayNetworks[0]") {
		t.Errorf("error does not name the object and field:\n%s", out)
	}
}

func TestSecondServeOnTheSameNATSAddressFailsAtOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	first := startServe(t, bin, t.TempDir(), "--no-deliver")
	start := time.Now()
	cmd := exec.Command(bin, "serve", "--data-dir", t.TempDir(), "--smtp-listen", freePort(t),
		"--metrics-listen", freePort(t), "--nats-listen", first.natsA, "--no-deliver")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("a second serve on %s started:\n%s", first.natsA, out)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the second serve took %s to fail", d)
	}
	if !strings.Contains(string(out), first.natsA) || !strings.Contains(string(out), "address already in use") {
		t.Errorf("the error does not name the address in use:\n%s", out)
	}
}
