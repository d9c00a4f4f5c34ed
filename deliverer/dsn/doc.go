// Package dsn builds delivery status notifications (RFC 3464): the
// "failed", "delayed" and "relayed" reports the deliverer mails back to a
// message's sender. Notices are built here and nowhere else; the package
// renders a message and queues nothing. A Report describes one queued
// message and the Recipients to report on; Build renders it as an RFC 5322
// message with CRLF line endings. WantsNotice tells whether a recipient's
// NOTIFY parameter (RFC 3461 §4.1) asked for a given Action.
//
// Invariants:
//   - A notification is itself mail: the caller queues what Build returns
//     with a null reverse path, so a notification about a notification
//     cannot loop. Build refuses an original with a null sender
//     (ErrNullSender) and a report with nobody left who asked for it
//     (ErrNothingToReport).
//   - Recipients that did not ask for their Action are left out, whatever
//     the caller passes.
//
// Encoding choices, so the result travels through any relay:
//   - the human-readable part is 7bit when it is ASCII and quoted-printable
//     (charset utf-8) when it is not, so it is always 7-bit clean;
//   - the message/delivery-status part is always 7-bit: a non-ASCII address
//     is reported with address type "utf-8" in the \x{HHHH} form RFC 6533
//     defines for message/delivery-status;
//   - the returned original (or its headers) is included verbatim, marked
//     8bit when it has 8-bit octets. A FULL original that is over
//     MaxReturnedBody or not line-safe for SMTP (bare CR or LF, a line over
//     998 octets) is returned as headers only, and the text says so.
//
// The message headers are ASCII except To when the original sender's
// address is itself non-ASCII, in which case the notification needs
// SMTPUTF8 to reach it anyway.
package dsn
