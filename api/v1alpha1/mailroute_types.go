package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TLSPolicy says how a next hop is secured.
// +kubebuilder:validation:Enum=none;opportunistic;required;verify
type TLSPolicy string

// TLS policies for outbound delivery.
const (
	// TLSNone never uses STARTTLS.
	TLSNone TLSPolicy = "none"
	// TLSOpportunistic uses STARTTLS when offered, without verifying the
	// certificate, and falls back to plaintext if the handshake fails.
	TLSOpportunistic TLSPolicy = "opportunistic"
	// TLSRequired needs STARTTLS to succeed, without verification.
	TLSRequired TLSPolicy = "required"
	// TLSVerify needs STARTTLS with a certificate valid for the host name.
	TLSVerify TLSPolicy = "verify"
)

// MailRoute sends mail for some domains to fixed next hops instead of their
// MX hosts: qmail's smtproutes, Postfix's transport and relayhost.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=mr
// +kubebuilder:printcolumn:name="Domains",type=string,JSONPath=`.spec.domains`
// +kubebuilder:printcolumn:name="Next hops",type=string,JSONPath=`.spec.nextHops`
// +kubebuilder:printcolumn:name="TLS",type=string,JSONPath=`.spec.tls`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MailRoute struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   MailRouteSpec `json:"spec,omitempty"`
	Status ConfigStatus  `json:"status,omitempty"`
}

// MailRouteList is a list of MailRoute.
//
// +kubebuilder:object:root=true
type MailRouteList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []MailRoute `json:"items"`
}

// MailRouteSpec is the desired route.
// +kubebuilder:validation:XValidation:rule="!has(self.tls) || self.tls != 'none' || !((has(self.dane) && self.dane) || (has(self.mtaSTS) && self.mtaSTS))",message="tls none cannot go with dane or mtaSTS, which need TLS"
type MailRouteSpec struct {
	// Domains are the recipient domains this route takes: "example.org"
	// exactly, "*.example.org" for its subdomains, or "*" for every domain
	// no other route takes (a smarthost). An exact domain wins over a
	// wildcard, a longer wildcard over a shorter one.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=1000
	// +kubebuilder:validation:items:MaxLength=255
	// +kubebuilder:validation:items:Pattern=`^(\*|(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)$`
	Domains []string `json:"domains"`

	// NextHops are tried in order until one takes the mail: "host",
	// "host:port" or "[192.0.2.1]:port". A host name is resolved with A and
	// AAAA records only, never MX. Default port 25.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=262
	// +kubebuilder:validation:items:Pattern=`^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,253}[A-Za-z0-9])?)(:[0-9]{1,5})?$`
	NextHops []string `json:"nextHops"`

	// TLS is the STARTTLS policy towards these hops. Default opportunistic.
	// +optional
	TLS TLSPolicy `json:"tls,omitempty"`

	// DANE authenticates these hops by their TLSA records when the
	// deliverer's resolver validates DNSSEC (--dnssec): a host with usable
	// records gets mandatory STARTTLS with a certificate that matches them,
	// whatever tls says. Default false: a route's hosts are chosen here.
	// +optional
	DANE *bool `json:"dane,omitempty"`

	// MTASTS holds these hops to the recipient domain's MTA-STS policy, as
	// if they were its MX hosts: under "enforce", a hop the policy does not
	// name, or whose certificate is not valid for its name, gets no mail.
	// Default false.
	// +optional
	MTASTS *bool `json:"mtaSTS,omitempty"`

	// Auth logs in to the next hop with SMTP AUTH (PLAIN, or LOGIN).
	// +optional
	Auth *RouteAuth `json:"auth,omitempty"`

	// Timeouts override the DeliveryPolicy's for these hops.
	// +optional
	Timeouts *OutboundTimeouts `json:"timeouts,omitempty"`
}

// RouteAuth names the credentials for a next hop.
// +kubebuilder:validation:XValidation:rule="has(self.secretRef) != has(self.file)",message="set exactly one of secretRef or file"
type RouteAuth struct {
	// SecretRef names a Secret (in the route's namespace) with the keys
	// "username" and "password".
	// +optional
	SecretRef *SecretRef `json:"secretRef,omitempty"`

	// File is a path to a file holding "username:password", read only by
	// jetmail serve -f. A cluster refuses an object that sets it
	// (Accepted=False) and never opens the file.
	// +optional
	File string `json:"file,omitempty"`
}

// SecretRef names a Secret in the object's namespace.
type SecretRef struct {
	// Name of the Secret.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
}
