package controllers

import (
	"context"
	"fmt"
	"sort"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/policy"
)

// +kubebuilder:rbac:groups=mail.jetmail.io,resources=relaypolicies;mailroutes;deliverypolicies;dkimkeys,verbs=get;list;watch
// +kubebuilder:rbac:groups=mail.jetmail.io,resources=relaypolicies/status;mailroutes/status;deliverypolicies/status;dkimkeys/status,verbs=get;update;patch
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get;list;watch;create
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch
// +kubebuilder:rbac:groups=coordination.k8s.io,resources=leases,verbs=get;list;watch;create;update;patch;delete

// ConfigReconciler compiles all jetmail objects into one snapshot.
type ConfigReconciler struct {
	Client   client.Client
	Store    *policy.Store
	Recorder events.EventRecorder
	// Namespace limits the objects considered; "" means all namespaces.
	Namespace string
	// ReadyPoll is how often Ready is re-checked while pods catch up.
	// Default 2s.
	ReadyPoll time.Duration

	// accepted remembers, per object UID, the last generation that was
	// accepted, so a broken update keeps the good one in force.
	accepted map[types.UID]client.Object
}

// configKey is the one request every event maps to: the configuration is
// compiled as a whole.
var configKey = reconcile.Request{NamespacedName: types.NamespacedName{Name: "jetmail-config"}}

// SetupWithManager registers the reconciler.
func (r *ConfigReconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.ReadyPoll == 0 {
		r.ReadyPoll = 2 * time.Second
	}
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{configKey}
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("jetmail-config").
		Watches(&v1alpha1.RelayPolicy{}, all).
		Watches(&v1alpha1.MailRoute{}, all).
		Watches(&v1alpha1.DeliveryPolicy{}, all).
		Watches(&v1alpha1.DKIMKey{}, all).
		Watches(&corev1.Secret{}, all).
		Complete(r)
}

// item is one object taking part in the compilation.
type item struct {
	obj    client.Object
	status *v1alpha1.ConfigStatus
	kind   string
	// dkim is set for a DKIMKey: its DNS record, from the key in its
	// Secret ("" when there is none that parses).
	dkim *dkimRecord
}

// Reconcile compiles every object, publishes the snapshot when it changed
// and writes each object's conditions.
func (r *ConfigReconciler) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	logger := log.FromContext(ctx)
	if r.accepted == nil {
		if err := r.loadAccepted(ctx); err != nil {
			return reconcile.Result{}, err
		}
	}
	items, err := r.list(ctx)
	if err != nil {
		return reconcile.Result{}, err
	}
	created := map[types.NamespacedName]*corev1.Secret{}
	for i := range items {
		if k, ok := items[i].obj.(*v1alpha1.DKIMKey); ok {
			if items[i].dkim, err = r.ensureDKIMSecret(ctx, k, created); err != nil {
				return reconcile.Result{}, err
			}
		}
	}
	snap := &policy.Snapshot{}
	rejected := map[types.UID]error{}
	for _, it := range items {
		trial := cloneSnapshot(snap)
		if err := r.add(ctx, trial, it.obj, created); err == nil {
			if _, err = trial.Compile(); err == nil {
				snap = trial
				r.accepted[it.obj.GetUID()] = it.obj.DeepCopyObject().(client.Object)
				continue
			}
			rejected[it.obj.GetUID()] = err
		} else {
			rejected[it.obj.GetUID()] = err
		}
		// Keep the last accepted generation in force, if any and if it
		// still fits.
		if prev, ok := r.accepted[it.obj.GetUID()]; ok {
			trial := cloneSnapshot(snap)
			if r.add(ctx, trial, prev, created) == nil {
				if _, err := trial.Compile(); err == nil {
					snap = trial
				}
			}
		}
	}
	rev, changed, err := r.Store.Publish(ctx, snap)
	if err != nil {
		return reconcile.Result{}, fmt.Errorf("publish configuration: %w", err)
	}
	if changed {
		logger.Info("configuration published", "revision", rev, "relayPolicies", len(snap.RelayPolicies),
			"mailRoutes", len(snap.MailRoutes), "deliveryPolicies", len(snap.DeliveryPolicies), "dkimKeys", len(snap.DKIMKeys))
	}
	pods, err := r.Store.Pods(ctx)
	if err != nil {
		return reconcile.Result{}, fmt.Errorf("read pod heartbeats: %w", err)
	}
	allReady := true
	for _, it := range items {
		ready, err := r.writeStatus(ctx, it, rejected[it.obj.GetUID()], rev, pods)
		if err != nil {
			return reconcile.Result{}, err
		}
		allReady = allReady && ready
	}
	if !allReady {
		return reconcile.Result{RequeueAfter: r.ReadyPoll}, nil
	}
	// Pods come and go; look again now and then.
	return reconcile.Result{RequeueAfter: 30 * time.Second}, nil
}

