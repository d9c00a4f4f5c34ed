package policy

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/jetmail/jetmail/api/v1alpha1"
)

// DefaultDKIMHeaders are the header fields a DKIMKey signs unless it names
// its own: RFC 6376 §5.4.1's list, trimmed to what mail clients write, plus
// the one-click unsubscribe fields (RFC 8058) the big mailbox providers ask
// bulk senders to sign.
var DefaultDKIMHeaders = []string{"from", "to", "cc", "subject", "date", "message-id",
	"reply-to", "in-reply-to", "references", "mime-version", "content-type",
	"content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post"}

// DefaultRSAKeyBits is the size of the RSA keys the controller and
// `jetmail dkim keygen` make.
const DefaultRSAKeyBits = 2048

// DKIMSigner is one compiled DKIMKey: what the gateway signs with.
type DKIMSigner struct {
	// Source names the object, for logs.
	Source   string
	Domain   string
	Selector string
	Key      crypto.Signer
	// Headers are the fields signed, lower case, each once; the gateway
	// lists each once more than the message holds it (over-signing).
	Headers     []string
	HeaderCanon dkim.Canonicalization
	BodyCanon   dkim.Canonicalization
	fromDomains []string
	isRSA       bool
}

// Options returns the go-msgauth options for one message, given how often
// each signed field occurs in its header.
func (s *DKIMSigner) Options(count func(field string) int) *dkim.SignOptions {
	var keys []string
	for _, h := range s.Headers {
		for range count(h) + 1 {
			keys = append(keys, h)
		}
	}
	return &dkim.SignOptions{Domain: s.Domain, Selector: s.Selector, Signer: s.Key,
		HeaderCanonicalization: s.HeaderCanon, BodyCanonicalization: s.BodyCanon, HeaderKeys: keys}
}

// Signing is the compiled set of DKIMKeys: which keys sign mail from which
// From: domain.
type Signing struct {
	byDomain map[string][]*DKIMSigner // From: domain (lower case) → keys
}

// For returns the keys that sign mail whose From: header is in domain: those
// of the longest of domain and its parents that has any; nil when none.
func (s *Signing) For(domain string) []*DKIMSigner {
	if s == nil || len(s.byDomain) == 0 {
		return nil
	}
	d := strings.TrimSuffix(strings.ToLower(domain), ".")
	for d != "" {
		if ks := s.byDomain[d]; len(ks) > 0 {
			return ks
		}
		i := strings.IndexByte(d, '.')
		if i < 0 {
			break
		}
		d = d[i+1:]
	}
	return nil
}

// Empty reports whether no key is configured.
func (s *Signing) Empty() bool { return s == nil || len(s.byDomain) == 0 }

// DKIMSecretName is the Secret a DKIMKey keeps its private key in.
func DKIMSecretName(k *v1alpha1.DKIMKey) string {
	if k.Spec.SecretName != "" {
		return k.Spec.SecretName
	}
	return k.Name + "-dkim"
}

// CompileSigning compiles DKIMKey objects. Two keys with the same domain and
// selector are an error (they would publish one DNS name); so is a key whose
// Secret is missing or holds a key of another algorithm.
func CompileSigning(objs []v1alpha1.DKIMKey, secrets Secrets) (*Signing, error) {
	s := &Signing{byDomain: map[string][]*DKIMSigner{}}
	seen := map[string]string{}
	for i := range objs {
		o := &objs[i]
		name := objName("DKIMKey", o.Namespace, o.Name)
		k, err := compileDKIMKey(o, secrets)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		k.Source = name
		id := DKIMRecordName(k.Selector, k.Domain)
		if other, ok := seen[id]; ok {
			return nil, fmt.Errorf("%s: spec.selector: %s is already %s's", name, id, other)
		}
		seen[id] = name
		for _, d := range k.fromDomains {
			s.byDomain[d] = append(s.byDomain[d], k)
		}
	}
	for _, ks := range s.byDomain {
		// RSA first: a verifier that stops at the first signature it
		// understands meets the one every verifier understands.
		sort.SliceStable(ks, func(i, j int) bool { return ks[i].isRSA && !ks[j].isRSA })
	}
	return s, nil
}

