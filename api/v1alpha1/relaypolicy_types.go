package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// RelayPolicy says who may send mail through jetmail's SMTP gateways and
// under which limits. Several RelayPolicy objects add up: their lists are
// merged, and a limit may be set by at most one of them.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=rp
// +kubebuilder:printcolumn:name="Networks",type=string,JSONPath=`.spec.relayNetworks`
// +kubebuilder:printcolumn:name="Domains",type=string,JSONPath=`.spec.acceptedDomains`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type RelayPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   RelayPolicySpec `json:"spec,omitempty"`
	Status ConfigStatus    `json:"status,omitempty"`
}

// RelayPolicyList is a list of RelayPolicy.
//
// +kubebuilder:object:root=true
type RelayPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []RelayPolicy `json:"items"`
}

// RelayPolicySpec is the desired relay policy.
type RelayPolicySpec struct {
	// RelayNetworks are the client networks (CIDR) that may relay to any
	// domain: qmail's tcp.smtp RELAYCLIENT, Postfix's mynetworks.
	// +optional
	// +kubebuilder:validation:MaxItems=1000
	// +kubebuilder:validation:items:MaxLength=64
	// +kubebuilder:validation:items:XValidation:rule="isCIDR(self) || isIP(self)",message="must be a CIDR (10.0.0.0/8) or an IP address"
	RelayNetworks []string `json:"relayNetworks,omitempty"`

	// AcceptedDomains are the domains anyone may send to without relaying
	// rights: qmail's rcpthosts, Postfix's relay_domains. "example.org"
	// matches that domain; ".example.org" or "*.example.org" its subdomains.
	// +optional
	// +kubebuilder:validation:MaxItems=10000
	// +kubebuilder:validation:items:MaxLength=255
	// +kubebuilder:validation:items:Pattern=`^(\*\.|\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$`
	AcceptedDomains []string `json:"acceptedDomains,omitempty"`

	// RejectSenders are envelope senders refused at MAIL FROM with
	// 553 5.7.1: exact addresses, or "@domain" for a whole domain
	// (qmail's badmailfrom).
	// +optional
	// +kubebuilder:validation:MaxItems=100000
	// +kubebuilder:validation:items:MaxLength=320
	// +kubebuilder:validation:items:Pattern=`^[^@\s]*@[A-Za-z0-9.-]+$`
	RejectSenders []string `json:"rejectSenders,omitempty"`

	// MaxMessageBytes is the largest message accepted, advertised in the
	// SIZE extension (qmail's databytes, Postfix's message_size_limit).
	// Default 10 MiB.
	// +optional
	// +kubebuilder:validation:Minimum=1024
	MaxMessageBytes *int64 `json:"maxMessageBytes,omitempty"`

	// MaxRecipients is the number of recipients accepted per message;
	// more get 452 4.5.3. Default 100, the least RFC 5321 allows.
	// +optional
	// +kubebuilder:validation:Minimum=100
	MaxRecipients *int32 `json:"maxRecipients,omitempty"`

	// Auth configures SMTP AUTH. Authenticated clients may relay.
	// +optional
	Auth *RelayAuth `json:"auth,omitempty"`

	// NormalizeLineEndingsFrom are client networks (CIDR) whose bare CR or
	// LF in message data is turned into CRLF instead of being rejected, for
	// known sloppy senders. Only CRLF.CRLF ever ends the data.
	// +optional
	// +kubebuilder:validation:MaxItems=1000
	// +kubebuilder:validation:items:MaxLength=64
	// +kubebuilder:validation:items:XValidation:rule="isCIDR(self) || isIP(self)",message="must be a CIDR or an IP address"
	NormalizeLineEndingsFrom []string `json:"normalizeLineEndingsFrom,omitempty"`

	// Timeouts bound inbound sessions.
	// +optional
	Timeouts *InboundTimeouts `json:"timeouts,omitempty"`

	// Limits bound connections, errors and mail loops.
	// +optional
	Limits *InboundLimits `json:"limits,omitempty"`
}

// RelayAuth configures SMTP AUTH PLAIN and LOGIN.
// +kubebuilder:validation:XValidation:rule="!(has(self.usersSecretRef) && has(self.usersFile))",message="set usersSecretRef or usersFile, not both"
type RelayAuth struct {
	// UsersSecretRef names a Secret key holding "user:bcrypt-hash" lines
	// (htpasswd -B format).
	// +optional
	UsersSecretRef *SecretKeyRef `json:"usersSecretRef,omitempty"`

	// UsersFile is a path to the same format, read only by jetmail serve
	// -f. A cluster refuses an object that sets it (Accepted=False) and
	// never opens the file.
	// +optional
	UsersFile string `json:"usersFile,omitempty"`

	// AllowInsecure allows AUTH before STARTTLS. Off by default: passwords
	// never cross the network in clear text unless you say so.
	// +optional
	AllowInsecure bool `json:"allowInsecure,omitempty"`
}

// SecretKeyRef names one key of a Secret in the object's namespace.
type SecretKeyRef struct {
	// Name of the Secret.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
	// Key in the Secret's data.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Key string `json:"key"`
}

// InboundTimeouts bound the time an SMTP client may hold a connection.
type InboundTimeouts struct {
	// Command is the idle time allowed waiting for a command or a data
	// line (qmail's timeoutsmtpd). Default 5m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	Command *metav1.Duration `json:"command,omitempty"`

	// Data is the wall-clock limit for one DATA or BDAT transfer, however
	// busy the client keeps the line. Default 10m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	Data *metav1.Duration `json:"data,omitempty"`

	// Session is the wall-clock limit for a whole connection. Default 30m.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	Session *metav1.Duration `json:"session,omitempty"`

	// MinDataRate is the slowest average transfer rate, in bytes per
	// second, accepted during DATA once the first DataRateGrace has passed.
	// Default 1024.
	// +optional
	// +kubebuilder:validation:Minimum=0
	MinDataRate *int64 `json:"minDataRate,omitempty"`

	// DataRateGrace is how long a transfer may run before MinDataRate is
	// enforced. Default 30s.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="must be positive"
	DataRateGrace *metav1.Duration `json:"dataRateGrace,omitempty"`
}

// InboundLimits bound what one client or all clients together may use.
type InboundLimits struct {
	// MaxConnections is the number of concurrent connections per gateway.
	// Default 10000.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxConnections *int32 `json:"maxConnections,omitempty"`

	// MaxConnectionsPerIP is the number of concurrent connections per
	// client IP address. Default 50.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxConnectionsPerIP *int32 `json:"maxConnectionsPerIP,omitempty"`

	// MaxErrors is the number of error replies after which a session is
	// closed with 421 4.7.0. Default 20.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxErrors *int32 `json:"maxErrors,omitempty"`

	// MaxReceivedHeaders is the number of Received: headers above which a
	// message is taken for a loop and refused with 554 5.4.6
	// (RFC 5321 §6.3). Default 100.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxReceivedHeaders *int32 `json:"maxReceivedHeaders,omitempty"`
}