// loadAccepted seeds the memory of accepted objects from the snapshot in
// force, so a restarted (or newly elected) controller keeps honouring it.
func (r *ConfigReconciler) loadAccepted(ctx context.Context) error {
	snap, _, err := r.Store.Current(ctx)
	if err != nil {
		return fmt.Errorf("read the configuration in force: %w", err)
	}
	r.accepted = map[types.UID]client.Object{}
	if snap == nil {
		return nil
	}
	for i := range snap.RelayPolicies {
		r.accepted[snap.RelayPolicies[i].UID] = &snap.RelayPolicies[i]
	}
	for i := range snap.MailRoutes {
		r.accepted[snap.MailRoutes[i].UID] = &snap.MailRoutes[i]
	}
	for i := range snap.DeliveryPolicies {
		r.accepted[snap.DeliveryPolicies[i].UID] = &snap.DeliveryPolicies[i]
	}
	for i := range snap.DKIMKeys {
		r.accepted[snap.DKIMKeys[i].UID] = &snap.DKIMKeys[i]
	}
	return nil
}

// list returns every object in admission order: objects already in force
// first, then the oldest first, then by kind, namespace and name, so a
// newcomer that clashes with what runs is the one rejected.
func (r *ConfigReconciler) list(ctx context.Context) ([]item, error) {
	var opts []client.ListOption
	if r.Namespace != "" {
		opts = append(opts, client.InNamespace(r.Namespace))
	}
	var items []item
	var rps v1alpha1.RelayPolicyList
	if err := r.Client.List(ctx, &rps, opts...); err != nil {
		return nil, err
	}
	for i := range rps.Items {
		o := &rps.Items[i]
		items = append(items, item{obj: o, status: &o.Status, kind: "RelayPolicy"})
	}
	var mrs v1alpha1.MailRouteList
	if err := r.Client.List(ctx, &mrs, opts...); err != nil {
		return nil, err
	}
	for i := range mrs.Items {
		o := &mrs.Items[i]
		items = append(items, item{obj: o, status: &o.Status, kind: "MailRoute"})
	}
	var dps v1alpha1.DeliveryPolicyList
	if err := r.Client.List(ctx, &dps, opts...); err != nil {
		return nil, err
	}
	for i := range dps.Items {
		o := &dps.Items[i]
		items = append(items, item{obj: o, status: &o.Status, kind: "DeliveryPolicy"})
	}
	var dks v1alpha1.DKIMKeyList
	if err := r.Client.List(ctx, &dks, opts...); err != nil {
		return nil, err
	}
	for i := range dks.Items {
		o := &dks.Items[i]
		items = append(items, item{obj: o, status: &o.Status.ConfigStatus, kind: "DKIMKey"})
	}
	sort.SliceStable(items, func(i, j int) bool {
		a, b := items[i].obj, items[j].obj
		_, ina := r.accepted[a.GetUID()]
		_, inb := r.accepted[b.GetUID()]
		if ina != inb {
			return ina
		}
		ta, tb := a.GetCreationTimestamp(), b.GetCreationTimestamp()
		if !ta.Equal(&tb) {
			return ta.Before(&tb)
		}
		if items[i].kind != items[j].kind {
			return items[i].kind < items[j].kind
		}
		if a.GetNamespace() != b.GetNamespace() {
			return a.GetNamespace() < b.GetNamespace()
		}
		return a.GetName() < b.GetName()
	})
	return items, nil
}

// add puts obj (and the Secrets it references) into snap. created holds the
// Secrets this reconcile made, which the cache may not show yet.
func (r *ConfigReconciler) add(ctx context.Context, snap *policy.Snapshot, obj client.Object, created map[types.NamespacedName]*corev1.Secret) error {
	var refs []string
	switch o := obj.(type) {
	case *v1alpha1.RelayPolicy:
		c := o.DeepCopy()
		c.Status, c.ObjectMeta = v1alpha1.ConfigStatus{}, snapshotMeta(o.ObjectMeta)
		snap.RelayPolicies = append(snap.RelayPolicies, *c)
		if a := o.Spec.Auth; a != nil && a.UsersSecretRef != nil {
			refs = append(refs, a.UsersSecretRef.Name)
		}
	case *v1alpha1.MailRoute:
		c := o.DeepCopy()
		c.Status, c.ObjectMeta = v1alpha1.ConfigStatus{}, snapshotMeta(o.ObjectMeta)
		snap.MailRoutes = append(snap.MailRoutes, *c)
		if a := o.Spec.Auth; a != nil && a.SecretRef != nil {
			refs = append(refs, a.SecretRef.Name)
		}
	case *v1alpha1.DeliveryPolicy:
		c := o.DeepCopy()
		c.Status, c.ObjectMeta = v1alpha1.ConfigStatus{}, snapshotMeta(o.ObjectMeta)
		snap.DeliveryPolicies = append(snap.DeliveryPolicies, *c)
	case *v1alpha1.DKIMKey:
		c := o.DeepCopy()
		c.Status, c.ObjectMeta = v1alpha1.DKIMKeyStatus{}, snapshotMeta(o.ObjectMeta)
		snap.DKIMKeys = append(snap.DKIMKeys, *c)
		refs = append(refs, policy.DKIMSecretName(o))
	}
	for _, name := range refs {
		key := types.NamespacedName{Namespace: obj.GetNamespace(), Name: name}
		if hasSecret(snap, key) {
			continue
		}
		s, err := r.secret(ctx, key, created)
		if err != nil {
			return err
		}
		if s == nil {
			continue // the compiler names the object and field
		}
		snap.Secrets = append(snap.Secrets, corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace},
			Data:       s.Data,
		})
	}
	return nil
}

