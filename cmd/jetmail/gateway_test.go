package main

import (
	"bufio"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/natstest"
)

func readyz(addr string) int {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestGatewayAgainstExternalNATSIsReadyOnlyWhileJetStreamAnswers(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	ns := natstest.Start(t, natstest.Options{})

	bin := buildJetmail(t)
	smtpAddr, metrics := freePort(t), freePort(t)
	var log syncBuffer
	cmd := exec.Command(bin, "gateway", "--nats-url", ns.ClientURL(), "--replicas", "1",
		"--smtp-listen", smtpAddr, "--metrics-listen", metrics, "--hostname", "gw.test")
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()

	deadline := time.Now().Add(30 * time.Second)
	for readyz(metrics) != 200 {
		if time.Now().After(deadline) {
			t.Fatalf("gateway never ready; log:\n%s", log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	reply := sendMail(t, smtpAddr, "a@example.org", "b@example.net", "Subject: via gateway\r\n\r\nhi\r\n")
	if !strings.HasPrefix(reply, "250 2.0.0 Ok: queued as ") {
		t.Fatalf("reply %q", reply)
	}
	deadline = time.Now().Add(5 * time.Second)
	for !strings.Contains(log.String(), `"msg":"transaction"`) {
		if time.Now().After(deadline) {
			t.Fatalf("cluster roles log JSON with one line per transaction; log:\n%s", log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}

	ns.Shutdown()
	ns.WaitForShutdown()
	deadline = time.Now().Add(15 * time.Second)
	for readyz(metrics) != http.StatusServiceUnavailable {
		if time.Now().After(deadline) {
			t.Fatal("gateway still ready with JetStream gone")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A pod started before JetStream answers (a NATS cluster still electing its
// leaders, a server restarting) must not exit: it stays unready, the
// gateway answers 421 on its SMTP port meanwhile, and both become ready
// when NATS comes.
func TestGatewayAndDelivererStartedBeforeNATSWaitForIt(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	natsAddr := freePort(t)
	_, natsPort, _ := net.SplitHostPort(natsAddr)
	url := "nats://" + natsAddr
	smtpAddr, gwMetrics, dlMetrics := freePort(t), freePort(t), freePort(t)
	var gwLog, dlLog syncBuffer
	// start runs a role; the channel says when it exits.
	start := func(out *syncBuffer, args ...string) chan error {
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() { cmd.Process.Kill(); <-exited })
		return exited
	}
	gw := start(&gwLog, "gateway", "--nats-url", url, "--replicas", "1",
		"--smtp-listen", smtpAddr, "--metrics-listen", gwMetrics, "--hostname", "gw.test")
	dl := start(&dlLog, "deliverer", "--nats-url", url, "--replicas", "1", "--metrics-listen", dlMetrics)

	waitUntil := func(what string, within time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(within)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %s\ngateway log:\n%s\ndeliverer log:\n%s", what, within, gwLog.String(), dlLog.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitUntil("both unready", 20*time.Second, func() bool {
		return readyz(gwMetrics) == http.StatusServiceUnavailable && readyz(dlMetrics) == http.StatusServiceUnavailable
	})
	c, err := net.DialTimeout("tcp", smtpAddr, 5*time.Second)
	if err != nil {
		t.Fatalf("the SMTP port is closed while NATS is away: %v", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	greeting, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if !strings.HasPrefix(greeting, "421 4.3.2 ") {
		t.Errorf("greeting while NATS is away = %q; want 421 4.3.2", greeting)
	}
	time.Sleep(2 * time.Second) // a few retries
	for name, exited := range map[string]chan error{"gateway": gw, "deliverer": dl} {
		select {
		case err := <-exited:
			t.Fatalf("%s exited while NATS was away (%v)\ngateway log:\n%s\ndeliverer log:\n%s", name, err, gwLog.String(), dlLog.String())
		default:
		}
	}

	port, _ := strconv.Atoi(natsPort)
	natstest.Start(t, natstest.Options{Port: port})
	waitUntil("both ready once NATS is up", 45*time.Second, func() bool {
		return readyz(gwMetrics) == http.StatusOK && readyz(dlMetrics) == http.StatusOK
	})
	if reply := sendMail(t, smtpAddr, "a@example.org", "b@example.net", "Subject: late NATS\r\n\r\nhi\r\n"); !strings.HasPrefix(reply, "250 2.0.0 Ok: queued as ") {
		t.Fatalf("reply once ready: %q", reply)
	}
}