func compileDKIMKey(o *v1alpha1.DKIMKey, secrets Secrets) (*DKIMSigner, error) {
	sp := o.Spec
	k := &DKIMSigner{Domain: strings.TrimSuffix(strings.ToLower(sp.Domain), "."), Selector: strings.ToLower(sp.Selector)}
	if !validDomain(k.Domain) {
		return nil, fmt.Errorf("spec.domain: %q is not a domain name", sp.Domain)
	}
	if k.Selector == "" || !validDomain(k.Selector) {
		return nil, fmt.Errorf("spec.selector: %q is not a DNS label", sp.Selector)
	}
	algo := sp.Algorithm
	if algo == "" {
		algo = v1alpha1.DKIMRSASHA256
	}
	canon := sp.Canonicalization
	if canon == "" {
		canon = "relaxed/relaxed"
	}
	hc, bc, ok := strings.Cut(canon, "/")
	if !ok || !validCanon(hc) || !validCanon(bc) {
		return nil, fmt.Errorf("spec.canonicalization: %q is not header/body, each relaxed or simple", sp.Canonicalization)
	}
	k.HeaderCanon, k.BodyCanon = dkim.Canonicalization(hc), dkim.Canonicalization(bc)
	hs := sp.Headers
	if len(hs) == 0 {
		hs = DefaultDKIMHeaders
	}
	from := false
	seen := map[string]bool{}
	for _, h := range hs {
		h = strings.ToLower(strings.TrimSpace(h))
		if h == "" || strings.ContainsAny(h, ": \t") {
			return nil, fmt.Errorf("spec.headers: %q is not a header field name", h)
		}
		if h == "dkim-signature" || h == "received" || h == "return-path" {
			return nil, fmt.Errorf("spec.headers: %q changes on the way and must not be signed", h)
		}
		if !seen[h] {
			seen[h] = true
			k.Headers = append(k.Headers, h)
		}
		from = from || h == "from"
	}
	if !from {
		return nil, errors.New("spec.headers: must contain \"from\" (RFC 6376 §5.4)")
	}
	froms := sp.FromDomains
	if len(froms) == 0 {
		froms = []string{k.Domain}
	}
	for _, d := range froms {
		d = strings.TrimSuffix(strings.ToLower(d), ".")
		if !validDomain(d) {
			return nil, fmt.Errorf("spec.fromDomains: %q is not a domain name", d)
		}
		k.fromDomains = append(k.fromDomains, d)
	}
	secret := DKIMSecretName(o)
	if secrets == nil {
		return nil, fmt.Errorf("spec.secretName: Secret %s not found", secret)
	}
	data, err := secrets(o.Namespace, secret, v1alpha1.DKIMKeySecretKey)
	if err != nil {
		return nil, fmt.Errorf("spec.secretName: %w", err)
	}
	key, err := ParseDKIMKey(data)
	if err != nil {
		return nil, fmt.Errorf("Secret %s key %s: %w", secret, v1alpha1.DKIMKeySecretKey, err)
	}
	switch key.(type) {
	case *rsa.PrivateKey:
		if algo != v1alpha1.DKIMRSASHA256 {
			return nil, fmt.Errorf("Secret %s holds an RSA key, spec.algorithm is %s", secret, algo)
		}
		k.isRSA = true
	case ed25519.PrivateKey:
		if algo != v1alpha1.DKIMEd25519SHA256 {
			return nil, fmt.Errorf("Secret %s holds an Ed25519 key, spec.algorithm is %s", secret, algo)
		}
	}
	k.Key = key
	return k, nil
}

func validCanon(c string) bool { return c == "relaxed" || c == "simple" }

// validDomain accepts LDH labels separated by dots.
func validDomain(d string) bool {
	if d == "" || len(d) > 253 {
		return false
	}
	for _, l := range strings.Split(d, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, c := range l {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c >= 'A' && c <= 'Z') {
				return false
			}
		}
	}
	return true
}

// ParseDKIMKey reads a PEM private key: PKCS #8 (RSA or Ed25519) or PKCS #1
// (RSA). RSA keys under 1024 bits are refused (RFC 8301).
func ParseDKIMKey(data []byte) (crypto.Signer, error) {
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, errors.New("no PEM block")
	}
	var key any
	var err error
	switch b.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		return nil, fmt.Errorf("PEM block %q is not a private key", b.Type)
	}
	if err != nil {
		return nil, err
	}
	switch k := key.(type) {
	case *rsa.PrivateKey:
		if k.N.BitLen() < 1024 {
			return nil, fmt.Errorf("RSA key of %d bits: at least 1024 (RFC 8301)", k.N.BitLen())
		}
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("unsupported key type %T", key)
}

// GenerateDKIMKey makes a new private key, PEM (PKCS #8). bits is for RSA;
// 0 means DefaultRSAKeyBits.
func GenerateDKIMKey(algo v1alpha1.DKIMAlgorithm, bits int) ([]byte, error) {
	var key any
	var err error
	switch algo {
	case "", v1alpha1.DKIMRSASHA256:
		if bits == 0 {
			bits = DefaultRSAKeyBits
		}
		key, err = rsa.GenerateKey(rand.Reader, bits)
	case v1alpha1.DKIMEd25519SHA256:
		_, key, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, fmt.Errorf("unknown DKIM algorithm %q", algo)
	}
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// DKIMRecord is the TXT record value that publishes key's public half
// (RFC 6376 §3.6.1; Ed25519: RFC 8463 §4, the raw 32-octet key).
func DKIMRecord(key crypto.Signer) (string, error) {
	switch pub := key.Public().(type) {
	case *rsa.PublicKey:
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return "", err
		}
		return "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der), nil
	case ed25519.PublicKey:
		return "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(pub), nil
	}
	return "", fmt.Errorf("unsupported key type %T", key.Public())
}

// DKIMRecordName is where the record is published.
func DKIMRecordName(selector, domain string) string {
	return strings.ToLower(selector) + "._domainkey." + strings.TrimSuffix(strings.ToLower(domain), ".")
}
