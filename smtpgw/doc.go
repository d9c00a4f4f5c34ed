// Package smtpgw is jetmail's SMTP ingress, on go-smtp's server. It holds no
// state that outlives a connection: any gateway pod can take any client.
//
// For each session it applies the relay policy in force when the session
// began (policy.Relay): who may relay, which domains anyone may send to,
// which senders are refused, sizes, recipient counts, timeouts. DATA is
// checked as it streams (bare CR/LF, size, loops, data rate) into a spool
// Body, and the final dot is answered "250 2.0.0 Ok: queued as <id>" only
// after spool.Commit returns, that is after JetStream acknowledged the
// message with its replication. Any failure to commit is 451 4.3.0; nothing
// the client did not see acknowledged is left for a deliverer.
//
// Every wait is bounded: go-smtp's per-read timeout for idleness, and on the
// connection itself (conn) a wall-clock deadline for the whole session and
// one for each DATA transfer, plus a minimum average data rate, so a client
// that trickles one byte at a time is cut off with 421 4.4.2 at the deadline.
//
// The policy comes from a policy.Source, read when it is used: the
// connection limits, session deadline and error budget when a connection
// is accepted, the rest at EHLO, so a change applies to the next
// connection without a restart. A few settings go-smtp holds for all its
// connections (maxMessageBytes, auth.allowInsecure, timeouts.command);
// a change to one starts a new go-smtp server, subscribed to the Source,
// that takes the new connections while the old one finishes its own.
//
// Replies carry enhanced status codes (RFC 3463). Refusals that are the
// client's fault are 5xx; ours or temporary ones are 4xx.
package smtpgw
