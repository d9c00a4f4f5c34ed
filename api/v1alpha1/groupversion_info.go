// Package v1alpha1 holds the custom resources that configure jetmail, group
// mail.jetmail.io. The same objects, written as YAML files, configure
// `jetmail serve -f`; the policy package compiles both with the same code.
//
// +kubebuilder:object:generate=true
// +groupName=mail.jetmail.io
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of jetmail's resources.
var GroupVersion = schema.GroupVersion{Group: "mail.jetmail.io", Version: "v1alpha1"}
