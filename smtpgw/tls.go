package smtpgw

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"
)

// CertReloader serves a certificate from files and picks up new files
// without a restart: Kubernetes rewrites a mounted Secret in place when
// cert-manager renews it. Files are looked at no more than once per
// CheckInterval; a broken new pair is logged and the old one kept.
type CertReloader struct {
	CertFile, KeyFile string
	CheckInterval     time.Duration
	Log               *zap.Logger

	mu        sync.Mutex
	cert      *tls.Certificate
	certMod   time.Time
	keyMod    time.Time
	lastCheck time.Time
}

// NewCertReloader loads the pair once, failing if it cannot.
func NewCertReloader(certFile, keyFile string, log *zap.Logger) (*CertReloader, error) {
	r := &CertReloader{CertFile: certFile, KeyFile: keyFile, CheckInterval: time.Second, Log: log}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *CertReloader) load() error {
	cs, err := os.Stat(r.CertFile)
	if err != nil {
		return err
	}
	ks, err := os.Stat(r.KeyFile)
	if err != nil {
		return err
	}
	if r.cert != nil && cs.ModTime().Equal(r.certMod) && ks.ModTime().Equal(r.keyMod) {
		return nil
	}
	cert, err := tls.LoadX509KeyPair(r.CertFile, r.KeyFile)
	if err != nil {
		return fmt.Errorf("load TLS certificate %s: %w", r.CertFile, err)
	}
	r.cert, r.certMod, r.keyMod = &cert, cs.ModTime(), ks.ModTime()
	return nil
}

// GetCertificate is for tls.Config.GetCertificate.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Since(r.lastCheck) >= r.CheckInterval {
		r.lastCheck = time.Now()
		old := r.cert
		if err := r.load(); err != nil {
			r.Log.Warn("TLS certificate reload failed, keeping the previous one", zap.Error(err))
		} else if r.cert != old {
			r.Log.Info("TLS certificate reloaded", zap.String("cert", r.CertFile))
		}
	}
	return r.cert, nil
}

// TLSConfig returns a server configuration using the reloader.
func (r *CertReloader) TLSConfig() *tls.Config {
	return &tls.Config{GetCertificate: r.GetCertificate, MinVersion: tls.VersionTLS12}
}

// SelfSigned makes a throwaway certificate for hostname, so STARTTLS works
// out of the box in `jetmail serve`. Clients that verify will refuse it.
func SelfSigned(hostname string) (*tls.Config, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: hostname, Organization: []string{"jetmail self-signed"}},
		DNSNames:     []string{hostname},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}
