package controllers

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/policy"
)

// dkimRecord is the DNS record a DKIMKey's status shows.
type dkimRecord struct{ name, value string }

// Labels and annotations of the Secrets the controller makes for DKIMKeys.
const (
	labelManagedBy     = "app.kubernetes.io/managed-by"
	annotationDKIMKey  = "mail.jetmail.io/dkim-key"
	managedByJetmail   = "jetmail"
	dkimSecretCreateOK = "DKIMKeyGenerated"
)

// ensureDKIMSecret makes sure k's Secret exists, generating a private key
// into a new one when it does not (as cert-manager does for certificates),
// and returns the DNS record of the key it holds. The key is never logged.
// The Secret has no owner reference: deleting the DKIMKey keeps the key,
// so a DKIMKey recreated by mistake signs with the key DNS publishes.
func (r *ConfigReconciler) ensureDKIMSecret(ctx context.Context, k *v1alpha1.DKIMKey, created map[types.NamespacedName]*corev1.Secret) (*dkimRecord, error) {
	rec := &dkimRecord{name: policy.DKIMRecordName(k.Spec.Selector, k.Spec.Domain)}
	key := types.NamespacedName{Namespace: k.Namespace, Name: policy.DKIMSecretName(k)}
	s, err := r.secret(ctx, key, created)
	if err != nil {
		return nil, err
	}
	if s == nil {
		bits := 0
		if k.Spec.RSAKeyBits != nil {
			bits = int(*k.Spec.RSAKeyBits)
		}
		pem, err := policy.GenerateDKIMKey(k.Spec.Algorithm, bits)
		if err != nil {
			return nil, fmt.Errorf("DKIMKey %s/%s: generate a key: %w", k.Namespace, k.Name, err)
		}
		s = &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: key.Name, Namespace: key.Namespace,
				Labels:      map[string]string{labelManagedBy: managedByJetmail},
				Annotations: map[string]string{annotationDKIMKey: k.Name}},
			Type: corev1.SecretTypeOpaque,
			Data: map[string][]byte{v1alpha1.DKIMKeySecretKey: pem},
		}
		switch err := r.Client.Create(ctx, s); {
		case apierrors.IsAlreadyExists(err):
			// Made since the cache was read: the next event brings it.
			return rec, nil
		case err != nil:
			return nil, fmt.Errorf("DKIMKey %s/%s: create Secret %s: %w", k.Namespace, k.Name, key.Name, err)
		}
		created[key] = s
		log.FromContext(ctx).Info("DKIM key generated", "dkimKey", k.Namespace+"/"+k.Name, "secret", key.Name,
			"algorithm", k.Spec.Algorithm, "record", rec.name)
		if r.Recorder != nil {
			r.Recorder.Eventf(k, nil, corev1.EventTypeNormal, dkimSecretCreateOK, "Generate",
				"generated a private key into Secret %s; publish the TXT record %s shown in the status", key.Name, rec.name)
		}
	}
	if signer, err := policy.ParseDKIMKey(s.Data[v1alpha1.DKIMKeySecretKey]); err == nil {
		rec.value, _ = policy.DKIMRecord(signer)
	}
	return rec, nil
}

// secret reads a Secret from the cache, or from created when this reconcile
// made it; nil when it does not exist.
func (r *ConfigReconciler) secret(ctx context.Context, key types.NamespacedName, created map[types.NamespacedName]*corev1.Secret) (*corev1.Secret, error) {
	if s, ok := created[key]; ok {
		return s, nil
	}
	var s corev1.Secret
	if err := r.Client.Get(ctx, key, &s); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, nil
		}
		return nil, err
	}
	return &s, nil
}
