package policy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	corev1 "k8s.io/api/core/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
)

// Where configuration snapshots travel from the controller to the data
// plane, and where pods report the revision they run.
const (
	// ConfigBucket holds the current snapshot under SnapshotKey; the KV
	// revision of that key is the configuration revision.
	ConfigBucket = "JETMAIL_CONFIG"
	SnapshotKey  = "snapshot"
	// PodsBucket holds one heartbeat per running gateway or deliverer; an
	// entry older than PodTTL means the pod is gone.
	PodsBucket = "JETMAIL_PODS"
	PodTTL     = 30 * time.Second
)

// Snapshot is one complete configuration as the controller accepted it:
// the objects themselves (every pod compiles them with this package, the
// same code as `serve -f`) and the Secret keys they reference.
type Snapshot struct {
	RelayPolicies    []v1alpha1.RelayPolicy    `json:"relayPolicies,omitempty"`
	MailRoutes       []v1alpha1.MailRoute      `json:"mailRoutes,omitempty"`
	DeliveryPolicies []v1alpha1.DeliveryPolicy `json:"deliveryPolicies,omitempty"`
	DKIMKeys         []v1alpha1.DKIMKey        `json:"dkimKeys,omitempty"`
	Secrets          []corev1.Secret           `json:"secrets,omitempty"`
}

// Objects returns the snapshot as a set of objects to compile.
func (s *Snapshot) Objects() *Objects {
	return &Objects{RelayPolicies: s.RelayPolicies, MailRoutes: s.MailRoutes,
		DeliveryPolicies: s.DeliveryPolicies, DKIMKeys: s.DKIMKeys, Secrets: s.Secrets}
}

// Compile compiles the snapshot as the cluster runs it: a snapshot comes
// from the API server, so no field of it may make a pod read a file.
func (s *Snapshot) Compile() (*Config, error) { return s.Objects().Compile(CompileOptions{}) }

// PodStatus is a pod's heartbeat.
type PodStatus struct {
	Pod      string    `json:"pod"`
	Role     string    `json:"role"`
	Revision uint64    `json:"revision"`
	Time     time.Time `json:"time"`
}

// Store is the snapshot bucket and the heartbeat bucket.
type Store struct {
	cfg  jetstream.KeyValue
	pods jetstream.KeyValue
}

// OpenStore creates or opens the buckets.
func OpenStore(ctx context.Context, js jetstream.JetStream, replicas int) (*Store, error) {
	cfg, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: ConfigBucket, Description: "jetmail configuration snapshots", History: 5,
		Storage: jetstream.FileStorage, Replicas: replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("policy: bucket %s: %w", ConfigBucket, err)
	}
	pods, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: PodsBucket, Description: "jetmail pods and the configuration revision they run", History: 1,
		TTL: 2 * PodTTL, Storage: jetstream.FileStorage, Replicas: replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("policy: bucket %s: %w", PodsBucket, err)
	}
	return &Store{cfg: cfg, pods: pods}, nil
}

// Current returns the snapshot in force and its revision; nil and 0 when
// none was ever published.
func (st *Store) Current(ctx context.Context) (*Snapshot, uint64, error) {
	e, err := st.cfg.Get(ctx, SnapshotKey)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, err
	}
	var s Snapshot
	if err := json.Unmarshal(e.Value(), &s); err != nil {
		return nil, 0, fmt.Errorf("policy: decode snapshot revision %d: %w", e.Revision(), err)
	}
	return &s, e.Revision(), nil
}

// Publish stores s if it differs from the current snapshot, and returns the
// revision in force afterwards and whether it changed.
func (st *Store) Publish(ctx context.Context, s *Snapshot) (uint64, bool, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return 0, false, err
	}
	e, err := st.cfg.Get(ctx, SnapshotKey)
	switch {
	case err == nil && bytes.Equal(e.Value(), b):
		return e.Revision(), false, nil
	case err != nil && !errors.Is(err, jetstream.ErrKeyNotFound):
		return 0, false, err
	}
	rev, err := st.cfg.Put(ctx, SnapshotKey, b)
	if err != nil {
		return 0, false, err
	}
	return rev, true, nil
}

// Watch calls fn with every snapshot published from now on, starting with
// the current one, until ctx ends. A snapshot that does not compile (a
// newer controller, say) is reported to onError and skipped: the last good
// configuration stays in force.
func (st *Store) Watch(ctx context.Context, fn func(*Config, uint64), onError func(uint64, error)) error {
	w, err := st.cfg.Watch(ctx, SnapshotKey)
	if err != nil {
		return err
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return nil
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue // end of initial values, or a delete
			}
			var s Snapshot
			if err := json.Unmarshal(e.Value(), &s); err != nil {
				onError(e.Revision(), err)
				continue
			}
			cfg, err := s.Compile()
			if err != nil {
				onError(e.Revision(), err)
				continue
			}
			fn(cfg, e.Revision())
		}
	}
}

// Heartbeat records that pod runs revision.
func (st *Store) Heartbeat(ctx context.Context, pod, role string, revision uint64) error {
	b, _ := json.Marshal(PodStatus{Pod: pod, Role: role, Revision: revision, Time: time.Now().UTC()})
	_, err := st.pods.Put(ctx, pod, b)
	return err
}

// Pods returns the pods that reported within PodTTL, sorted by name.
func (st *Store) Pods(ctx context.Context) ([]PodStatus, error) {
	lister, err := st.pods.ListKeys(ctx)
	if err != nil {
		return nil, err
	}
	var out []PodStatus
	for k := range lister.Keys() {
		e, err := st.pods.Get(ctx, k)
		if err != nil {
			continue
		}
		var p PodStatus
		if json.Unmarshal(e.Value(), &p) != nil || time.Since(p.Time) > PodTTL {
			continue
		}
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Pod < out[j].Pod })
	return out, nil
}
