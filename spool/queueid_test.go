package spool_test

import (
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/spool"
)

const crockfordAlphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

func TestNewQueueIDHasTheDocumentedShape(t *testing.T) {
	for name, at := range map[string]time.Time{
		"an ID minted at the epoch":                    time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC),
		"an ID minted now":                             time.Now(),
		"an ID minted in a non-UTC zone":               time.Date(2030, 6, 1, 12, 0, 0, 0, time.FixedZone("X", 5*3600)),
		"an ID minted just before the 40 bits run out": time.Date(2058, 11, 3, 19, 53, 47, 775_000_000, time.UTC),
		"an ID minted with sub-millisecond parts":      time.Date(2026, 2, 3, 4, 5, 6, 999_999, time.UTC),
	} {
		t.Run(name, func(t *testing.T) {
			id := spool.NewQueueID(at)
			if len(id) != 14 || spool.QueueIDLen != 14 {
				t.Fatalf("NewQueueID = %q (%d chars), QueueIDLen %d; want 14", id, len(id), spool.QueueIDLen)
			}
			for i := 0; i < len(id); i++ {
				if !strings.ContainsRune(crockfordAlphabet, rune(id[i])) {
					t.Fatalf("NewQueueID = %q: %q at %d is not Crockford base32", id, id[i], i)
				}
			}
			if !spool.ValidQueueID(id) {
				t.Fatalf("ValidQueueID(%q) = false for a fresh ID", id)
			}
			got, ok := spool.QueueIDTime(id)
			if !ok {
				t.Fatalf("QueueIDTime(%q) not ok", id)
			}
			if want := at.Truncate(time.Millisecond); !got.Equal(want) {
				t.Fatalf("QueueIDTime(NewQueueID(%s)) = %s; want %s", at, got, want)
			}
		})
	}
}

func TestQueueIDTimeRoundTripsToTheMillisecond(t *testing.T) {
	start := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	// Walk 35 years in uneven steps, so every character position changes.
	step := 7*time.Hour + 13*time.Minute + 17*time.Second + 123*time.Millisecond + 456*time.Microsecond
	for i, at := 0, start; i < 40_000; i, at = i+1, at.Add(step) {
		id := spool.NewQueueID(at)
		got, ok := spool.QueueIDTime(id)
		if !ok || !got.Equal(at.Truncate(time.Millisecond)) {
			t.Fatalf("QueueIDTime(NewQueueID(%s)) = %s, %v", at, got, ok)
		}
	}
}

func TestQueueIDsMintedLaterSortAfterEarlierOnes(t *testing.T) {
	at := time.Date(2025, 5, 6, 7, 8, 9, 0, time.UTC)
	prev := spool.NewQueueID(at)
	for i := 0; i < 20_000; i++ {
		// Steps from one millisecond to about nine hours.
		at = at.Add(time.Duration(1+i*i%(1<<25)) * time.Millisecond)
		id := spool.NewQueueID(at)
		if id <= prev {
			t.Fatalf("ID %q minted at %s does not sort after %q minted before", id, at, prev)
		}
		prev = id
	}
}

func TestQueueIDsAreUnique(t *testing.T) {
	const n = 100_000
	seen := make(map[string]struct{}, n)
	at := time.Now()
	for i := 0; i < n; i++ {
		// 100 IDs per millisecond: uniqueness has to come from the random part.
		id := spool.NewQueueID(at.Add(time.Duration(i/100) * time.Millisecond))
		if _, dup := seen[id]; dup {
			t.Fatalf("ID %q minted twice among %d", id, i+1)
		}
		seen[id] = struct{}{}
	}
}

func TestValidQueueID(t *testing.T) {
	for name, tc := range map[string]struct {
		id   string
		want bool
	}{
		"a fresh ID is valid":                           {spool.NewQueueID(time.Now()), true},
		"fourteen zeros are valid":                      {"00000000000000", true},
		"the empty string is not valid":                 {"", false},
		"thirteen characters are not valid":             {"0000000000000", false},
		"fifteen characters are not valid":              {"000000000000000", false},
		"lower case is not valid":                       {"0000000000000a", false},
		"the letter I is not in the alphabet":           {"0000000000000I", false},
		"the letter L is not in the alphabet":           {"0000000000000L", false},
		"the letter O is not in the alphabet":           {"0000000000000O", false},
		"the letter U is not in the alphabet":           {"0000000000000U", false},
		"a dot that would split a subject is not valid": {"0000000.000000", false},
		"a wildcard is not valid":                       {"0000000000000*", false},
		"a multi-byte rune of 14 octets is not valid":   {"000000000000é", false},
	} {
		t.Run(name, func(t *testing.T) {
			if got := spool.ValidQueueID(tc.id); got != tc.want {
				t.Fatalf("ValidQueueID(%q) = %v; want %v", tc.id, got, tc.want)
			}
			if _, ok := spool.QueueIDTime(tc.id); ok != tc.want {
				t.Fatalf("QueueIDTime(%q) ok = %v; want %v", tc.id, ok, tc.want)
			}
		})
	}
}
