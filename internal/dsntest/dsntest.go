// Package dsntest reads delivery status notifications (RFC 3464) as the
// sender's mail client would, for the tests of the report builder and of
// the notices the deliverer sends.
package dsntest

import (
	"bufio"
	"bytes"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"net/textproto"
	"strings"
	"testing"
)

// Parsed is a built notice taken apart the way a mail client would.
type Parsed struct {
	Header mail.Header
	Parts  []Part
}

// Part is one MIME part of a notice.
type Part struct {
	Header textproto.MIMEHeader
	Body   []byte // decoded from quoted-printable when so marked
}

// Parse takes a delivery status notification (RFC 3464) apart and fails
// the test unless it is a multipart/report of report-type delivery-status.
func Parse(t *testing.T, raw []byte) Parsed {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("read message: %v", err)
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		t.Fatalf("parse Content-Type %q: %v", msg.Header.Get("Content-Type"), err)
	}
	if mt != "multipart/report" || params["report-type"] != "delivery-status" {
		t.Fatalf("Content-Type = %q %v, want multipart/report; report-type=delivery-status", mt, params)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	p := Parsed{Header: msg.Header}
	for {
		part, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("next part: %v", err)
		}
		var r io.Reader = part
		if strings.EqualFold(part.Header.Get("Content-Transfer-Encoding"), "quoted-printable") {
			r = quotedprintable.NewReader(part)
		}
		body, err := io.ReadAll(r)
		if err != nil {
			t.Fatalf("read part: %v", err)
		}
		p.Parts = append(p.Parts, Part{Header: part.Header, Body: body})
	}
	return p
}

// ContentTypes lists the media types of the parts, in order.
func (p Parsed) ContentTypes() []string {
	var out []string
	for _, part := range p.Parts {
		mt, _, _ := mime.ParseMediaType(part.Header.Get("Content-Type"))
		out = append(out, mt)
	}
	return out
}

// StatusBlocks reads a message/delivery-status body as the RFC 822-style
// header blocks RFC 3464 §2.1 says it is.
func StatusBlocks(t *testing.T, body []byte) []textproto.MIMEHeader {
	t.Helper()
	tp := textproto.NewReader(bufio.NewReader(bytes.NewReader(body)))
	var blocks []textproto.MIMEHeader
	for {
		h, err := tp.ReadMIMEHeader()
		if len(h) > 0 {
			blocks = append(blocks, h)
		}
		if err == io.EOF {
			return blocks
		}
		if err != nil {
			t.Fatalf("read status block %d: %v\n%s", len(blocks), err, body)
		}
	}
}

// wantBlock is the exact content of one status block: every field present
// with exactly this value, dates compared as instants, and nothing else.
