package mtasts

// Fetching a policy over HTTPS (RFC 8461 §3.3).

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

const (
	// DefaultFetchTimeout bounds one fetch: connection, TLS, request and
	// body together.
	DefaultFetchTimeout = 20 * time.Second
	// MaxPolicySize is the largest policy body read (RFC 8461 §3.3 lets
	// senders stop at 64 KiB).
	MaxPolicySize = 64 << 10
)

// TLS-RPT result types (RFC 8460 §4.3.2.2) of a fetch that failed.
const (
	// ResultFetchError: the policy could not be fetched (no connection,
	// not 200, a redirect, too large, a deadline).
	ResultFetchError = "sts-policy-fetch-error"
	// ResultPolicyInvalid: it was fetched and does not parse.
	ResultPolicyInvalid = "sts-policy-invalid"
	// ResultWebPKIInvalid: the policy host's certificate is not valid.
	ResultWebPKIInvalid = "sts-webpki-invalid"
)

// FetchError is why a policy could not be had, with its TLS-RPT result
// type.
type FetchError struct {
	Domain string
	Result string
	Err    error
}

func (e *FetchError) Error() string {
	return fmt.Sprintf("MTA-STS policy of %s (%s): %v", e.Domain, e.Result, e.Err)
}

func (e *FetchError) Unwrap() error { return e.Err }

// Fetcher gets policies from https://mta-sts.<domain>/.well-known/mta-sts.txt
// with a hard deadline, a certificate that must be valid for
// mta-sts.<domain>, no redirects (RFC 8461 §3.3) and no proxy. Its fields
// must be set before the first Fetch.
type Fetcher struct {
	// RootCAs verifies the policy host's certificate; nil: the system
	// roots.
	RootCAs *x509.CertPool
	// Dial opens the connection to host:port; the deliverer resolves the
	// host with its own resolver. Nil: a net.Dialer (the system resolver).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Port is the HTTPS port; 0 means 443. Tests serve policies on another.
	Port uint16
	// Timeout bounds a fetch; 0 means DefaultFetchTimeout.
	Timeout time.Duration

	once   sync.Once
	client *http.Client
}

// Fetch fetches and parses domain's policy. The policy's ID and Fetched
// are left for the caller. Errors are *FetchError.
func (f *Fetcher) Fetch(ctx context.Context, domain string) (*Policy, error) {
	fail := func(result string, err error) (*Policy, error) {
		return nil, &FetchError{Domain: domain, Result: result, Err: err}
	}
	timeout := f.Timeout
	if timeout <= 0 {
		timeout = DefaultFetchTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	port := f.Port
	if port == 0 {
		port = 443
	}
	host := "mta-sts." + domain
	url := "https://" + net.JoinHostPort(host, strconv.Itoa(int(port))) + "/.well-known/mta-sts.txt"
	if port == 443 {
		url = "https://" + host + "/.well-known/mta-sts.txt"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fail(ResultFetchError, err)
	}
	resp, err := f.httpClient().Do(req)
	if err != nil {
		var ve *tls.CertificateVerificationError
		if errors.As(err, &ve) {
			return fail(ResultWebPKIInvalid, err)
		}
		return fail(ResultFetchError, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fail(ResultFetchError, fmt.Errorf("%s answered %s (redirects are not followed)", url, resp.Status))
	}
	if mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type")); err != nil || mt != "text/plain" {
		return fail(ResultPolicyInvalid, fmt.Errorf("%s is %q, not text/plain", url, resp.Header.Get("Content-Type")))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxPolicySize+1))
	if err != nil {
		return fail(ResultFetchError, err)
	}
	if len(body) > MaxPolicySize {
		return fail(ResultFetchError, fmt.Errorf("%s is larger than %d bytes", url, MaxPolicySize))
	}
	p, err := ParsePolicy(body)
	if err != nil {
		return fail(ResultPolicyInvalid, err)
	}
	p.Domain = domain
	return p, nil
}

func (f *Fetcher) httpClient() *http.Client {
	f.once.Do(f.build)
	return f.client
}

func (f *Fetcher) build() {
	dial := f.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	f.client = &http.Client{
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         dial,
			TLSClientConfig:     &tls.Config{RootCAs: f.RootCAs, MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout: 10 * time.Second,
			MaxIdleConnsPerHost: 1,
			IdleConnTimeout:     30 * time.Second,
			ForceAttemptHTTP2:   true,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}