// snapshotMeta keeps what identifies an object and its generation, and
// drops what changes on every status write (resourceVersion, managed
// fields), so an unchanged configuration publishes no new revision.
func snapshotMeta(m metav1.ObjectMeta) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: m.Name, Namespace: m.Namespace, UID: m.UID, Generation: m.Generation}
}

func hasSecret(snap *policy.Snapshot, key types.NamespacedName) bool {
	for _, s := range snap.Secrets {
		if s.Name == key.Name && s.Namespace == key.Namespace {
			return true
		}
	}
	return false
}

func cloneSnapshot(s *policy.Snapshot) *policy.Snapshot {
	return &policy.Snapshot{
		RelayPolicies:    append([]v1alpha1.RelayPolicy(nil), s.RelayPolicies...),
		MailRoutes:       append([]v1alpha1.MailRoute(nil), s.MailRoutes...),
		DeliveryPolicies: append([]v1alpha1.DeliveryPolicy(nil), s.DeliveryPolicies...),
		DKIMKeys:         append([]v1alpha1.DKIMKey(nil), s.DKIMKeys...),
		Secrets:          append([]corev1.Secret(nil), s.Secrets...),
	}
}

// writeStatus sets Accepted and Ready on one object, writing only when
// something changed. It reports whether the object is Ready.
func (r *ConfigReconciler) writeStatus(ctx context.Context, it item, rejectErr error, rev uint64, pods []policy.PodStatus) (bool, error) {
	obj := it.obj
	gen := obj.GetGeneration()
	before := it.status.DeepCopy()
	st := it.status
	st.ObservedGeneration = gen
	ready := false
	if rejectErr != nil {
		msg := rejectErr.Error()
		if _, ok := r.accepted[obj.GetUID()]; ok {
			msg += "; the last accepted generation stays in force"
		}
		if changed := meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionAccepted,
			Status: metav1.ConditionFalse, Reason: "Invalid", Message: msg, ObservedGeneration: gen}); changed && r.Recorder != nil {
			r.Recorder.Eventf(obj, nil, corev1.EventTypeWarning, "Rejected", "Compile", "%s", msg)
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionReady,
			Status: metav1.ConditionFalse, Reason: "NotAccepted", Message: "this generation is not in force", ObservedGeneration: gen})
	} else {
		if st.Revision == 0 || before.ObservedGeneration != gen || !meta.IsStatusConditionTrue(before.Conditions, v1alpha1.ConditionAccepted) {
			st.Revision = rev
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionAccepted,
			Status: metav1.ConditionTrue, Reason: "Valid", Message: fmt.Sprintf("part of configuration revision %d", st.Revision), ObservedGeneration: gen})
		ready = true
		behind := 0
		for _, p := range pods {
			if p.Revision < st.Revision {
				behind++
			}
		}
		switch {
		case len(pods) == 0:
			ready = false
			meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionReady,
				Status: metav1.ConditionFalse, Reason: "NoDataPlane", Message: "no gateway or deliverer is reporting", ObservedGeneration: gen})
		case behind > 0:
			ready = false
			meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionReady,
				Status: metav1.ConditionFalse, Reason: "Rolling", Message: fmt.Sprintf("%d of %d pods still run an older revision", behind, len(pods)), ObservedGeneration: gen})
		default:
			meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionReady,
				Status: metav1.ConditionTrue, Reason: "InForce", Message: fmt.Sprintf("all %d pods run revision %d or later", len(pods), st.Revision), ObservedGeneration: gen})
		}
	}
	dkimChanged := false
	if k, ok := obj.(*v1alpha1.DKIMKey); ok && it.dkim != nil {
		dkimChanged = k.Status.DNSName != it.dkim.name || k.Status.DNSRecord != it.dkim.value
		k.Status.DNSName, k.Status.DNSRecord = it.dkim.name, it.dkim.value
	}
	if statusEqual(before, st) && !dkimChanged {
		return ready, nil
	}
	if err := r.Client.Status().Update(ctx, obj); err != nil {
		if apierrors.IsConflict(err) {
			return ready, nil // a newer version is on its way to us
		}
		return ready, err
	}
	return ready, nil
}

func statusEqual(a, b *v1alpha1.ConfigStatus) bool {
	if a.ObservedGeneration != b.ObservedGeneration || a.Revision != b.Revision || len(a.Conditions) != len(b.Conditions) {
		return false
	}
	for _, c := range a.Conditions {
		d := meta.FindStatusCondition(b.Conditions, c.Type)
		if d == nil || d.Status != c.Status || d.Reason != c.Reason || d.Message != c.Message || d.ObservedGeneration != c.ObservedGeneration {
			return false
		}
	}
	return true
}
