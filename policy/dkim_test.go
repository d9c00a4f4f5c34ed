package policy_test

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/policy"
)

func dkimKeyObj(name, domain, selector string, algo v1alpha1.DKIMAlgorithm, mut ...func(*v1alpha1.DKIMKeySpec)) v1alpha1.DKIMKey {
	k := v1alpha1.DKIMKey{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "mail"},
		Spec: v1alpha1.DKIMKeySpec{Domain: domain, Selector: selector, Algorithm: algo}}
	for _, m := range mut {
		m(&k.Spec)
	}
	return k
}

func dkimSecret(t *testing.T, name string, algo v1alpha1.DKIMAlgorithm) corev1.Secret {
	t.Helper()
	pem, err := policy.GenerateDKIMKey(algo, 0)
	if err != nil {
		t.Fatal(err)
	}
	return corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "mail"},
		Data: map[string][]byte{v1alpha1.DKIMKeySecretKey: pem}}
}

func TestCompileSigningPicksKeysByFromDomain(t *testing.T) {
	objs := &policy.Objects{
		DKIMKeys: []v1alpha1.DKIMKey{
			dkimKeyObj("ed", "example.org", "e1", v1alpha1.DKIMEd25519SHA256),
			dkimKeyObj("rsa", "example.org", "r1", v1alpha1.DKIMRSASHA256),
			dkimKeyObj("sub", "example.org", "s1", v1alpha1.DKIMEd25519SHA256, func(s *v1alpha1.DKIMKeySpec) {
				s.FromDomains = []string{"Lists.Example.ORG."}
			}),
		},
		Secrets: []corev1.Secret{dkimSecret(t, "ed-dkim", v1alpha1.DKIMEd25519SHA256),
			dkimSecret(t, "rsa-dkim", v1alpha1.DKIMRSASHA256), dkimSecret(t, "sub-dkim", v1alpha1.DKIMEd25519SHA256)},
	}
	s, err := policy.CompileSigning(objs.DKIMKeys, objs.SecretLookup())
	if err != nil {
		t.Fatal(err)
	}
	sels := func(domain string) string {
		var out []string
		for _, k := range s.For(domain) {
			out = append(out, k.Selector)
		}
		return strings.Join(out, ",")
	}
	for domain, want := range map[string]string{
		"example.org":          "r1,e1", // RSA first
		"EXAMPLE.org.":         "r1,e1",
		"a.b.example.org":      "r1,e1",
		"lists.example.org":    "s1", // the longest match wins
		"x.lists.example.org":  "s1",
		"badexample.org":       "",
		"org":                  "",
		"example.org.evil.net": "",
	} {
		if got := sels(domain); got != want {
			t.Errorf("For(%q) = %q, want %q", domain, got, want)
		}
	}
	opts := s.For("example.org")[0].Options(func(h string) int { return map[string]int{"from": 1, "subject": 2}[h] })
	if got := strings.Join(opts.HeaderKeys, ":"); !strings.HasPrefix(got, "from:from:to:cc:subject:subject:subject:date") {
		t.Errorf("over-signed header list %s", got)
	}
}

func TestCompileSigningErrors(t *testing.T) {
	rsaSecret := dkimSecret(t, "k-dkim", v1alpha1.DKIMRSASHA256)
	pkcs1 := func() corev1.Secret {
		// An RSA key in PKCS #1 is read too.
		k, err := policy.ParseDKIMKey(rsaSecret.Data[v1alpha1.DKIMKeySecretKey])
		if err != nil {
			t.Fatal(err)
		}
		s := rsaSecret.DeepCopy()
		s.Data[v1alpha1.DKIMKeySecretKey] = pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k.(*rsa.PrivateKey))})
		return *s
	}()
	for _, tc := range []struct {
		name    string
		keys    []v1alpha1.DKIMKey
		secrets []corev1.Secret
		want    string
	}{
		{"ok", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", "")}, []corev1.Secret{rsaSecret}, ""},
		{"PKCS #1", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", "")}, []corev1.Secret{pkcs1}, ""},
		{"missing Secret", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", "")}, nil, "Secret k-dkim not found"},
		{"another Secret name", []v1alpha1.DKIMKey{dkimKeyObj("other", "example.org", "s", "", func(s *v1alpha1.DKIMKeySpec) { s.SecretName = "k-dkim" })},
			[]corev1.Secret{rsaSecret}, ""},
		{"wrong algorithm", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", v1alpha1.DKIMEd25519SHA256)}, []corev1.Secret{rsaSecret},
			"holds an RSA key, spec.algorithm is ed25519-sha256"},
		{"no From in headers", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", "", func(s *v1alpha1.DKIMKeySpec) { s.Headers = []string{"subject"} })},
			[]corev1.Secret{rsaSecret}, `must contain "from"`},
		{"a header that changes on the way", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", "", func(s *v1alpha1.DKIMKeySpec) { s.Headers = []string{"from", "Received"} })},
			[]corev1.Secret{rsaSecret}, "must not be signed"},
		{"bad canonicalization", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", "", func(s *v1alpha1.DKIMKeySpec) { s.Canonicalization = "relaxed" })},
			[]corev1.Secret{rsaSecret}, "spec.canonicalization"},
		{"bad domain", []v1alpha1.DKIMKey{dkimKeyObj("k", "exa mple.org", "s", "")}, []corev1.Secret{rsaSecret}, "spec.domain"},
		{"same record twice", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", ""),
			dkimKeyObj("k2", "Example.org", "S", "", func(s *v1alpha1.DKIMKeySpec) { s.SecretName = "k-dkim" })},
			[]corev1.Secret{rsaSecret}, "s._domainkey.example.org is already DKIMKey mail/k's"},
		{"not a key", []v1alpha1.DKIMKey{dkimKeyObj("k", "example.org", "s", "")},
			[]corev1.Secret{{ObjectMeta: metav1.ObjectMeta{Name: "k-dkim", Namespace: "mail"}, StringData: map[string]string{"dkim.key": "hello"}}}, "no PEM block"},
	} {
		objs := &policy.Objects{DKIMKeys: tc.keys, Secrets: tc.secrets}
		_, err := objs.Compile(policy.CompileOptions{})
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestDKIMRecordOfGeneratedKeys(t *testing.T) {
	for algo, prefix := range map[v1alpha1.DKIMAlgorithm]string{
		v1alpha1.DKIMRSASHA256:     "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA",
		v1alpha1.DKIMEd25519SHA256: "v=DKIM1; k=ed25519; p=",
	} {
		pem, err := policy.GenerateDKIMKey(algo, 0)
		if err != nil {
			t.Fatal(err)
		}
		k, err := policy.ParseDKIMKey(pem)
		if err != nil {
			t.Fatal(err)
		}
		rec, err := policy.DKIMRecord(k)
		if err != nil || !strings.HasPrefix(rec, prefix) {
			t.Errorf("%s: %q %v", algo, rec, err)
		}
		if algo == v1alpha1.DKIMEd25519SHA256 && len(rec) != len(prefix)+44 {
			t.Errorf("an Ed25519 record holds the raw 32-octet key (RFC 8463): %q", rec)
		}
	}
}
