// Package resolve finds where mail for a domain goes: the ordered next hops
// (RFC 5321 §5.1) of a recipient domain from its MX records, or of a static
// route's hosts from their address records. A Resolver talks to the
// configured recursive DNS servers directly, so that it can tell "does not
// exist" (bounce) from "could not ask" (defer), which the standard library's
// resolver folds together, and caches their answers.
//
// Invariants:
//   - Every error is a *failure.Error: permanent only when the DNS said the
//     domain cannot receive mail (nonexistent, null MX, no usable MX host,
//     a loop back to this cluster), temporary when the DNS could not be
//     asked or answered with a failure.
//   - Answers are cached for their TTL, capped (an hour for positive
//     answers, five minutes for NXDOMAIN and NODATA); failures are never
//     cached. The cache is bounded.
//   - Hops come ordered by MX preference, equal preferences shuffled on
//     every call. An MX host that is this cluster (IsLocal), and every MX
//     host no more preferred than it, is never returned: delivering there
//     would loop.
//   - A Resolver is safe for concurrent use and must not be copied after
//     first use.
package resolve
