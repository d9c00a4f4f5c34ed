package smtpgw

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/mail"
	"strings"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/jetmail/jetmail/policy"
)

// maxSignedHeader bounds the header section the signer holds while it
// waits for the empty line; a message with a longer one leaves unsigned.
const maxSignedHeader = 256 << 10

// Why a message that could have been signed was not (the result label of
// jetmail_smtp_dkim_total).
const (
	dkimSigned  = "signed"
	dkimNoKey   = "no_key"   // no DKIMKey for the From: domain
	dkimNoFrom  = "no_from"  // no From: header, or one that does not parse
	dkimTooLong = "too_long" // header section over maxSignedHeader, or no body
	dkimError   = "error"    // the signer failed
)

// dkimTee signs a message while it streams to the spool: it holds the
// header section until the empty line that ends it, picks the keys by the
// From: domain, and then passes the message through one go-msgauth signer
// per key. The signatures go into the envelope (the one write at commit),
// and the deliverer sends them in front of the stored message: the message
// is signed once, where it passes anyway, never re-read, never re-signed on
// a retry.
type dkimTee struct {
	keys    *policy.Signing
	hdr     []byte
	started bool   // the header section ended and the signers run
	result  string // set once the outcome is known without signing
	signers []*dkim.Signer
	used    []*policy.DKIMSigner
}

func newDKIMTee(keys *policy.Signing) *dkimTee { return &dkimTee{keys: keys} }

// Write never fails: signing must not cost a message its acceptance.
func (t *dkimTee) Write(p []byte) (int, error) {
	switch {
	case t.result != "":
	case t.started:
		t.feed(p)
	default:
		from := max(0, len(t.hdr)-3)
		t.hdr = append(t.hdr, p...)
		switch i := headerEnd(t.hdr, from); {
		case i > maxSignedHeader || i < 0 && len(t.hdr) > maxSignedHeader:
			t.result, t.hdr = dkimTooLong, nil
		case i >= 0:
			t.start(t.hdr[:i])
			hdr := t.hdr
			t.hdr = nil
			t.feed(hdr)
		}
	}
	return len(p), nil
}

// headerEnd returns the end of the header section (the offset just past
// its fields, before the empty line), searching from from; -1 if not yet.
func headerEnd(b []byte, from int) int {
	if bytes.HasPrefix(b, []byte("\r\n")) {
		return 0
	}
	if i := bytes.Index(b[from:], []byte("\r\n\r\n")); i >= 0 {
		return from + i + 2
	}
	return -1
}

// start picks the keys for the header section hdr and starts the signers.
func (t *dkimTee) start(hdr []byte) {
	t.started = true
	fields := parseHeaderFields(hdr)
	domain := fromDomain(fields)
	if domain == "" {
		t.result = dkimNoFrom
		return
	}
	keys := t.keys.For(domain)
	if len(keys) == 0 {
		t.result = dkimNoKey
		return
	}
	count := func(name string) int {
		n := 0
		for _, f := range fields {
			if strings.EqualFold(f.name, name) {
				n++
			}
		}
		return n
	}
	for _, k := range keys {
		s, err := dkim.NewSigner(k.Options(count))
		if err != nil {
			t.abort()
			t.result = dkimError
			return
		}
		t.signers = append(t.signers, s)
		t.used = append(t.used, k)
	}
}

func (t *dkimTee) feed(p []byte) {
	for _, s := range t.signers {
		if _, err := s.Write(p); err != nil {
			t.abort()
			t.result = dkimError
			return
		}
	}
}

func (t *dkimTee) abort() {
	for _, s := range t.signers {
		s.Close()
	}
	t.signers = nil
}

// finish ends signing and returns the DKIM-Signature fields to send in front
// of the message (each ending in CRLF), the outcome, and the keys used.
func (t *dkimTee) finish() (string, string, []*policy.DKIMSigner, error) {
	if t.result == "" && !t.started {
		// No empty line: a message without a body. Rare enough to leave
		// unsigned rather than sign a body the message does not have.
		t.result = dkimTooLong
	}
	if t.result != "" {
		t.abort()
		return "", t.result, nil, nil
	}
	var b strings.Builder
	var errs []error
	for i, s := range t.signers {
		if err := s.Close(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", t.used[i].Source, err))
			continue
		}
		b.WriteString(s.Signature())
	}
	t.signers = nil
	if len(errs) > 0 {
		return "", dkimError, nil, errors.Join(errs...)
	}
	return b.String(), dkimSigned, t.used, nil
}

type headerField struct{ name, value string }

// parseHeaderFields splits a CRLF header section into unfolded fields;
// lines that are not fields are skipped.
func parseHeaderFields(hdr []byte) []headerField {
	var out []headerField
	for _, line := range strings.SplitAfter(string(hdr), "\r\n") {
		if line == "" {
			continue
		}
		if (line[0] == ' ' || line[0] == '\t') && len(out) > 0 {
			out[len(out)-1].value += strings.TrimRight(line, "\r\n")
			continue
		}
		name, value, ok := strings.Cut(line, ":")
		if !ok || name == "" || strings.ContainsAny(name, " \t") {
			continue
		}
		out = append(out, headerField{name: name, value: strings.TrimRight(value, "\r\n")})
	}
	return out
}

// addrParser reads addresses whatever the charset of their display names:
// only the domain matters here.
var addrParser = mail.AddressParser{WordDecoder: &mime.WordDecoder{
	CharsetReader: func(_ string, r io.Reader) (io.Reader, error) { return r, nil },
}}

// fromDomain is the lower-case domain of the first address of the one From:
// field; "" if there is none, more than one From: field, or it does not
// parse.
func fromDomain(fields []headerField) string {
	var from *headerField
	for i := range fields {
		if strings.EqualFold(fields[i].name, "from") {
			if from != nil {
				return "" // RFC 5322 allows one; a second is a forgery's mark
			}
			from = &fields[i]
		}
	}
	if from == nil {
		return ""
	}
	list, err := addrParser.ParseList(from.value)
	if err != nil || len(list) == 0 {
		return ""
	}
	at := strings.LastIndexByte(list[0].Address, '@')
	if at < 0 {
		return ""
	}
	return strings.ToLower(list[0].Address[at+1:])
}
