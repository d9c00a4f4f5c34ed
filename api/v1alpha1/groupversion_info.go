// Package v1alpha1 holds the custom resources that configure jetmail, group
// mail.jetmail.io. The same objects, written as YAML files, configure
// `jetmail serve -f`; the policy package compiles both with the same code.
//
// +kubebuilder:object:generate=true
// +groupName=mail.jetmail.io
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the API group and version of jetmail's resources.
	GroupVersion = schema.GroupVersion{Group: "mail.jetmail.io", Version: "v1alpha1"}

	// SchemeBuilder registers the kinds with a runtime scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds the kinds of this group and version to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func init() {
	SchemeBuilder.Register(&RelayPolicy{}, &RelayPolicyList{},
		&MailRoute{}, &MailRouteList{},
		&DeliveryPolicy{}, &DeliveryPolicyList{},
		&DKIMKey{}, &DKIMKeyList{})
}
