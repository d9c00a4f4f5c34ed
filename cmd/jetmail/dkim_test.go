package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/emersion/go-smtp"

	"github.com/jetmail/jetmail/internal/dnstest"
	"github.com/jetmail/jetmail/internal/mxtest"
)

// The whole DKIM path of `jetmail serve`: keys made by `jetmail dkim
// keygen`, read with -f, mail signed at the gateway, sent by the deliverer
// over real SMTP to a sink, and verified there against a DNS server on
// loopback that publishes the records keygen printed. The sink refuses the
// first try: the signatures made at acceptance go out again on the retry.
func TestServeSignsWithKeysFromKeygen(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	dir := t.TempDir()
	dns := dnstest.Start(t)
	var yaml bytes.Buffer
	for _, args := range [][]string{
		{"--domain", "example.org", "--selector", "r2026"},
		{"--domain", "example.org", "--selector", "e2026", "--algorithm", "ed25519-sha256"},
	} {
		out, err := exec.Command(bin, append([]string{"dkim", "keygen"}, args...)...).Output()
		if err != nil {
			t.Fatalf("keygen %v: %v", args, err)
		}
		first, _, _ := strings.Cut(string(out), "\n")
		// # Publish: r2026._domainkey.example.org. IN TXT "v=DKIM1; ..." "..."
		name, value, ok := strings.Cut(strings.TrimPrefix(first, "# Publish: "), " IN TXT ")
		if !ok {
			t.Fatalf("keygen's first line %q", first)
		}
		dns.AddTXT(t, name, strings.ReplaceAll(strings.Trim(value, `"`), `" "`, ""))
		yaml.Write(out)
	}
	yaml.WriteString("---\napiVersion: mail.jetmail.io/v1alpha1\nkind: DeliveryPolicy\nmetadata: {name: fast, namespace: mail}\nspec:\n  retryIntervals: [1s]\n")
	cfg := filepath.Join(dir, "dkim.yaml")
	if err := os.WriteFile(cfg, yaml.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}

	sink := mxtest.Start(t, &mxtest.MX{Data: func(n int) error {
		if n == 1 {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again"}
		}
		return nil
	}})
	p := startServe(t, bin, t.TempDir(), "-f", cfg, "--relayhost", sink.Hop.Addr.String())
	reply := sendMail(t, p.smtp, "alice@example.org", "bob@example.net",
		"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: signed\r\nMessage-ID: <signed@example.org>\r\n\r\nhello\r\n")
	if !strings.HasPrefix(reply, "250 2.0.0") {
		t.Fatalf("reply %q", reply)
	}
	mxtest.Within(t, 30*time.Second, "the message at the sink", func() bool { return len(sink.Transactions()) == 1 })
	got := sink.Transactions()[0].Body
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(got), &dkim.VerifyOptions{LookupTXT: dnstest.LookupTXT(dns.Addr)})
	if err != nil || len(vs) != 2 {
		t.Fatalf("%d signatures, %v:\n%s", len(vs), err, got)
	}
	for _, v := range vs {
		if v.Err != nil {
			t.Errorf("d=%s: %v", v.Domain, v.Err)
		}
	}
	// The same bytes, changed after signing, fail.
	forged := bytes.Replace(got, []byte("hello"), []byte("HELLO"), 1)
	vs, _ = dkim.VerifyWithOptions(bytes.NewReader(forged), &dkim.VerifyOptions{LookupTXT: dnstest.LookupTXT(dns.Addr)})
	for _, v := range vs {
		if v.Err == nil {
			t.Errorf("a changed body still verifies for d=%s", v.Domain)
		}
	}
	if sink.DataCount() != 2 {
		t.Errorf("%d DATA at the sink, want 2 (a refusal, then the retry)", sink.DataCount())
	}
	if !strings.HasPrefix(string(got), "DKIM-Signature:") || strings.Count(string(got), "DKIM-Signature:") != 2 {
		t.Errorf("the message at the sink:\n%s", got)
	}
}
