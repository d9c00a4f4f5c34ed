// Package controllers turns jetmail's custom resources into the running
// configuration. One reconciler watches RelayPolicy, MailRoute and
// DeliveryPolicy objects and the Secrets they reference; on any change it
// compiles the whole set with the policy package (the same compiler as
// `jetmail serve -f`) and publishes the result as a snapshot in the NATS KV
// bucket the gateways and deliverers watch, only when it changed.
//
// Each object gets two conditions. Accepted says whether it is valid and
// part of the configuration, or why not. Ready says whether every running
// gateway and deliverer (their heartbeats in KV) runs a revision that
// contains this generation of it.
//
// A broken object never takes the running configuration down: objects are
// admitted one at a time in creation order, and one that does not compile
// with the others is left out. If an earlier generation of it was in force,
// that generation stays in force until the object is fixed. Only the broken
// object reports the problem.
package controllers
