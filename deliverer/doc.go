// Package deliverer takes queued mail from the spool and delivers it: it
// resolves where each recipient's mail goes (a static MailRoute first, else
// MX records), talks SMTP to the next hop under hard deadlines, records a
// result per recipient, retries what was deferred and bounces what failed.
//
// # Map
//
// The deliverer proper, one concern per file:
//
//   - deliverer.go: Config, the Deliverer and New.
//   - consume.go: Run, the consumer loop that pulls only as many queued
//     messages as there are free workers, and handle, which loads a
//     message's delivery state and starts one attempt on it.
//   - attempt.go: one attempt of one message, its lifecycle: group the due
//     recipients by domain, route and deliver each group (deliverDomain),
//     record a result per recipient (record), then save the state and
//     acknowledge or reschedule the message (finish).
//   - slots.go: destination session slots: takeSlot and freeSlot bound the
//     sessions per destination (MaxPerDest) and in all (MaxSessions), and
//     keep one busy destination from holding every worker.
//   - dead.go: dead-destination tracking: a destination whose every hop
//     failed is left alone for a while, then probed by one attempt.
//   - notify.go: delay warnings, bounces and success notices: the DSN mail
//     an attempt queues to the sender.
//   - housekeeping.go: queue depth and age metrics, and the orphan body
//     sweep.
//   - metrics.go: the Prometheus metrics.
//
// Its parts, as packages below this one:
//
//   - resolve: the caching MX resolver that turns a domain into next hops.
//   - outbound: the SMTP client (Client.Deliver) and its connection pool:
//     dialing, STARTTLS, AUTH, hard deadlines, reuse. It is handed the
//     settings of the configuration in force at every delivery.
//   - dsn: the RFC 3464 delivery status notification builder.
//   - failure: the delivery error type, temporary or permanent, with its
//     SMTP codes, shared by all of the above.
//
// # Invariants
//
// A recipient that got the message never gets it again: every result is
// recorded in the spool's delivery state before the queue message is
// acknowledged, and an attempt cut short by a shutdown still records its
// outcome. A message handed to this process stays ours while its sessions
// run (in-progress signals); one this process never finished comes back to
// a replica after AckWait. The policy in force is read from
// the Source (Config.Source) at every attempt, which runs on it throughout,
// so configuration changes apply to the next attempt without a restart.
package deliverer
