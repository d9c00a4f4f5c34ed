package smtp_test

// Tests of the patches in PATCHES.md, on go-smtp's own test backend.

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// expectReply reads one reply line and fails unless it starts with want.
func expectReply(t *testing.T, scanner *bufio.Scanner, want string) {
	t.Helper()
	if !scanner.Scan() {
		t.Fatalf("no reply (want %q): %v", want, scanner.Err())
	}
	if got := scanner.Text(); !strings.HasPrefix(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// expectClosed fails unless the server closes the connection without
// another reply.
func expectClosed(t *testing.T, c net.Conn, scanner *bufio.Scanner) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if scanner.Scan() {
		t.Fatalf("connection still open, got %q", scanner.Text())
	}
}

// Patch 2: a chunk the client cut short is not the whole message.
func TestBDATChunkCutShortIsNotStored(t *testing.T) {
	be, s, c, scanner, _ := testServerEhlo(t)
	defer s.Close()
	io.WriteString(c, "MAIL FROM:<root@nsa.gov>\r\n")
	expectReply(t, scanner, "250 ")
	io.WriteString(c, "RCPT TO:<root@gchq.gov.uk>\r\n")
	expectReply(t, scanner, "250 ")
	io.WriteString(c, "BDAT 100 LAST\r\nHey <3\r\n")
	c.Close()

	time.Sleep(300 * time.Millisecond)
	if len(be.anonmsgs) != 0 {
		t.Fatalf("%d messages stored from a chunk cut short", len(be.anonmsgs))
	}
}

// Patch 4: a line is a command only once its line ending has arrived.
func TestPartialLineAtTheIdleTimeoutIsNotRun(t *testing.T) {
	_, s, c, scanner := testServerGreeted(t, func(s *smtp.Server) { s.ReadTimeout = 200 * time.Millisecond })
	defer s.Close()
	io.WriteString(c, "QUIT")
	expectReply(t, scanner, "421 4.4.2")
	expectClosed(t, c, scanner)
}

// Patch 7: a BDAT refused for its arguments still has its chunk dropped.
func TestRefusedBDATArgumentsDropTheChunk(t *testing.T) {
	_, s, c, scanner, _ := testServerEhlo(t)
	defer s.Close()
	io.WriteString(c, "BDAT 10 LASTX\r\nNOOP\r\nNOOP")
	expectReply(t, scanner, "501 5.5.4")
	io.WriteString(c, "RSET\r\n")
	expectReply(t, scanner, "250 ") // RSET's: no NOOP from the chunk ran
	io.WriteString(c, "BDAT x\r\n")
	expectReply(t, scanner, "501 5.5.4")
	expectClosed(t, c, scanner)
}

// Patch 3: a failed STARTTLS handshake closes the connection.
func TestFailedSTARTTLSHandshakeClosesTheConnection(t *testing.T) {
	_, s, c, scanner, _ := testServerEhlo(t, func(s *smtp.Server) { s.TLSConfig = selfSigned(t) })
	defer s.Close()
	io.WriteString(c, "STARTTLS\r\n")
	expectReply(t, scanner, "220 ")
	io.WriteString(c, "MAIL FROM:<root@nsa.gov>\r\n") // not a ClientHello
	expectClosed(t, c, scanner)
}

// Patch 6: AUTH is not permitted during a mail transaction (RFC 4954 §4).
func TestAUTHDuringATransactionIsABadSequence(t *testing.T) {
	_, s, c, scanner, _ := testServerEhlo(t)
	defer s.Close()
	io.WriteString(c, "MAIL FROM:<root@nsa.gov>\r\n")
	expectReply(t, scanner, "250 ")
	io.WriteString(c, "AUTH PLAIN AHVzZXJuYW1lAHBhc3N3b3Jk\r\n")
	expectReply(t, scanner, "503 5.5.1")
}

func selfSigned(t *testing.T) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
}
