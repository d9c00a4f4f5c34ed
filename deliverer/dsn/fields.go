package dsn

// Rendering values 7-bit clean: header fields, status fields and the
// returned original, so a notice travels through any relay.

import (
	"bytes"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

// originalRecipient renders a stored ORCPT ("addr-type;address", already
// xtext-decoded) for Original-Recipient.
func originalRecipient(orcpt string) string {
	typ, addr, ok := strings.Cut(orcpt, ";")
	if !ok {
		typ, addr = "rfc822", orcpt
	}
	typ = strings.TrimSpace(typ)
	if typ == "" || !isASCII(typ) || hasControlOrSpace(typ) {
		typ = "rfc822"
	}
	return typedAddress(typ, strings.TrimSpace(addr), ";")
}

// typedAddress renders "type<sep>address" 7-bit clean: an ASCII address
// keeps its type, a non-ASCII one becomes type utf-8 in the
// utf-8-addr-xtext form (RFC 6533 §3).
func typedAddress(typ, addr, sep string) string {
	if isASCII(addr) {
		return typ + sep + cleanText(addr)
	}
	return "utf-8" + sep + utf8AddrXtext(addr)
}

// utf8AddrXtext encodes addr as utf-8-addr-xtext (RFC 6533 §3): QCHARs
// as they are, everything else as \x{HHHH}.
func utf8AddrXtext(addr string) string {
	var b strings.Builder
	for _, r := range strings.ToValidUTF8(addr, "\uFFFD") {
		if r > 0x20 && r < 0x7f && r != '+' && r != '=' && r != '\\' {
			b.WriteRune(r)
			continue
		}
		fmt.Fprintf(&b, `\x{%02X}`, r)
	}
	return b.String()
}

// cleanText makes a value safe for a 7-bit header field: line breaks, tabs
// and runs of spaces become one space, other control characters become '?',
// and non-ASCII characters are written as \x{HHHH} (the RFC 6533 escape) so
// nothing is lost.
func cleanText(s string) string {
	var b strings.Builder
	space := false
	for _, r := range strings.ToValidUTF8(s, "\uFFFD") {
		switch {
		case r == ' ' || r == '\t' || r == '\r' || r == '\n':
			space = true
			continue
		case r < 0x20 || r == 0x7f:
			r = '?'
		}
		if space && b.Len() > 0 {
			b.WriteByte(' ')
		}
		space = false
		if r >= utf8.RuneSelf {
			fmt.Fprintf(&b, `\x{%02X}`, r)
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// statusCode returns status if it is an RFC 3463 code, else the generic code
// for the action.
func statusCode(status string, action Action) string {
	if validStatus(status) {
		return status
	}
	switch action {
	case ActionFailed:
		return "5.0.0"
	case ActionDelayed:
		return "4.0.0"
	}
	return "2.0.0"
}

// validStatus checks class "." subject "." detail (RFC 3463 §2).
func validStatus(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 3 || len(parts[0]) != 1 || strings.IndexByte("245", parts[0][0]) < 0 {
		return false
	}
	for _, p := range parts[1:] {
		if len(p) < 1 || len(p) > 3 {
			return false
		}
		for i := 0; i < len(p); i++ {
			if p[i] < '0' || p[i] > '9' {
				return false
			}
		}
	}
	return true
}

// formatDate formats t as an RFC 5322 date-time.
func formatDate(t time.Time) string {
	return t.Format(time.RFC1123Z)
}

// writeField writes "Name: value" and CRLF, folding at spaces so lines
// stay within 78 octets where the value allows and within 998 always. A
// word too long for one line is split, which on unfolding reads as a space
// inside it: better than a line a relay would reject.
func writeField(b *bytes.Buffer, name, value string) {
	lineLen := len(name) + 1
	b.WriteString(name)
	b.WriteByte(':')
	first := true
	for _, word := range strings.Split(value, " ") {
		for len(word) > 0 {
			// A piece too long to share a line goes on a continuation line
			// of its own: SP plus at most 997 octets.
			maxWord := maxLine - 1
			if first {
				maxWord -= lineLen
			}
			piece := word
			if len(piece) > maxWord {
				cut := maxWord
				for cut > 0 && !utf8.RuneStart(piece[cut]) {
					cut--
				}
				piece = piece[:cut]
			}
			word = word[len(piece):]
			if !first && lineLen+1+len(piece) > foldAt {
				b.WriteString("\r\n")
				lineLen = 0
			}
			b.WriteByte(' ')
			b.WriteString(piece)
			lineLen += 1 + len(piece)
			first = false
		}
	}
	b.WriteString("\r\n")
}

// headerSection returns msg up to, not including, the empty line that
// ends its header section; all of msg if it has none.
func headerSection(msg []byte) []byte {
	for off := 0; off < len(msg); {
		nl := bytes.IndexByte(msg[off:], '\n')
		if nl < 0 {
			return msg
		}
		line := msg[off : off+nl]
		if len(line) == 0 || (len(line) == 1 && line[0] == '\r') {
			return msg[:off]
		}
		off += nl + 1
	}
	return msg
}

// lineSafe reports whether msg can travel verbatim over SMTP: every CR
// and LF paired as CRLF, no NUL, no line over 998 octets.
func lineSafe(msg []byte) bool {
	lineLen := 0
	for i, c := range msg {
		switch c {
		case '\r':
			if i+1 >= len(msg) || msg[i+1] != '\n' {
				return false
			}
		case '\n':
			if i == 0 || msg[i-1] != '\r' {
				return false
			}
			lineLen = 0
			continue
		case 0:
			return false
		default:
			lineLen++
			if lineLen > maxLine {
				return false
			}
		}
	}
	return true
}

// makeLineSafe returns msg with every line ending in CRLF, NULs dropped
// and over-long lines folded (a header line continues after CRLF SP).
func makeLineSafe(msg []byte) []byte {
	if len(msg) == 0 {
		return nil
	}
	if lineSafe(msg) && bytes.HasSuffix(msg, []byte("\r\n")) {
		return msg
	}
	const chunk = maxLine - 8
	var b bytes.Buffer
	lines := bytes.Split(bytes.ReplaceAll(bytes.ReplaceAll(msg, []byte("\r\n"), []byte("\n")), []byte("\r"), []byte("\n")), []byte("\n"))
	if len(lines[len(lines)-1]) == 0 {
		lines = lines[:len(lines)-1]
	}
	for _, line := range lines {
		line = bytes.ReplaceAll(line, []byte{0}, nil)
		for len(line) > chunk {
			cut := chunk
			for cut > 0 && !utf8.RuneStart(line[cut]) {
				cut--
			}
			b.Write(line[:cut])
			b.WriteString("\r\n ")
			line = line[cut:]
		}
		b.Write(line)
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

func has8Bit(b []byte) bool {
	for _, c := range b {
		if c >= utf8.RuneSelf {
			return true
		}
	}
	return false
}

func hasControlOrSpace(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] == 0x7f {
			return true
		}
	}
	return false
}
