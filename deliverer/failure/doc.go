// Package failure is the deliverer's one error type: a delivery failure
// with its SMTP meaning, shared by the resolver (package resolve), the
// outbound client and the deliverer that records results and writes
// notices.
//
// Invariants:
//   - An *Error is either temporary (the recipient is deferred and tried
//     again) or permanent (it is bounced); it carries the reply code and
//     RFC 3463 enhanced status code that go into logs, the delivery state
//     and DSNs.
//   - Errors from the network, DNS and go-smtp are converted to *Error at
//     the boundary where they occur; Classify turns anything that was not
//     into a temporary one, since for mail retrying is the safe side.
package failure
