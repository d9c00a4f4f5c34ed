// Package policy is jetmail's compiled configuration: the relay rules the
// gateways apply (Relay, from RelayPolicy objects) and the outbound rules
// the deliverers apply (Delivery, from DeliveryPolicy and MailRoute), built
// from the objects of api/v1alpha1. The same compiler serves `jetmail serve
// -f` (YAML files), the controller (objects from the API server, trial
// compiled one by one) and every pod (the snapshot the controller publishes
// in the JETMAIL_CONFIG bucket, see Store), so a file that works on a laptop
// works in a cluster. CompileOptions say where a configuration is compiled:
// only serve may read the files that objects name.
//
// Compiling validates everything that can be checked without the network
// and names the object and field at fault. A compiled Relay is immutable: a
// new configuration is a new value, swapped in atomically for new sessions
// while sessions in flight finish under the rules they started with.
//
// Every decision comes back as nil (allowed) or an *smtp.SMTPError with the
// reply code and enhanced status code to send, so the gateway never has to
// invent one.
package policy
