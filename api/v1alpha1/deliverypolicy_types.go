package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// DeliveryPolicy bounds and paces outbound delivery: timeouts, retries,
// queue lifetime and concurrency. At most one is in force: a second one is
// not accepted.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=dp
// +kubebuilder:printcolumn:name="Lifetime",type=string,JSONPath=`.spec.queueLifetime`
// +kubebuilder:printcolumn:name="Sessions",type=integer,JSONPath=`.spec.maxSessions`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type DeliveryPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   DeliveryPolicySpec `json:"spec,omitempty"`
	Status ConfigStatus       `json:"status,omitempty"`
}

// DeliveryPolicyList is a list of DeliveryPolicy.
//
// +kubebuilder:object:root=true
type DeliveryPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []DeliveryPolicy `json:"items"`
}

// DeliveryPolicySpec is the desired delivery policy.
type DeliveryPolicySpec struct {
	// Timeouts bound every outbound session.
	// +optional
	Timeouts *OutboundTimeouts `json:"timeouts,omitempty"`

	// RetryIntervals are the waits between attempts for a deferred
	// recipient; the last one repeats. Each wait gets up to 10% of random
	// jitter. Default 5m, 10m, 20m, 40m, 80m, 2h: a first retry within 5
	// minutes, three attempts in the first hour, then every 2 hours.
	// +optional
	// +kubebuilder:validation:MaxItems=50
	// +kubebuilder:validation:XValidation:rule="self.all(d, duration(d) > duration('0s'))",message="every interval must be positive"
	RetryIntervals []metav1.Duration `json:"retryIntervals,omitempty"`

	// QueueLifetime is how long a message may stay queued before what is
	// still undelivered is bounced: qmail's queuelifetime, Postfix's
	// maximal_queue_lifetime. Default 5 days.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	QueueLifetime *metav1.Duration `json:"queueLifetime,omitempty"`

	// DelayWarning, when set, sends a "delayed" notification to the sender
	// once a message has waited this long (Postfix's delay_warning_time).
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	DelayWarning *metav1.Duration `json:"delayWarning,omitempty"`

	// DeadDestinationTime is how long a destination is left alone after
	// an attempt found every one of its next hops unreachable or refusing
	// the session. Meanwhile its mail is deferred without a connection
	// ("delivery temporarily suspended", as Postfix's queue manager does
	// for minimal_backoff_time) and without reading the message; then one
	// attempt probes the destination, and its success lets the rest
	// through. Each deliverer keeps its own record. Default 1m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	DeadDestinationTime *metav1.Duration `json:"deadDestinationTime,omitempty"`

	// MaxSessions is the number of concurrent outbound sessions per
	// deliverer. Default 100.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxSessions *int32 `json:"maxSessions,omitempty"`

	// MaxSessionsPerDestination is the number of concurrent sessions per
	// destination (a domain's MX set, or a route). Default 20, like
	// Postfix's default_destination_concurrency_limit.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxSessionsPerDestination *int32 `json:"maxSessionsPerDestination,omitempty"`

	// MessagesPerConnection is how many messages go over one reused
	// connection before it is closed. Default 100.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MessagesPerConnection *int32 `json:"messagesPerConnection,omitempty"`

	// Port is the destination port for MX delivery. Default 25.
	// +optional
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Port *int32 `json:"port,omitempty"`

	// LocalHosts are names and addresses of this cluster; an MX that
	// points at one of them is skipped, so mail does not loop.
	// +optional
	LocalHosts []string `json:"localHosts,omitempty"`

	// DANE authenticates MX hosts by their TLSA records (RFC 7672), as
	// Postfix's smtp_tls_security_level = dane does: a host whose TLSA
	// records are validated by DNSSEC gets mandatory STARTTLS with a
	// certificate that matches them, and no mail at all otherwise (4.7.5,
	// never plaintext). It needs a resolver that validates DNSSEC, declared
	// with the deliverer's --dnssec flag; without it DANE is off whatever
	// this says. Default true.
	// +optional
	DANE *bool `json:"dane,omitempty"`

	// MTASTS applies recipient domains' MTA-STS policies (RFC 8461): under
	// "enforce", mail goes only to the MX hosts the policy names, over TLS
	// with a certificate valid for the host; "testing" is reported only.
	// Where a host has DANE records, DANE decides. Default true.
	// +optional
	MTASTS *bool `json:"mtaSTS,omitempty"`

	// Postmaster receives failure notices for messages with a null sender
	// (which are never bounced). Empty: they are logged and dropped.
	// +optional
	Postmaster string `json:"postmaster,omitempty"`
}

// OutboundTimeouts bound an outbound SMTP session. Defaults follow
// RFC 5321 §4.5.3.2.
type OutboundTimeouts struct {
	// Connect bounds the TCP connection (qmail's timeoutconnect).
	// Default 30s.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	Connect *metav1.Duration `json:"connect,omitempty"`
	// Greeting bounds the wait for the 220 greeting. Default 5m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	Greeting *metav1.Duration `json:"greeting,omitempty"`
	// Mail bounds the reply to MAIL FROM. Default 5m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	Mail *metav1.Duration `json:"mail,omitempty"`
	// Rcpt bounds the reply to each RCPT TO. Default 5m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	Rcpt *metav1.Duration `json:"rcpt,omitempty"`
	// DataInit bounds the 354 reply to DATA. Default 2m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	DataInit *metav1.Duration `json:"dataInit,omitempty"`
	// DataBlock bounds sending each block of data. Default 3m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	DataBlock *metav1.Duration `json:"dataBlock,omitempty"`
	// DataDone bounds the reply to the final dot. Default 10m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	DataDone *metav1.Duration `json:"dataDone,omitempty"`
	// Session is the hard wall-clock limit of a whole session, however
	// busy the remote keeps it: what qmail's timeoutremote should have
	// been. Default 15m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	Session *metav1.Duration `json:"session,omitempty"`
	// MinDataRate is the slowest average rate, in bytes per second, at
	// which the remote may take our data after DataRateGrace. Default 512.
	// +optional
	// +kubebuilder:validation:Minimum=0
	MinDataRate *int64 `json:"minDataRate,omitempty"`
	// DataRateGrace is how long a transfer may run before MinDataRate
	// applies. Default 30s.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	DataRateGrace *metav1.Duration `json:"dataRateGrace,omitempty"`
}
