package controllers

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/dnstest"
	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// A DKIMKey without a Secret gets a key generated into one; its status
// shows the record to publish; the gateway signs with the key it received
// in the configuration snapshot (it never reads a Secret itself), and a
// verifier that looks the record up in DNS accepts the signature.
func TestDKIMKeyIsGeneratedPublishedAndSignsMail(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	rsaKey := &v1alpha1.DKIMKey{ObjectMeta: metav1.ObjectMeta{Name: "example-rsa"},
		Spec: v1alpha1.DKIMKeySpec{Domain: "example.org", Selector: "r2026"}}
	edKey := &v1alpha1.DKIMKey{ObjectMeta: metav1.ObjectMeta{Name: "example-ed"},
		Spec: v1alpha1.DKIMKeySpec{Domain: "example.org", Selector: "e2026", Algorithm: v1alpha1.DKIMEd25519SHA256, SecretName: "ed-key"}}
	w.create(rsaKey)
	w.create(edKey)
	dp := startDataPlane(t, w, "gw-0")

	dns := dnstest.Start(t)
	for _, tc := range []struct {
		key    *v1alpha1.DKIMKey
		secret string
		algo   string
	}{{rsaKey, "example-rsa-dkim", "k=rsa"}, {edKey, "ed-key", "k=ed25519"}} {
		var k v1alpha1.DKIMKey
		eventually(t, 30*time.Second, tc.key.Name+" to be Ready with its record", func() bool {
			_, ready, _ := w.conditions(tc.key)
			_ = w.c.Get(ctx, client.ObjectKeyFromObject(tc.key), &k)
			return ready != nil && ready.Status == metav1.ConditionTrue && k.Status.DNSRecord != ""
		})
		var s corev1.Secret
		if err := w.c.Get(ctx, client.ObjectKey{Namespace: w.ns, Name: tc.secret}, &s); err != nil {
			t.Fatalf("the generated Secret: %v", err)
		}
		signer, err := policy.ParseDKIMKey(s.Data[v1alpha1.DKIMKeySecretKey])
		if err != nil {
			t.Fatalf("Secret %s: %v", tc.secret, err)
		}
		want, _ := policy.DKIMRecord(signer)
		if k.Status.DNSRecord != want || !strings.Contains(want, tc.algo) || k.Status.DNSName != tc.key.Spec.Selector+"._domainkey.example.org" {
			t.Errorf("%s: status %s = %q, want %q", tc.key.Name, k.Status.DNSName, k.Status.DNSRecord, want)
		}
		if s.Labels[labelManagedBy] != managedByJetmail || len(s.OwnerReferences) != 0 {
			t.Errorf("Secret %s: labels %v, owners %v", tc.secret, s.Labels, s.OwnerReferences)
		}
		dns.AddTXT(t, k.Status.DNSName, k.Status.DNSRecord)
	}

	// The gateway, on the snapshot alone, signs a relay client's mail.
	c := smtptest.DialReady(t, dp.addr)
	c.Cmd("MAIL FROM:<alice@example.org>", 250)
	c.Cmd("RCPT TO:<bob@example.net>", 250)
	c.Cmd("DATA", 354)
	c.Send("From: alice@example.org\r\nTo: bob@example.net\r\nSubject: signed in a cluster\r\nMessage-ID: <dkim-cluster@example.org>\r\n\r\nhello\r\n.\r\n")
	if code, reply, err := c.ReadReply(); err != nil || code != 250 {
		t.Fatalf("DATA: %q %v", reply, err)
	}
	var msg string
	if err := w.sp.Scan(ctx, func(m *spool.Message) error {
		body, err := w.sp.ReadBody(ctx, m)
		msg = m.Envelope.Headers + string(body)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	vs, err := dkim.VerifyWithOptions(strings.NewReader(msg), &dkim.VerifyOptions{LookupTXT: dnstest.LookupTXT(dns.Addr)})
	if err != nil || len(vs) != 2 {
		t.Fatalf("verify: %d signatures, %v\n%s", len(vs), err, msg)
	}
	for _, v := range vs {
		if v.Err != nil {
			t.Errorf("signature of %s: %v", v.Domain, v.Err)
		}
	}

	// A Secret that exists is never replaced: a key of the wrong kind is
	// refused, naming the Secret.
	wrong := &v1alpha1.DKIMKey{ObjectMeta: metav1.ObjectMeta{Name: "wrong"},
		Spec: v1alpha1.DKIMKeySpec{Domain: "example.net", Selector: "w", Algorithm: v1alpha1.DKIMEd25519SHA256, SecretName: "example-rsa-dkim"}}
	w.create(wrong)
	eventually(t, 30*time.Second, "the DKIMKey with an RSA key for Ed25519 to be refused", func() bool {
		a, _, _ := w.conditions(wrong)
		return a != nil && a.Status == metav1.ConditionFalse && strings.Contains(a.Message, "Secret example-rsa-dkim holds an RSA key")
	})
	var s corev1.Secret
	if err := w.c.Get(ctx, client.ObjectKey{Namespace: w.ns, Name: "example-rsa-dkim"}, &s); err != nil {
		t.Fatal(err)
	}
	if k, err := policy.ParseDKIMKey(s.Data[v1alpha1.DKIMKeySecretKey]); err != nil {
		t.Fatal(err)
	} else if rec, _ := policy.DKIMRecord(k); !strings.Contains(rec, "k=rsa") {
		t.Errorf("the Secret was rewritten: %s", rec)
	}
	snap, _, err := w.store.Current(ctx)
	if err != nil || len(snap.DKIMKeys) != 2 {
		t.Fatalf("snapshot keys: %v %v", snap, err)
	}
}
