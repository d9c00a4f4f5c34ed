package spool

import (
	"crypto/rand"
	"encoding/binary"
	"strings"
	"time"
)

// crockford is Crockford's base32 alphabet: digits and upper-case letters
// without I, L, O and U, so a queue ID can be read aloud or typed from a
// phone call without ambiguity.
const crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

// idEpoch is the zero of the time part of queue IDs. 40 bits of milliseconds
// from here last until November 2058.
var idEpoch = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// QueueIDLen is the length of a queue ID.
const QueueIDLen = 14

// NewQueueID returns a queue ID: 14 characters of Crockford base32, the first
// 8 the milliseconds since 2024 (so IDs sort roughly by arrival time across
// the cluster) and the last 6 thirty random bits (so two gateways minting an
// ID in the same millisecond collide with probability 2^-30; the spool's
// first-writer-wins publish turns even that into a retry, never an overwrite).
func NewQueueID(now time.Time) string {
	ms := uint64(now.Sub(idEpoch).Milliseconds()) & (1<<40 - 1)
	var rb [4]byte
	_, _ = rand.Read(rb[:])
	r := uint64(binary.BigEndian.Uint32(rb[:])) & (1<<30 - 1)
	var out [QueueIDLen]byte
	for i := 7; i >= 0; i-- {
		out[i] = crockford[ms&31]
		ms >>= 5
	}
	for i := QueueIDLen - 1; i >= 8; i-- {
		out[i] = crockford[r&31]
		r >>= 5
	}
	return string(out[:])
}

// ValidQueueID reports whether s has the shape of a queue ID. It is used to
// refuse garbage before it becomes part of a subject.
func ValidQueueID(s string) bool {
	if len(s) != QueueIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !strings.ContainsRune(crockford, rune(s[i])) {
			return false
		}
	}
	return true
}

// QueueIDTime returns the time encoded in a queue ID, to the millisecond.
func QueueIDTime(id string) (time.Time, bool) {
	if !ValidQueueID(id) {
		return time.Time{}, false
	}
	var v uint64
	for i := 0; i < 8; i++ {
		v = v<<5 | uint64(strings.IndexByte(crockford, id[i]))
	}
	return idEpoch.Add(time.Duration(v) * time.Millisecond), true
}
