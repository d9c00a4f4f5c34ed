// Package deliverer takes queued mail from the spool and delivers it: it
// resolves where each recipient's mail goes (a static MailRoute first, else
// MX records), talks SMTP to the next hop under hard deadlines, records a
// result per recipient, retries what was deferred and bounces what failed.
package deliverer
