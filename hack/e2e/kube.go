//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/jetmail/jetmail/controllers"
)

// kube is the envtest control plane (kube-apiserver and etcd, built by
// hack/envtest.sh), a kubeconfig for it, and kubectl.
type kube struct {
	w          *world
	env        *envtest.Environment
	kubeconfig string
	kubectlBin string
}

// startKube starts the API server with jetmail's CRDs installed, and
// writes a kubeconfig of a cluster admin for kubectl and the controllers.
func startKube(w *world, repo string) *kube {
	t := w.t
	t.Helper()
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(repo, "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		// Two shared cores, with NATS and jetmail starting beside it.
		ControlPlaneStartTimeout: 2 * time.Minute,
		ControlPlaneStopTimeout:  time.Minute,
	}
	if _, err := env.Start(); err != nil {
		t.Fatalf("starting envtest (KUBEBUILDER_ASSETS=%s): %v", assets, err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	user, err := env.AddUser(envtest.User{Name: "e2e-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := user.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	k := &kube{w: w, env: env, kubeconfig: filepath.Join(w.dir, "kubeconfig")}
	if err := os.WriteFile(k.kubeconfig, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{filepath.Join(assets, "kubectl"), "/usr/bin/kubectl"} {
		if _, err := os.Stat(c); err == nil {
			k.kubectlBin = c
			break
		}
	}
	if k.kubectlBin == "" {
		t.Fatalf("no kubectl in %s or /usr/bin", assets)
	}
	return k
}

// kubectl runs kubectl against the test's API server, with stdin if not
// nil, bounded in time, and returns its standard output.
func (k *kube) kubectl(stdin []byte, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, k.kubectlBin, append([]string{"--kubeconfig", k.kubeconfig}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

// apply is kubectl apply -f - with the given YAML.
func (k *kube) apply(yaml string) error {
	_, err := k.kubectl([]byte(yaml), "apply", "-f", "-")
	return err
}

// leaseHolder is the identity holding the controllers' Lease, "" if none.
func (k *kube) leaseHolder(namespace string) (string, error) {
	out, err := k.kubectl(nil, "-n", namespace, "get", "lease", controllers.LeaderElectionID, "-o", "json")
	if err != nil {
		return "", err
	}
	var l struct {
		Spec struct {
			HolderIdentity string `json:"holderIdentity"`
		} `json:"spec"`
	}
	if err := json.Unmarshal(out, &l); err != nil {
		return "", err
	}
	return l.Spec.HolderIdentity, nil
}

// objectStatus is what `kubectl get` says about one jetmail object.
type objectStatus struct {
	Generation         int64
	ObservedGeneration int64
	Revision           uint64
	Accepted, Ready    string // condition statuses: True, False, Unknown or ""
	Message            string // of a condition that is not True
}

func (k *kube) status(namespace, kind, name string) (objectStatus, error) {
	out, err := k.kubectl(nil, "-n", namespace, "get", kind, name, "-o", "json")
	if err != nil {
		return objectStatus{}, err
	}
	var o struct {
		Metadata struct {
			Generation int64 `json:"generation"`
		} `json:"metadata"`
		Status struct {
			ObservedGeneration int64  `json:"observedGeneration"`
			Revision           uint64 `json:"revision"`
			Conditions         []struct {
				Type, Status, Message string
				ObservedGeneration    int64 `json:"observedGeneration"`
			} `json:"conditions"`
		} `json:"status"`
	}
	if err := json.Unmarshal(out, &o); err != nil {
		return objectStatus{}, err
	}
	s := objectStatus{Generation: o.Metadata.Generation, ObservedGeneration: o.Status.ObservedGeneration, Revision: o.Status.Revision}
	for _, c := range o.Status.Conditions {
		switch c.Type {
		case "Accepted":
			s.Accepted = c.Status
		case "Ready":
			s.Ready = c.Status
		}
		if c.Status != "True" && c.Message != "" {
			s.Message = c.Type + ": " + c.Message
		}
	}
	return s, nil
}
