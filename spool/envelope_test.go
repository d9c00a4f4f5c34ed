package spool_test

import (
	"crypto/sha256"
	"encoding/hex"
	"testing"

	"github.com/jetmail/jetmail/spool"
)

func TestFingerprint(t *testing.T) {
	digest := func(s string) []byte { d := sha256.Sum256([]byte(s)); return d[:] }
	type tx struct {
		from  string
		rcpts []string
		body  []byte
	}
	base := tx{"alice@example.net", []string{"bob@example.org", "carol@example.org"}, digest("hello")}
	for name, tc := range map[string]struct {
		other tx
		same  bool
	}{
		"the same transmission again has the same fingerprint": {
			tx{"alice@example.net", []string{"bob@example.org", "carol@example.org"}, digest("hello")}, true},
		"recipients given in another order have the same fingerprint": {
			tx{"alice@example.net", []string{"carol@example.org", "bob@example.org"}, digest("hello")}, true},
		"recipients in another case have the same fingerprint": {
			tx{"alice@example.net", []string{"BOB@Example.ORG", "Carol@EXAMPLE.org"}, digest("hello")}, true},
		"a sender in another case has the same fingerprint": {
			tx{"Alice@EXAMPLE.net", []string{"bob@example.org", "carol@example.org"}, digest("hello")}, true},
		"another sender changes the fingerprint": {
			tx{"mallory@example.net", []string{"bob@example.org", "carol@example.org"}, digest("hello")}, false},
		"the null sender changes the fingerprint": {
			tx{"", []string{"bob@example.org", "carol@example.org"}, digest("hello")}, false},
		"one recipient fewer changes the fingerprint": {
			tx{"alice@example.net", []string{"bob@example.org"}, digest("hello")}, false},
		"one recipient more changes the fingerprint": {
			tx{"alice@example.net", []string{"bob@example.org", "carol@example.org", "dave@example.org"}, digest("hello")}, false},
		"another recipient changes the fingerprint": {
			tx{"alice@example.net", []string{"bob@example.org", "carl@example.org"}, digest("hello")}, false},
		"another body digest changes the fingerprint": {
			tx{"alice@example.net", []string{"bob@example.org", "carol@example.org"}, digest("hello!")}, false},
		"moving text from the sender to a recipient changes the fingerprint": {
			tx{"alice@example.netbob@example.org", []string{"carol@example.org"}, digest("hello")}, false},
		"joining two recipients into one changes the fingerprint": {
			tx{"alice@example.net", []string{"bob@example.orgcarol@example.org"}, digest("hello")}, false},
	} {
		t.Run(name, func(t *testing.T) {
			a := spool.Fingerprint(base.from, base.rcpts, base.body)
			b := spool.Fingerprint(tc.other.from, tc.other.rcpts, tc.other.body)
			if (a == b) != tc.same {
				t.Fatalf("Fingerprint(%v) = %s, Fingerprint(%v) = %s; want same = %v", base, a, tc.other, b, tc.same)
			}
		})
	}
}

func TestFingerprintIsShortHexAndDoesNotReorderTheCallersSlice(t *testing.T) {
	rcpts := []string{"z@example.org", "a@example.org"}
	fp := spool.Fingerprint("x@example.net", rcpts, []byte{1, 2, 3})
	if len(fp) != 32 {
		t.Fatalf("Fingerprint length %d; want 32 hex digits (128 bits)", len(fp))
	}
	if _, err := hex.DecodeString(fp); err != nil {
		t.Fatalf("Fingerprint %q is not hex: %v", fp, err)
	}
	if rcpts[0] != "z@example.org" {
		t.Fatalf("Fingerprint sorted the caller's recipients in place: %v", rcpts)
	}
}
