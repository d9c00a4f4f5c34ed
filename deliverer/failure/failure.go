package failure

import (
	"errors"
	"fmt"
)

// Error is a delivery failure with its SMTP meaning: temporary (retry
// later) or permanent (bounce), with the reply code and enhanced status code
// to report in logs and DSNs. Errors from the network, DNS and go-smtp are
// converted to *Error at the boundary where they occur.
type Error struct {
	// Permanent is true for a final failure (5xx): the recipient is bounced.
	// Otherwise the attempt is deferred.
	Permanent bool
	// Code is the SMTP reply code: the remote's, or one we chose for a
	// local failure (e.g. 451 for a timeout, 550 for a null MX).
	Code int
	// Enhanced is the RFC 3463 status code, e.g. "5.1.10".
	Enhanced string
	// Text is the remote reply text, or a description of the local failure.
	Text string
	// Remote is the host that gave the reply, if any ("" for local errors).
	Remote string
	// Reason says why a local failure happened where callers must act on
	// it; callers test it, never Text.
	Reason Reason
}

// Reason is the cause of a local failure that callers act on.
type Reason uint8

const (
	// Unspecified is every other failure.
	Unspecified Reason = iota
	// DeadlineKill is our client cutting a session off at its hard
	// deadline or for a data rate below the minimum (a tarpit), as
	// opposed to an ordinary timeout or a lost connection.
	DeadlineKill
	// Suspended is mail deferred without an attempt because its
	// destination is down (every next hop failed moments ago).
	Suspended
)

// WithReason returns e with its reason set.
func (e *Error) WithReason(r Reason) *Error {
	e.Reason = r
	return e
}

func (e *Error) Error() string {
	if e.Remote != "" {
		return fmt.Sprintf("%s said: %d %s %s", e.Remote, e.Code, e.Enhanced, e.Text)
	}
	return fmt.Sprintf("%d %s %s", e.Code, e.Enhanced, e.Text)
}

// Temporary returns a deferral error.
func Temporary(code int, enhanced, format string, args ...any) *Error {
	return &Error{Code: code, Enhanced: enhanced, Text: fmt.Sprintf(format, args...)}
}

// Permanent returns a bounce error.
func Permanent(code int, enhanced, format string, args ...any) *Error {
	return &Error{Permanent: true, Code: code, Enhanced: enhanced, Text: fmt.Sprintf(format, args...)}
}

// Classify turns any error into an *Error. Anything not already classified
// is temporary: for mail, retrying is the safe side.
func Classify(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Code: 451, Enhanced: "4.4.0", Text: err.Error()}
}
