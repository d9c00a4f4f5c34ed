package main

import (
	"net/http"
	"os/exec"
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
