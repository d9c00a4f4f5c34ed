package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// DKIMAlgorithm is a DKIM signing algorithm.
// +kubebuilder:validation:Enum=rsa-sha256;ed25519-sha256
type DKIMAlgorithm string

// DKIM signing algorithms.
const (
	// DKIMRSASHA256 signs with RSA (RFC 6376); every verifier knows it.
	DKIMRSASHA256 DKIMAlgorithm = "rsa-sha256"
	// DKIMEd25519SHA256 signs with Ed25519 (RFC 8463): small and fast, but
	// not every verifier knows it yet, so sign with an RSA key as well.
	DKIMEd25519SHA256 DKIMAlgorithm = "ed25519-sha256"
)

// DKIMKeySecretKey is the key of a DKIMKey's Secret that holds the private
// key, PEM-encoded (PKCS #8; PKCS #1 is read too for RSA).
const DKIMKeySecretKey = "dkim.key"

// DKIMKey signs mail that jetmail's relay clients and authenticated users
// send with DKIM (RFC 6376): OpenDKIM's KeyTable and SigningTable in one
// object. The private key lives in a Secret; when the Secret does not exist
// the controller generates the key into it. The DNS record to publish is in
// the status.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=dk
// +kubebuilder:printcolumn:name="Domain",type=string,JSONPath=`.spec.domain`
// +kubebuilder:printcolumn:name="Selector",type=string,JSONPath=`.spec.selector`
// +kubebuilder:printcolumn:name="Algorithm",type=string,JSONPath=`.spec.algorithm`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Record",type=string,JSONPath=`.status.dnsName`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type DKIMKey struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   DKIMKeySpec   `json:"spec,omitempty"`
	Status DKIMKeyStatus `json:"status,omitempty"`
}

// DKIMKeyList is a list of DKIMKey.
//
// +kubebuilder:object:root=true
type DKIMKeyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []DKIMKey `json:"items"`
}

// DKIMKeySpec is one signing key and the mail it signs.
// +kubebuilder:validation:XValidation:rule="self.algorithm != 'ed25519-sha256' || !has(self.rsaKeyBits)",message="rsaKeyBits is for rsa-sha256 keys"
type DKIMKeySpec struct {
	// Domain is the signing domain, the signature's d= tag. The public key
	// is published at <selector>._domainkey.<domain>.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`
	Domain string `json:"domain"`

	// Selector is the signature's s= tag. Rotate a key by adding a DKIMKey
	// with a new selector next to the old one (README, "DKIM").
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`
	Selector string `json:"selector"`

	// Algorithm is rsa-sha256 (default) or ed25519-sha256.
	// +optional
	// +kubebuilder:default=rsa-sha256
	Algorithm DKIMAlgorithm `json:"algorithm,omitempty"`

	// RSAKeyBits is the size of an RSA key the controller generates.
	// Default 2048. A key already in the Secret is used as it is.
	// +optional
	// +kubebuilder:validation:Enum=2048;3072;4096
	RSAKeyBits *int32 `json:"rsaKeyBits,omitempty"`

	// SecretName is the Secret, in this namespace, whose key "dkim.key"
	// holds the private key (PEM). If it does not exist the controller
	// creates it with a new key. Default: "<name>-dkim".
	// +optional
	// +kubebuilder:validation:MaxLength=253
	SecretName string `json:"secretName,omitempty"`

	// FromDomains are the domains of the From: header this key signs:
	// "example.org" signs mail from that domain and its subdomains. Default:
	// the signing domain. The longest match wins; all keys of that match
	// sign (an RSA and an Ed25519 key, say).
	// +optional
	// +kubebuilder:validation:MaxItems=1000
	// +kubebuilder:validation:items:MaxLength=253
	// +kubebuilder:validation:items:Pattern=`^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`
	FromDomains []string `json:"fromDomains,omitempty"`

	// Headers are the header fields signed, lower or mixed case; each is
	// signed once more than it occurs, so none can be added after signing
	// (over-signing). Must contain "from". Default: from, to, cc, subject,
	// date, message-id, reply-to, in-reply-to, references, mime-version,
	// content-type, content-transfer-encoding, list-unsubscribe,
	// list-unsubscribe-post.
	// +optional
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:Pattern=`^[!-9;-~]+$`
	Headers []string `json:"headers,omitempty"`

	// Canonicalization is header/body canonicalization, "relaxed/relaxed"
	// by default.
	// +optional
	// +kubebuilder:default="relaxed/relaxed"
	// +kubebuilder:validation:Enum="relaxed/relaxed";"relaxed/simple";"simple/relaxed";"simple/simple"
	Canonicalization string `json:"canonicalization,omitempty"`
}

// DKIMKeyStatus is the observed state of a DKIMKey: its conditions, and the
// DNS record that publishes its public key.
type DKIMKeyStatus struct {
	ConfigStatus `json:",inline"`

	// DNSName is where to publish the record: <selector>._domainkey.<domain>.
	// +optional
	DNSName string `json:"dnsName,omitempty"`

	// DNSRecord is the TXT record's value, "v=DKIM1; k=...; p=...". Zone
	// files split a value longer than 255 octets into several strings.
	// +optional
	DNSRecord string `json:"dnsRecord,omitempty"`
}
