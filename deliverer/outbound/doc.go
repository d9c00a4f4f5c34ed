// Package outbound is jetmail's SMTP client: it hands one message to the
// first next hop that takes the transaction, and says what became of each
// recipient. It knows nothing of queues, retries or routes; the deliverer
// decides where a message goes and under which settings, and records what
// Client.Deliver reports.
//
// # Map
//
//   - client.go: Client, Deliver, the transaction (MAIL, RCPT, DATA) and
//     the mapping of replies and local failures to failure.Error.
//   - pool.go: connections: dialing, the greeting, EHLO, STARTTLS, AUTH,
//     and the pool that keeps them for reuse (checkout, checkin).
//   - deadline.go: the TCP connection under the session's hard deadline
//     and the minimum data rate.
//
// # Settings
//
// Every setting that comes from the configuration (TLS policy,
// credentials, timeouts, messagesPerConnection) is an argument of each
// Deliver call, not a field of the Client: the caller passes those of the
// configuration in force, so a change applies at the next delivery, to
// pooled connections too. The Client's own fields (EHLO name, trusted
// roots, idle time) are fixed for its life.
//
// # Deadlines
//
// go-smtp's client does the commands, but it only ever sets per-command
// deadlines, and clears them after each command. Every connection is
// therefore wrapped in a connection that clamps every deadline anyone sets
// to the session's hard deadline, and a watchdog closes the connection a
// moment after that deadline (or when the caller's context ends) in case
// something blocks without a deadline. A server that dribbles a byte a
// second resets no timer here: deadlines are absolute. While message data
// is written, each write's deadline is the DataBlock timeout or sooner,
// when the average rate would fall below MinDataRate.
//
// We read the greeting and send STARTTLS and RSET ourselves, beneath
// go-smtp: the greeting to give it its own timeout, STARTTLS because go-smtp
// has no exported way to start TLS on a client that already said EHLO with
// our name, and RSET because go-smtp's Reset makes the next command send
// EHLO again.
//
// # Reuse
//
// Connections are pooled by host name, address, TLS policy and AUTH user:
// under policy.TLSVerify the host name is what the certificate was checked
// against. A pooled connection must answer NOOP before it is used again,
// and is RSET before it is pooled; one that has carried
// messagesPerConnection messages, or was answered 4xx to MAIL, is closed
// with QUIT instead. Idle connections are closed after Client.IdleTime.
package outbound
