package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Condition types on every jetmail object.
const (
	// ConditionAccepted is True when the object is valid and part of the
	// configuration; False with the reason when it is not.
	ConditionAccepted = "Accepted"
	// ConditionReady is True when every running gateway and deliverer runs
	// a configuration revision that contains this generation of the object.
	ConditionReady = "Ready"
)

// ConfigStatus is the observed state of any jetmail configuration object.
type ConfigStatus struct {
	// ObservedGeneration is the generation the conditions describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// Revision is the configuration revision that contains this
	// generation, once accepted.
	// +optional
	Revision uint64 `json:"revision,omitempty"`

	// Conditions: Accepted and Ready.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}
