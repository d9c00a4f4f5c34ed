package smtpgw

import (
	"fmt"
	"strings"
	"testing"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/dnstest"
	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// dkimKey is one DKIMKey of a test: its YAML (object and Secret, with a key
// made for the test) and the TXT record it publishes.
type dkimKey struct {
	domain, selector string
	algo             v1alpha1.DKIMAlgorithm
	fromDomains      []string
	pem              []byte
	record           string
}

// yaml makes the key on first use; later calls give the same key.
func (k *dkimKey) yaml(t testing.TB) string {
	t.Helper()
	if k.pem == nil {
		pem, err := policy.GenerateDKIMKey(k.algo, 0)
		if err != nil {
			t.Fatal(err)
		}
		signer, err := policy.ParseDKIMKey(pem)
		if err != nil {
			t.Fatal(err)
		}
		if k.record, err = policy.DKIMRecord(signer); err != nil {
			t.Fatal(err)
		}
		k.pem = pem
	}
	pem := k.pem
	name := k.selector + "-" + strings.ReplaceAll(k.domain, ".", "-")
	from := ""
	if len(k.fromDomains) > 0 {
		from = "\n  fromDomains: [" + strings.Join(k.fromDomains, ", ") + "]"
	}
	return fmt.Sprintf(`apiVersion: mail.jetmail.io/v1alpha1
kind: DKIMKey
metadata: {name: %s, namespace: mail}
spec:
  domain: %s
  selector: %s
  algorithm: %s%s
---
apiVersion: v1
kind: Secret
metadata: {name: %s-dkim, namespace: mail}
stringData:
  dkim.key: |
    %s
`, name, k.domain, k.selector, k.algo, from, name, strings.ReplaceAll(strings.TrimSpace(string(pem)), "\n", "\n    "))
}

// dkimWorld compiles the keys into a policy (with spec as the RelayPolicy)
// and publishes their records on a DNS server on loopback.
func dkimWorld(t *testing.T, spec string, keys ...*dkimKey) (*policy.Relay, *dnstest.Server) {
	t.Helper()
	pol := keysPolicy(t, spec, keys...)
	dns := dnstest.Start(t)
	for _, k := range keys {
		dns.AddTXT(t, policy.DKIMRecordName(k.selector, k.domain), k.record)
	}
	return pol, dns
}

// signedMessage is the message as the deliverer sends it: the signatures
// made at acceptance in front of the stored body.
func signedMessage(t *testing.T, sp *spool.Spool, m *spool.Message) string {
	return m.Envelope.Headers + storedBody(t, sp, m)
}

// verify checks every signature of msg against the DNS server, as a
// receiving MTA does, and returns "d=domain s=selector a=algo: ok" or the
// error, one per signature.
func verify(t *testing.T, dns *dnstest.Server, msg string) []string {
	t.Helper()
	vs, err := dkim.VerifyWithOptions(strings.NewReader(msg), &dkim.VerifyOptions{LookupTXT: dnstest.LookupTXT(dns.Addr)})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, v := range vs {
		res := "ok"
		if v.Err != nil {
			res = v.Err.Error()
		}
		out = append(out, fmt.Sprintf("d=%s: %s", v.Domain, res))
	}
	return out
}

func TestDKIMSigning(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	rsa := &dkimKey{domain: "example.org", selector: "r2026", algo: v1alpha1.DKIMRSASHA256}
	ed := &dkimKey{domain: "example.org", selector: "e2026", algo: v1alpha1.DKIMEd25519SHA256}
	brand := &dkimKey{domain: "esp.test", selector: "b1", algo: v1alpha1.DKIMEd25519SHA256, fromDomains: []string{"brand.test"}}
	// 127.0.0.1 relays; example.org and brand.test are also accepted
	// domains, for the inbound case below.
	pol, dns := dkimWorld(t, `  relayNetworks: ["127.0.0.0/8"]
  acceptedDomains: ["example.org"]
`, rsa, ed, brand)
	g := startGateway(t, sp, pol)

	send := func(t *testing.T, addr, header, body string) *spool.Message {
		t.Helper()
		c := smtptest.DialReady(t, addr)
		msg := header + "Message-ID: <" + strings.ReplaceAll(t.Name(), "/", ".") + "@example.org>\r\n\r\n" + body
		return queuedMail(t, sp, sendMail(c, "alice@example.org", "bob@example.net", msg, "250 2.0.0"))
	}
	const body = "Hello,\r\n\r\n.. a line that starts with a dot\r\nand trailing space  \r\n\r\n\r\n"

	t.Run("a relay client's mail is signed with every key of its From domain, RSA first, and verifies", func(t *testing.T) {
		m := send(t, g.addr, "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n", body)
		h := m.Envelope.Headers
		if strings.Count(h, "DKIM-Signature:") != 2 || strings.Index(h, "a=rsa-sha256") > strings.Index(h, "a=ed25519-sha256") {
			t.Fatalf("signatures in the envelope:\n%s", h)
		}
		got := verify(t, dns, signedMessage(t, sp, m))
		if strings.Join(got, "; ") != "d=example.org: ok; d=example.org: ok" {
			t.Fatalf("verification: %v", got)
		}
		if strings.Contains(storedBody(t, sp, m), "DKIM-Signature") {
			t.Error("the stored body was rewritten: signatures belong in the envelope")
		}
	})

	t.Run("a change after signing fails verification", func(t *testing.T) {
		m := send(t, g.addr, "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: pay 10 EUR\r\n", body)
		signed := signedMessage(t, sp, m)
		for name, forged := range map[string]string{
			"body changed":                 strings.Replace(signed, "Hello,", "Hallo,", 1),
			"subject changed":              strings.Replace(signed, "pay 10 EUR", "pay 99 EUR", 1),
			"a second Subject: added":      strings.Replace(signed, "Subject: pay 10 EUR\r\n", "Subject: pay 10 EUR\r\nSubject: pay 99 EUR\r\n", 1),
			"a Reply-To: added (oversign)": strings.Replace(signed, "Subject:", "Reply-To: mallory@evil.test\r\nSubject:", 1),
		} {
			for _, r := range verify(t, dns, forged) {
				if strings.HasSuffix(r, ": ok") {
					t.Errorf("%s: a signature still verifies: %v", name, r)
				}
			}
		}
		// The unchanged message verifies: the checks above can fail.
		if got := verify(t, dns, signed); strings.Join(got, "; ") != "d=example.org: ok; d=example.org: ok" {
			t.Fatalf("the unchanged message: %v", got)
		}
	})

	t.Run("a subdomain's mail is signed by the parent's keys", func(t *testing.T) {
		m := send(t, g.addr, "From: news@mail.Example.ORG\r\nSubject: hi\r\n", body)
		if got := verify(t, dns, signedMessage(t, sp, m)); len(got) != 2 {
			t.Fatalf("verification: %v", got)
		}
	})

	t.Run("fromDomains maps a From domain to another signing domain", func(t *testing.T) {
		m := send(t, g.addr, "From: \"=?utf-8?q?Br=C3=A4nd?=\" <news@brand.test>\r\nSubject: hi\r\n", body)
		if got := verify(t, dns, signedMessage(t, sp, m)); strings.Join(got, "; ") != "d=esp.test: ok" {
			t.Fatalf("verification: %v", got)
		}
	})

	t.Run("BDAT with the end of the header section split across chunks is signed and verifies", func(t *testing.T) {
		c := smtptest.DialReady(t, g.addr)
		cmdWant(c, "EHLO client.test", "250")
		cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
		cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
		msg := "From: alice@example.org\r\nSubject: chunks\r\nMessage-ID: <bdat-split@example.org>\r\n\r\n" + body
		cut := strings.Index(msg, "\r\n\r\n") + 3 // inside the empty line
		bdat(c, msg[:cut], false, "250 2.0.0")
		m := queuedMail(t, sp, bdat(c, msg[cut:], true, "250 2.0.0"))
		if got := verify(t, dns, signedMessage(t, sp, m)); strings.Join(got, "; ") != "d=example.org: ok; d=example.org: ok" {
			t.Fatalf("verification: %v", got)
		}
	})

	t.Run("a transfer cut off mid-header, RSET, then a pipelined transaction: only that one is stored, signed over its own bytes", func(t *testing.T) {
		before := queueCount(t, sp)
		c := smtptest.DialReady(t, g.addr)
		cmdWant(c, "EHLO client.test", "250")
		cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
		cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
		// BDAT chunk of a header section that never ends, then RSET: the
		// signer of that transfer must not leak into the next.
		bdat(c, "From: alice@example.org\r\nSubject: first, abandoned", false, "250 2.0.0")
		cmdWant(c, "RSET", "250")
		second := "From: alice@example.org\r\nSubject: second\r\nMessage-ID: <pipelined@example.org>\r\n\r\n" + body
		c.Send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
		replyWant(c, "250")
		replyWant(c, "250")
		replyWant(c, "354")
		c.Send(second + ".\r\n")
		m := queuedMail(t, sp, replyWant(c, "250 2.0.0"))
		if got := queueCount(t, sp) - before; got != 1 {
			t.Fatalf("%d messages stored, want 1", got)
		}
		signed := signedMessage(t, sp, m)
		if strings.Contains(signed, "abandoned") {
			t.Fatalf("bytes of the abandoned transfer in the stored message:\n%s", signed)
		}
		if got := verify(t, dns, signed); strings.Join(got, "; ") != "d=example.org: ok; d=example.org: ok" {
			t.Fatalf("verification: %v", got)
		}
	})

	for name, header := range map[string]string{
		"a From domain without a key":             "From: alice@elsewhere.test\r\n",
		"a domain that merely ends in a key's":    "From: alice@badexample.org\r\n",
		"no From header":                          "Subject: no sender\r\n",
		"two From headers":                        "From: alice@example.org\r\nFrom: mallory@evil.test\r\n",
		"a From that does not parse":              "From: alice@@example.org\r\n",
		"From only in a folded continuation line": "Subject: x\r\n From: alice@example.org\r\n",
	} {
		t.Run(name+": not signed", func(t *testing.T) {
			m := send(t, g.addr, header, body)
			if m.Envelope.Headers != "" {
				t.Fatalf("signed: %s", m.Envelope.Headers)
			}
		})
	}

	t.Run("mail from outside for an accepted domain is not signed", func(t *testing.T) {
		g.setPolicy(keysPolicy(t, `  relayNetworks: ["10.0.0.0/8"]
  acceptedDomains: ["example.org"]
`, rsa, ed, brand))
		defer g.setPolicy(pol)
		c := smtptest.DialReady(t, g.addr)
		msg := "From: alice@example.org\r\nMessage-ID: <inbound@example.org>\r\n\r\nforged?\r\n"
		m := queuedMail(t, sp, sendMail(c, "alice@example.org", "bob@example.org", msg, "250 2.0.0"))
		if m.Envelope.Headers != "" {
			t.Fatalf("inbound mail signed: %s", m.Envelope.Headers)
		}
	})

	t.Run("keys are read when used: a key added later signs the next message", func(t *testing.T) {
		other := &dkimKey{domain: "elsewhere.test", selector: "n1", algo: v1alpha1.DKIMEd25519SHA256}
		g.setPolicy(keysPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
`, other))
		defer g.setPolicy(pol)
		dns.AddTXT(t, policy.DKIMRecordName(other.selector, other.domain), other.record)
		m := send(t, g.addr, "From: alice@elsewhere.test\r\n", body)
		if got := verify(t, dns, signedMessage(t, sp, m)); strings.Join(got, "; ") != "d=elsewhere.test: ok" {
			t.Fatalf("verification: %v", got)
		}
	})

	for result, want := range map[string]float64{dkimSigned: 7, dkimNoKey: 2, dkimNoFrom: 4} {
		if got := testutil.ToFloat64(g.metrics.dkim.WithLabelValues(result)); got != want {
			t.Errorf("jetmail_smtp_dkim_total{result=%q} = %v, want %v", result, got, want)
		}
	}
}

// keysPolicy compiles spec and the keys into a policy.
func keysPolicy(t testing.TB, spec string, keys ...*dkimKey) *policy.Relay {
	t.Helper()
	var docs []string
	for _, k := range keys {
		docs = append(docs, k.yaml(t))
	}
	return relayPolicy(t, spec, docs...)
}

// The signer sees the message in whatever pieces go-smtp reads: one octet at
// a time, the end of the header section falls inside any write.
func TestDKIMTeeAnyWriteSizes(t *testing.T) {
	key := &dkimKey{domain: "example.org", selector: "s", algo: v1alpha1.DKIMEd25519SHA256}
	pol, dns := dkimWorld(t, "  relayNetworks: [\"127.0.0.0/8\"]\n", key)
	msg := "From: a@example.org\r\nSubject: pieces\r\n\r\nbody\r\n"
	for _, size := range []int{1, 2, 3, 5, 7, 64} {
		tee := newDKIMTee(pol.DKIM)
		for i := 0; i < len(msg); i += size {
			tee.Write([]byte(msg[i:min(i+size, len(msg))]))
		}
		hdrs, result, _, err := tee.finish()
		if err != nil || result != dkimSigned {
			t.Fatalf("size %d: %s %v", size, result, err)
		}
		if got := verify(t, dns, hdrs+msg); strings.Join(got, "") != "d=example.org: ok" {
			t.Errorf("size %d: %v", size, got)
		}
	}
	for name, tc := range map[string]struct{ msg, want string }{
		"a header section over 256 KiB": {"From: a@example.org\r\nX-Big: " + strings.Repeat("x", maxSignedHeader) + "\r\n\r\nbody\r\n", dkimTooLong},
		"a message without a body":      {"From: a@example.org\r\nSubject: no body\r\n", dkimTooLong},
		"a message without a header":    {"\r\nbody only\r\n", dkimNoFrom},
	} {
		tee := newDKIMTee(pol.DKIM)
		tee.Write([]byte(tc.msg))
		if hdrs, result, _, _ := tee.finish(); result != tc.want || hdrs != "" {
			t.Errorf("%s: %s %q, want %s", name, result, hdrs, tc.want)
		}
	}
}
