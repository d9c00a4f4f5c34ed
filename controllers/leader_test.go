package controllers

import (
	"context"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/jetmail/jetmail/api/v1alpha1"
)

// Two controller replicas: one holds the Lease and reconciles, the other
// waits; when the leader stops, the other takes over at once (the Lease is
// released, not left to run out) and carries on from the configuration in
// force, keeping an accepted generation in force against a broken update.
func TestTwoReplicasElectOneLeaderAndHandOver(t *testing.T) {
	w := newBareWorld(t)
	// Long enough that a follower never takes the Lease by timeout during
	// the test: a handover within it proves the leader released it.
	election := ManagerOptions{LeaderElect: true, LeaseDuration: 60 * time.Second,
		RenewDeadline: 40 * time.Second, RetryPeriod: 200 * time.Millisecond}
	type replica struct {
		name string
		mgr  ctrl.Manager
		stop func()
	}
	var rs [2]replica
	for i, name := range []string{"a", "b"} {
		mgr, stop := w.startManager(election)
		rs[i] = replica{name, mgr, stop}
	}
	var leader, follower replica
	select {
	case <-rs[0].mgr.Elected():
		leader, follower = rs[0], rs[1]
	case <-rs[1].mgr.Elected():
		leader, follower = rs[1], rs[0]
	case <-time.After(30 * time.Second):
		t.Fatal("no replica was elected within 30s")
	}
	select {
	case <-follower.mgr.Elected():
		t.Fatalf("both replicas %s and %s are leaders", leader.name, follower.name)
	case <-time.After(2 * time.Second):
	}
	holder := func() string {
		var l coordinationv1.Lease
		if err := w.c.Get(context.Background(), types.NamespacedName{Namespace: w.ns, Name: LeaderElectionID}, &l); err != nil {
			t.Fatalf("the Lease %s/%s: %v", w.ns, LeaderElectionID, err)
		}
		if l.Spec.HolderIdentity == nil {
			return ""
		}
		return *l.Spec.HolderIdentity
	}
	first := holder()
	if first == "" {
		t.Fatal("the leader holds no Lease")
	}

	rp := &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "site"},
		Spec: v1alpha1.RelayPolicySpec{RelayNetworks: []string{"127.0.0.0/8"}}}
	w.create(rp)
	accepted := func(gen int64) func() bool {
		return func() bool {
			a, _, st := w.conditions(rp)
			return a != nil && a.Status == metav1.ConditionTrue && st.ObservedGeneration == gen
		}
	}
	eventually(t, 10*time.Second, "the leader to accept the policy", accepted(rp.Generation))
	_, _, st := w.conditions(rp)
	rev := st.Revision

	start := time.Now()
	leader.stop()
	select {
	case <-follower.mgr.Elected():
		t.Logf("replica %s took over %s after the leader stopped", follower.name, time.Since(start).Round(time.Millisecond))
	case <-time.After(20 * time.Second):
		t.Fatal("the follower was not elected within 20s of the leader stopping (the Lease lasts 60s)")
	}
	if h := holder(); h == "" || h == first {
		t.Errorf("Lease holder %q after the handover (was %q)", h, first)
	}

	// The new leader starts with no memory of its own: it must keep the
	// generation accepted under the old one in force.
	if err := w.c.Get(context.Background(), client.ObjectKeyFromObject(rp), rp); err != nil {
		t.Fatal(err)
	}
	rp.Spec.Auth = &v1alpha1.RelayAuth{UsersSecretRef: &v1alpha1.SecretKeyRef{Name: "missing", Key: "users"}}
	if err := w.c.Update(context.Background(), rp); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the new leader to reject the broken update", func() bool {
		a, _, st := w.conditions(rp)
		return a != nil && a.Status == metav1.ConditionFalse && st.ObservedGeneration == rp.Generation
	})
	snap, got, err := w.store.Current(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got != rev || len(snap.RelayPolicies) != 1 || snap.RelayPolicies[0].Spec.Auth != nil {
		t.Errorf("configuration in force after the broken update: revision %d (was %d), %+v", got, rev, snap.RelayPolicies)
	}

	// And it reconciles what comes next.
	if err := w.c.Get(context.Background(), client.ObjectKeyFromObject(rp), rp); err != nil {
		t.Fatal(err)
	}
	rp.Spec.Auth = nil
	rp.Spec.RelayNetworks = append(rp.Spec.RelayNetworks, "192.0.2.0/24")
	if err := w.c.Update(context.Background(), rp); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the new leader to accept the fix", accepted(rp.Generation))
	snap, got, _ = w.store.Current(context.Background())
	if got <= rev || len(snap.RelayPolicies) != 1 || len(snap.RelayPolicies[0].Spec.RelayNetworks) != 2 {
		t.Errorf("configuration after the fix: revision %d (was %d), %+v", got, rev, snap.RelayPolicies)
	}
}
