package controllers

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// The package's tests share one real kube-apiserver and etcd (envtest),
// built from the Go module proxy by hack/envtest.sh; hack/test.sh points
// KUBEBUILDER_ASSETS at them.
var (
	restConfig *rest.Config
	scheme     = runtime.NewScheme()
)

func TestMain(m *testing.M) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Println("controllers: KUBEBUILDER_ASSETS is not set; run the tests with hack/test.sh (it builds kube-apiserver and etcd)")
		os.Exit(1)
	}
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		panic(err)
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		panic(err)
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		fmt.Println("starting envtest:", err)
		os.Exit(1)
	}
	restConfig = cfg
	code := m.Run()
	_ = env.Stop()
	os.Exit(code)
}

// world is one test's control plane and NATS: a namespace of its own, a
// running reconciler, and the snapshot store.
type world struct {
	t     *testing.T
	ns    string
	c     client.Client
	store *policy.Store
	js    jetstream.JetStream
	sp    *spool.Spool
	nc    *nats.Conn
}

var nsCounter int

// newWorld is a world with one reconciler running, without leader
// election.
func newWorld(t *testing.T) *world {
	t.Helper()
	w := newBareWorld(t)
	w.startManager(ManagerOptions{})
	return w
}

// newBareWorld is a world with nothing reconciling yet.
func newBareWorld(t *testing.T) *world {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	ns := natstest.Start(t, natstest.Options{})
	nc := natstest.Connect(t, ns, spool.NATSOptions()...)
	t.Cleanup(nc.Close)
	sp, err := spool.Open(ctx, nc, spool.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	store, err := policy.OpenStore(ctx, sp.JetStream(), 1)
	if err != nil {
		t.Fatal(err)
	}

	nsCounter++
	name := fmt.Sprintf("jetmail-%d-%d", os.Getpid()%10000, nsCounter)
	c, err := client.New(restConfig, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, ns: name, c: c, store: store, js: sp.JetStream(), sp: sp, nc: nc}
	w.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}})
	return w
}

// startManager runs a manager as `jetmail controller` builds it, on the
// world's namespace and store, with o's election settings, until the test
// ends or stop is called; stop waits for it to return.
func (w *world) startManager(o ManagerOptions) (mgr ctrl.Manager, stop func()) {
	w.t.Helper()
	o.Namespace, o.MetricsAddr, o.ProbeAddr = w.ns, "0", "0"
	o.ReadyPoll, o.SkipNameValidation = 200*time.Millisecond, true
	mgr, err := NewManager(restConfig, w.store, o)
	if err != nil {
		w.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := mgr.Start(ctx); err != nil {
			w.t.Errorf("manager: %v", err)
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	w.t.Cleanup(stop)
	return mgr, stop
}

// create creates obj (in the test's namespace unless it is cluster-scoped).
func (w *world) create(obj client.Object) {
	w.t.Helper()
	if _, isNS := obj.(*corev1.Namespace); !isNS && obj.GetNamespace() == "" {
		obj.SetNamespace(w.ns)
	}
	if err := w.c.Create(context.Background(), obj); err != nil {
		w.t.Fatalf("create %T %s: %v", obj, obj.GetName(), err)
	}
}

// conditions reads an object's Accepted and Ready conditions.
func (w *world) conditions(obj client.Object) (accepted, ready *metav1.Condition, st *v1alpha1.ConfigStatus) {
	w.t.Helper()
	if err := w.c.Get(context.Background(), client.ObjectKeyFromObject(obj), obj); err != nil {
		w.t.Fatalf("get %s: %v", obj.GetName(), err)
	}
	switch o := obj.(type) {
	case *v1alpha1.RelayPolicy:
		st = &o.Status
	case *v1alpha1.MailRoute:
		st = &o.Status
	case *v1alpha1.DeliveryPolicy:
		st = &o.Status
	case *v1alpha1.DKIMKey:
		st = &o.Status.ConfigStatus
	}
	return meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionAccepted),
		meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionReady), st
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
