package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// jetmailDeployment is what the chart makes of one component of a release,
// reduced to what the plugin reads: labels and arguments.
func jetmailDeployment(release, component, natsURL string) *appsv1.Deployment {
	labels := map[string]string{"app.kubernetes.io/name": "jetmail", "app.kubernetes.io/instance": release, "app.kubernetes.io/component": component}
	sel := map[string]string{"app.kubernetes.io/instance": release, "app.kubernetes.io/component": component}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: release + "-jetmail-" + component, Labels: labels},
		Spec: appsv1.DeploymentSpec{
			Selector: &metav1.LabelSelector{MatchLabels: sel},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: sel},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name: component, Image: "jetmail:test",
					Args: []string{component, "--nats-url=" + natsURL, "--replicas=3"},
				}}},
			},
		},
	}
}

// TestKubectlPlugin runs `kubectl jetmail queue ...` through the real
// kubectl, with the binary linked as kubectl-jetmail on the PATH, against a
// real API server (envtest) holding a release's Deployments, and a real
// NATS with a queue.
func TestKubectlPlugin(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set; run the tests with hack/test.sh (it builds kube-apiserver and etcd)")
	}
	// hack/envtest.sh puts kubectl beside kube-apiserver (building it
	// when the machine has none).
	kubectl := filepath.Join(os.Getenv("KUBEBUILDER_ASSETS"), "kubectl")
	if _, err := os.Stat(kubectl); err != nil {
		t.Fatalf("kubectl: %v (hack/envtest.sh provides it)", err)
	}
	env := &envtest.Environment{}
	if _, err := env.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	admin, err := env.AddUser(envtest.User{Name: "admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := admin.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(admin.Config())
	if err != nil {
		t.Fatal(err)
	}

	f := newQueueOfFour(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, ns := range []string{"mail", "two", "empty"} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []struct {
		ns string
		d  *appsv1.Deployment
	}{
		{"mail", jetmailDeployment("jm", "gateway", f.url)},
		{"mail", jetmailDeployment("jm", "deliverer", f.url)},
		{"two", jetmailDeployment("a", "deliverer", f.url)},
		{"two", jetmailDeployment("b", "deliverer", "nats://127.0.0.1:1")},
	} {
		if _, err := cs.AppsV1().Deployments(d.ns).Create(ctx, d.d, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	bin := buildJetmail(t)
	pathDir := filepath.Join(dir, "bin")
	if err := os.Mkdir(pathDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(bin, filepath.Join(pathDir, pluginBinary)); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, kubectl, append([]string{"jetmail"}, args...)...)
		cmd.Env = append(os.Environ(), "PATH="+pathDir+string(os.PathListSeparator)+os.Getenv("PATH"), "KUBECONFIG="+kubeconfig)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		return out.String(), err
	}

	// The release's NATS, found from its Deployments.
	out, err := run("queue", "stat", "-n", "mail")
	if err != nil || !strings.Contains(out, "messages  4") {
		t.Fatalf("kubectl jetmail queue stat -n mail: %v\n%s", err, out)
	}
	out, err = run("queue", "ls", "-n", "mail", "--state", "deferred", "-o", "json")
	if err != nil || strings.Count(out, "\n") != 2 || !strings.Contains(out, f.deferred.QueueID) {
		t.Fatalf("kubectl jetmail queue ls: %v\n%s", err, out)
	}
	// Several releases: one must be chosen.
	out, err = run("queue", "stat", "-n", "two")
	if err == nil || !strings.Contains(out, "several jetmail releases (a, b): choose one with --release") {
		t.Fatalf("two releases: %v\n%s", err, out)
	}
	if out, err = run("queue", "stat", "-n", "two", "--release", "a"); err != nil || !strings.Contains(out, "messages  4") {
		t.Fatalf("--release a: %v\n%s", err, out)
	}
	// A URL that does not answer says where it came from and what to do.
	out, err = run("queue", "stat", "-n", "two", "--release", "b", "--timeout", "2s")
	if err == nil || !strings.Contains(out, "Deployment two/b-jetmail-deliverer") || !strings.Contains(out, "kubectl port-forward") {
		t.Fatalf("--release b (NATS down): %v\n%s", err, out)
	}
	out, err = run("queue", "stat", "-n", "empty")
	if err == nil || !strings.Contains(out, "no jetmail release in namespace empty") {
		t.Fatalf("no release: %v\n%s", err, out)
	}
	// --nats-url wins over the release.
	if out, err = run("queue", "stat", "-n", "empty", "--nats-url", f.url); err != nil || !strings.Contains(out, "messages  4") {
		t.Fatalf("--nats-url: %v\n%s", err, out)
	}
}
