package smtpgw

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/jetmail/jetmail/internal/smtptest"
)

// writeCertPair writes a self-signed certificate for cn and returns its
// serial number.
func writeCertPair(t *testing.T, certFile, keyFile, cn string) *big.Int {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn}, DNSNames: []string{cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	// Write to temporary names and rename, as the kubelet's atomic
	// writer does for a mounted Secret.
	for _, f := range []struct {
		path string
		blk  *pem.Block
	}{{certFile, &pem.Block{Type: "CERTIFICATE", Bytes: der}}, {keyFile, &pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}}} {
		tmp := f.path + ".tmp"
		if err := os.WriteFile(tmp, pem.EncodeToMemory(f.blk), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, f.path); err != nil {
			t.Fatal(err)
		}
	}
	return serial
}

// startTLSSerial runs STARTTLS on c and returns the server's certificate serial.
func startTLSSerial(c *smtptest.Client) (*tls.Conn, *big.Int) {
	c.T.Helper()
	c.Cmd("STARTTLS", 220)
	tc := c.UpgradeTLS("mx.test")
	return tc, tc.ConnectionState().PeerCertificates[0].SerialNumber
}

func TestRenewedCertificateIsServedWithoutRestart(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first := writeCertPair(t, certFile, keyFile, "mx.test")
	r, err := NewCertReloader(certFile, keyFile, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	r.CheckInterval = 50 * time.Millisecond
	n := startNATS(t)
	g := startGateway(t, n.spool(t), nil, func(c *Config) { c.TLS = r.TLSConfig() })

	c := smtptest.DialReady(t, g.addr)
	if _, serial := startTLSSerial(c); serial.Cmp(first) != 0 {
		t.Fatalf("served serial %v, want %v", serial, first)
	}
	// Mail over TLS is marked so in the envelope and the Received: header.
	c.Cmd("EHLO client.test", 250)
	c.Mail("a@example.org", []string{"b@example.net"}, simpleMessage("tls", "secret"), 250)
	m := queued(t, g.sp)[0]
	if !m.Envelope.TLS {
		t.Error("envelope does not record TLS")
	}
	body, _ := g.sp.ReadBody(t.Context(), m)
	if !strings.Contains(string(body), "with ESMTPS id") {
		t.Errorf("Received: header does not say ESMTPS: %q", body[:150])
	}

	// cert-manager renews the certificate; the Secret volume is rewritten.
	time.Sleep(20 * time.Millisecond) // a distinct modification time
	second := writeCertPair(t, certFile, keyFile, "mx.test")
	eventually(t, 5*time.Second, "the renewed certificate to be served", func() bool {
		c := smtptest.DialReady(t, g.addr)
		tc, serial := startTLSSerial(c)
		tc.Close()
		return serial.Cmp(second) == 0
	})

	// A broken renewal keeps the last good certificate.
	os.WriteFile(certFile, []byte("not a certificate"), 0o600)
	time.Sleep(100 * time.Millisecond)
	c2 := smtptest.DialReady(t, g.addr)
	if _, serial := startTLSSerial(c2); serial.Cmp(second) != 0 {
		t.Errorf("after a broken renewal served %v, want the previous %v", serial, second)
	}
}
