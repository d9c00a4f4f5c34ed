// Package policy is jetmail's compiled configuration: the relay rules the
// gateways apply, built from RelayPolicy objects (api/v1alpha1). The same
// compiler serves `jetmail serve -f` (YAML files) and, later, the controller
// (objects from the API server), so a file that works on a laptop works in a
// cluster.
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
