// Package charts holds the tests of the Helm chart in charts/jetmail.
//
// They run the real helm binary (built from the Go module proxy by
// hack/helm.sh; its path in $HELM) and, for the strongest check, send every
// rendered object to a real kube-apiserver (envtest, $KUBEBUILDER_ASSETS from
// hack/envtest.sh) as a server-side dry run with strict field validation:
//
//	HELM=$(hack/helm.sh | tail -1) KUBEBUILDER_ASSETS=$(hack/envtest.sh | tail -1) go test ./charts/
package charts

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	"github.com/jetmail/jetmail/spool"
)

const (
	chartDir  = "jetmail"
	release   = "jm"
	namespace = "mail"
	natsURL   = "nats://nats.nats.svc:4222"
)

// helmBin is the helm binary, or the test is skipped.
func helmBin(t *testing.T) string {
	t.Helper()
	h := os.Getenv("HELM")
	if h == "" {
		t.Skip("HELM is not set; run with HELM=$(hack/helm.sh | tail -1) (hack/test.sh does)")
	}
	return h
}

// helm runs the helm binary with a private home, so no user configuration
// or repository cache leaks in.
func helm(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	bin := helmBin(t)
	home := t.TempDir()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
		"KUBECONFIG="+filepath.Join(home, "no-kubeconfig"))
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// render runs `helm template` with nats.url and the given --set values and
// returns the objects it prints.
func render(t *testing.T, sets ...string) []*unstructured.Unstructured {
	t.Helper()
	args := []string{"template", release, chartDir, "--namespace", namespace, "--set", "nats.url=" + natsURL}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	out, stderr, err := helm(t, args...)
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return parse(t, out)
}

// renderNoURL is render without the implicit nats.url (for the embedded
// NATS server, whose URL the chart fills in itself).
func renderNoURL(t *testing.T, sets ...string) []*unstructured.Unstructured {
	t.Helper()
	args := []string{"template", release, chartDir, "--namespace", namespace}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	out, stderr, err := helm(t, args...)
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return parse(t, out)
}

// renderFails checks that `helm template` with nats.url and these values
// fails, and that its error says each of want.
func renderFails(t *testing.T, sets []string, want ...string) {
	t.Helper()
	args := []string{"template", release, chartDir, "--namespace", namespace, "--set", "nats.url=" + natsURL}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	_, stderr, err := helm(t, args...)
	if err == nil {
		t.Errorf("--set %s: helm template succeeded, want a failure", strings.Join(sets, " --set "))
		return
	}
	for _, w := range want {
		if !strings.Contains(stderr, w) {
			t.Errorf("--set %s: the error does not say %q:\n%s", strings.Join(sets, " --set "), w, stderr)
		}
	}
}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// parse splits a multi-document YAML stream into objects.
func parse(t *testing.T, stream string) []*unstructured.Unstructured {
	t.Helper()
	var objs []*unstructured.Unstructured
	for _, doc := range docSep.Split(stream, -1) {
		m := map[string]any{}
		if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
			t.Fatalf("rendered YAML does not parse: %v\n%s", err, doc)
		}
		if len(m) == 0 {
			continue // only comments
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
	return objs
}

// manifest indexes rendered objects by "Kind/name".
type manifest map[string]*unstructured.Unstructured

func index(t *testing.T, objs []*unstructured.Unstructured) manifest {
	t.Helper()
	m := manifest{}
	for _, o := range objs {
		k := o.GetKind() + "/" + o.GetName()
		if _, dup := m[k]; dup {
			t.Fatalf("%s rendered twice", k)
		}
		m[k] = o
	}
	return m
}

func (m manifest) get(t *testing.T, kind, name string) *unstructured.Unstructured {
	t.Helper()
	o, ok := m[kind+"/"+name]
	if !ok {
		t.Fatalf("no %s %q rendered; have %v", kind, name, m.keys())
	}
	return o
}

func (m manifest) keys() []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func (m manifest) kinds(kind string) []string {
	var names []string
	for _, o := range m {
		if o.GetKind() == kind {
			names = append(names, o.GetName())
		}
	}
	sort.Strings(names)
	return names
}

// typed converts a rendered object's field into a Go value through JSON.
func field[T any](t *testing.T, o *unstructured.Unstructured, path ...string) T {
	t.Helper()
	var v T
	raw, found, err := unstructured.NestedFieldNoCopy(o.Object, path...)
	if err != nil || !found {
		t.Fatalf("%s/%s: no field %s (%v)", o.GetKind(), o.GetName(), strings.Join(path, "."), err)
	}
	b, err := json.Marshal(raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s/%s %s: %v", o.GetKind(), o.GetName(), strings.Join(path, "."), err)
	}
	return v
}

// The parts of a Deployment the tests look at, decoded with plain structs so
// the test does not depend on how the chart spells things.
type probe struct {
	HTTPGet struct {
		Path string `json:"path"`
		Port any    `json:"port"`
	} `json:"httpGet"`
	PeriodSeconds    int `json:"periodSeconds"`
	FailureThreshold int `json:"failureThreshold"`
}

type container struct {
	Name  string   `json:"name"`
	Image string   `json:"image"`
	Args  []string `json:"args"`
	Env   []struct {
		Name      string `json:"name"`
		ValueFrom *struct {
			FieldRef *struct {
				FieldPath string `json:"fieldPath"`
			} `json:"fieldRef"`
		} `json:"valueFrom"`
	} `json:"env"`
	Ports []struct {
		Name          string `json:"name"`
		ContainerPort int    `json:"containerPort"`
	} `json:"ports"`
	LivenessProbe   *probe `json:"livenessProbe"`
	ReadinessProbe  *probe `json:"readinessProbe"`
	StartupProbe    *probe `json:"startupProbe"`
	SecurityContext *struct {
		AllowPrivilegeEscalation *bool `json:"allowPrivilegeEscalation"`
		ReadOnlyRootFilesystem   *bool `json:"readOnlyRootFilesystem"`
		RunAsNonRoot             *bool `json:"runAsNonRoot"`
		Capabilities             *struct {
			Drop []string `json:"drop"`
			Add  []string `json:"add"`
		} `json:"capabilities"`
	} `json:"securityContext"`
	Lifecycle *struct {
		PreStop *struct {
			Sleep *struct {
				Seconds int `json:"seconds"`
			} `json:"sleep"`
		} `json:"preStop"`
	} `json:"lifecycle"`
	VolumeMounts []struct {
		Name      string `json:"name"`
		MountPath string `json:"mountPath"`
		ReadOnly  bool   `json:"readOnly"`
	} `json:"volumeMounts"`
	Resources map[string]any `json:"resources"`
}

type podSpec struct {
	ServiceAccountName            string `json:"serviceAccountName"`
	AutomountServiceAccountToken  *bool  `json:"automountServiceAccountToken"`
	TerminationGracePeriodSeconds int    `json:"terminationGracePeriodSeconds"`
	SecurityContext               *struct {
		RunAsNonRoot   *bool `json:"runAsNonRoot"`
		RunAsUser      *int  `json:"runAsUser"`
		SeccompProfile *struct {
			Type string `json:"type"`
		} `json:"seccompProfile"`
	} `json:"securityContext"`
	Containers []container `json:"containers"`
	Volumes    []struct {
		Name   string `json:"name"`
		Secret *struct {
			SecretName  string `json:"secretName"`
			DefaultMode *int   `json:"defaultMode"`
		} `json:"secret"`
	} `json:"volumes"`
}

type deployment struct {
	Replicas int // -1: no replicas field (an autoscaler owns it)
	Selector map[string]string
	Labels   map[string]string
	Pod      podSpec
}

func getDeployment(t *testing.T, m manifest, component string) deployment {
	t.Helper()
	o := m.get(t, "Deployment", release+"-jetmail-"+component)
	d := deployment{
		Replicas: -1,
		Selector: field[map[string]string](t, o, "spec", "selector", "matchLabels"),
		Labels:   field[map[string]string](t, o, "spec", "template", "metadata", "labels"),
		Pod:      field[podSpec](t, o, "spec", "template", "spec"),
	}
	if _, found, _ := unstructured.NestedFieldNoCopy(o.Object, "spec", "replicas"); found {
		d.Replicas = field[int](t, o, "spec", "replicas")
	}
	if len(d.Pod.Containers) != 1 {
		t.Fatalf("%s: %d containers, want 1", component, len(d.Pod.Containers))
	}
	if got := d.Selector["app.kubernetes.io/component"]; got != component {
		t.Errorf("%s: selector component %q", component, got)
	}
	for k, v := range d.Selector {
		if d.Labels[k] != v {
			t.Errorf("%s: selector %s=%s does not match the pod labels %v", component, k, v, d.Labels)
		}
	}
	if o.GetNamespace() != namespace {
		t.Errorf("%s: namespace %q, want %q", component, o.GetNamespace(), namespace)
	}
	return d
}

// checkHardened checks the pod and container security settings every
// component must have, and the image.
func checkHardened(t *testing.T, component string, d deployment) {
	t.Helper()
	checkSecure(t, component, d.Pod)
	if c := d.Pod.Containers[0]; c.Image != "ghcr.io/jetmail/jetmail:0.1.0" {
		t.Errorf("%s: image %q, want the chart's appVersion tag", component, c.Image)
	}
}

// checkSecure checks the pod and container security settings.
func checkSecure(t *testing.T, component string, p podSpec) {
	t.Helper()
	if p.SecurityContext == nil || p.SecurityContext.RunAsNonRoot == nil || !*p.SecurityContext.RunAsNonRoot {
		t.Errorf("%s: pod securityContext.runAsNonRoot is not true", component)
	} else if p.SecurityContext.RunAsUser == nil || *p.SecurityContext.RunAsUser != 65532 {
		t.Errorf("%s: pod runs as user %v, want 65532 (distroless nonroot)", component, p.SecurityContext.RunAsUser)
	} else if p.SecurityContext.SeccompProfile == nil || p.SecurityContext.SeccompProfile.Type != "RuntimeDefault" {
		t.Errorf("%s: no RuntimeDefault seccomp profile", component)
	}
	sc := p.Containers[0].SecurityContext
	switch {
	case sc == nil:
		t.Errorf("%s: container has no securityContext", component)
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Errorf("%s: root filesystem is writable", component)
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Errorf("%s: privilege escalation allowed", component)
	case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
		t.Errorf("%s: container runAsNonRoot is not true", component)
	case sc.Capabilities == nil || !reflect.DeepEqual(sc.Capabilities.Drop, []string{"ALL"}) || len(sc.Capabilities.Add) > 0:
		t.Errorf("%s: capabilities %+v, want drop [ALL] and no add", component, sc.Capabilities)
	}
}

func checkProbes(t *testing.T, component string, c container, port string, startup bool) {
	t.Helper()
	for _, p := range []struct {
		name, path string
		p          *probe
	}{{"liveness", "/healthz", c.LivenessProbe}, {"readiness", "/readyz", c.ReadinessProbe}} {
		if p.p == nil {
			t.Errorf("%s: no %s probe", component, p.name)
			continue
		}
		if p.p.HTTPGet.Path != p.path || p.p.HTTPGet.Port != port {
			t.Errorf("%s: %s probe GET %v%s, want port %s path %s", component, p.name, p.p.HTTPGet.Port, p.p.HTTPGet.Path, port, p.path)
		}
	}
	if startup && (c.StartupProbe == nil || c.StartupProbe.HTTPGet.Path != "/healthz" || c.StartupProbe.HTTPGet.Port != port) {
		t.Errorf("%s: startup probe %+v, want /healthz on %s", component, c.StartupProbe, port)
	}
}

// checkPort checks that the named container port has the given number.
func checkPort(t *testing.T, component string, c container, name string, number int) {
	t.Helper()
	for _, p := range c.Ports {
		if p.Name == name {
			if p.ContainerPort != number {
				t.Errorf("%s: port %s is %d, want %d", component, name, p.ContainerPort, number)
			}
			return
		}
	}
	t.Errorf("%s: no container port named %s", component, name)
}

func checkPodNameEnv(t *testing.T, component string, c container) {
	t.Helper()
	for _, e := range c.Env {
		if e.Name == "POD_NAME" {
			if e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "metadata.name" {
				t.Errorf("%s: POD_NAME does not come from the downward API metadata.name", component)
			}
			return
		}
	}
	t.Errorf("%s: no POD_NAME env", component)
}

// checkMetricsServices checks the per-component metrics Services: each
// selects exactly its component's pods, and its port "metrics" is the
// container port of that name.
func checkMetricsServices(t *testing.T, m manifest) {
	t.Helper()
	comps := []string{"gateway", "deliverer", "controller"}
	ports := map[string]int{"gateway": 9090, "deliverer": 9091, "controller": 8080}
	for _, comp := range comps {
		s := m.get(t, "Service", release+"-jetmail-"+comp+"-metrics")
		if got := field[string](t, s, "spec", "clusterIP"); got != "None" {
			t.Errorf("%s metrics Service clusterIP %q, want None (headless: every pod is a target)", comp, got)
		}
		p := field[[]map[string]any](t, s, "spec", "ports")
		if len(p) != 1 || p[0]["name"] != "metrics" || p[0]["targetPort"] != "metrics" || p[0]["port"] != float64(ports[comp]) {
			t.Errorf("%s metrics Service ports %v, want metrics %d -> metrics", comp, p, ports[comp])
		}
		checkPort(t, comp, getDeployment(t, m, comp).Pod.Containers[0], "metrics", ports[comp])
		sel := field[map[string]string](t, s, "spec", "selector")
		for _, other := range comps {
			d := getDeployment(t, m, other)
			selects := true
			for k, v := range sel {
				if d.Labels[k] != v {
					selects = false
				}
			}
			if selects != (other == comp) {
				t.Errorf("%s metrics Service selector %v: selects the %s pods = %v", comp, sel, other, selects)
			}
		}
	}
}

func TestLint(t *testing.T) {
	out, stderr, err := helm(t, "lint", chartDir, "--strict", "--set", "nats.url="+natsURL)
	if err != nil {
		t.Fatalf("helm lint: %v\n%s%s", err, out, stderr)
	}
}

func TestTemplateWithoutNATSURLFailsWithAnExplanation(t *testing.T) {
	_, stderr, err := helm(t, "template", release, chartDir, "--namespace", namespace)
	if err == nil {
		t.Fatal("helm template without nats.url succeeded")
	}
	for _, want := range []string{"nats.url is required", "does not install", "--set nats.url=nats://"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("error does not say %q:\n%s", want, stderr)
		}
	}
}

func TestValuesSchemaRejectsMistakes(t *testing.T) {
	for set, want := range map[string]string{
		"gateway.replcas=2":              "replcas",
		"gateway.replicas=two":           "gateway.replicas",
		"service.type=Ingress":           "service.type",
		"nats.replicas=0":                "nats.replicas",
		"service.externalTrafficPolicy=": "", // allowed: empty means the cluster default
		// Autoscaling, metrics and the trial NATS server.
		"deliverer.autoscaling.minReplicas=0":                                      "deliverer.autoscaling.minReplicas",
		"gateway.autoscaling.maxReplicas=0":                                        "gateway.autoscaling.maxReplicas",
		"gateway.autoscaling.sessions.averageValue=lots":                           "averageValue",
		"gateway.autoscaling.targetCPUUtilization=70":                              "targetCPUUtilization",
		"deliverer.autoscaling.keda.natsServerMonitoringEndpoint=http://nats:8222": "natsServerMonitoringEndpoint",
		"deliverer.autoscaling.keda.lagThreshold=0":                                "lagThreshold",
		"deliverer.autoscaling.keda.activationLagThreshold=":                       "",
		"deliverer.autoscaling.external.averageValue=100m":                         "",
		"prometheusRule.disabled={NoSuchAlert}":                                    "prometheusRule.disabled",
		"prometheusRule.thresholds.stalledWindow=3 hours":                          "stalledWindow",
		"prometheusRule.thresholds.tempfailRatio=2":                                "tempfailRatio",
		"serviceMonitor.components.mta=true":                                       "mta",
		"grafanaDashboard.label=x":                                                 "label",
		"nats.embedded.persistence.size=big":                                       "size",
		"nats.embedded.maxFileStore=lots":                                          "maxFileStore",
		"nats.embedded.replicas=3":                                                 "replicas",
	} {
		_, stderr, err := helm(t, "template", release, chartDir, "--namespace", namespace,
			"--set", "nats.url="+natsURL, "--set", set)
		switch {
		case want == "" && err != nil:
			t.Errorf("--set %s refused: %s", set, stderr)
		case want != "" && err == nil:
			t.Errorf("--set %s accepted; the schema should refuse it", set)
		case want != "" && !strings.Contains(stderr, want):
			t.Errorf("--set %s: error does not name %q:\n%s", set, want, stderr)
		}
	}
	_, stderr, err := helm(t, "template", release, chartDir, "--namespace", namespace,
		"--set", "nats.url="+natsURL, "--set", "controller.leaderElect=false")
	if err == nil || !strings.Contains(stderr, "controller.leaderElect must be true") {
		t.Errorf("two controllers without leader election not refused: %v %s", err, stderr)
	}
}

func TestDefaults(t *testing.T) {
	m := index(t, render(t))

	if got, want := m.kinds("Deployment"), []string{"jm-jetmail-controller", "jm-jetmail-deliverer", "jm-jetmail-gateway"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Deployments %v, want %v", got, want)
	}
	for _, kind := range []string{"CustomResourceDefinition", "ServiceMonitor", "RelayPolicy", "MailRoute", "DeliveryPolicy", "ClusterRoleBinding",
		"HorizontalPodAutoscaler", "ScaledObject", "PrometheusRule", "ConfigMap", "StatefulSet"} {
		if names := m.kinds(kind); len(names) > 0 {
			t.Errorf("default values render %s %v", kind, names)
		}
	}

	t.Run("gateway", func(t *testing.T) {
		d := getDeployment(t, m, "gateway")
		c := d.Pod.Containers[0]
		want := []string{"gateway", "--nats-url=" + natsURL, "--replicas=3", "--smtp-listen=:2525",
			"--metrics-listen=:9090", "--pod-name=$(POD_NAME)", "--shutdown-grace=30s", "--log-format=json"}
		if !reflect.DeepEqual(c.Args, want) {
			t.Errorf("args\n got %q\nwant %q", c.Args, want)
		}
		if d.Replicas != 2 {
			t.Errorf("replicas %d, want 2", d.Replicas)
		}
		checkHardened(t, "gateway", d)
		checkProbes(t, "gateway", c, "metrics", true)
		checkPort(t, "gateway", c, "smtp", 2525)
		checkPort(t, "gateway", c, "metrics", 9090)
		checkPodNameEnv(t, "gateway", c)
		if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
			t.Fatal("no preStop sleep")
		}
		if sleep := c.Lifecycle.PreStop.Sleep.Seconds; d.Pod.TerminationGracePeriodSeconds <= sleep+30 {
			t.Errorf("terminationGracePeriodSeconds %d does not exceed preStop %ds + shutdown grace 30s",
				d.Pod.TerminationGracePeriodSeconds, sleep)
		}
		if a := d.Pod.AutomountServiceAccountToken; a == nil || *a {
			t.Error("gateway pods get a Kubernetes API token they do not need")
		}
		if len(d.Pod.Volumes) != 0 || len(c.VolumeMounts) != 0 {
			t.Errorf("volumes without tls.secretName: %+v", d.Pod.Volumes)
		}
		if c.Resources["requests"] == nil {
			t.Error("no resource requests")
		}
	})

	t.Run("deliverer", func(t *testing.T) {
		d := getDeployment(t, m, "deliverer")
		c := d.Pod.Containers[0]
		want := []string{"deliverer", "--nats-url=" + natsURL, "--replicas=3", "--metrics-listen=:9091",
			"--pod-name=$(POD_NAME)", "--delivery-grace=30s", "--park-after=1m", "--log-format=json"}
		if !reflect.DeepEqual(c.Args, want) {
			t.Errorf("args\n got %q\nwant %q", c.Args, want)
		}
		checkHardened(t, "deliverer", d)
		checkProbes(t, "deliverer", c, "metrics", true)
		checkPort(t, "deliverer", c, "metrics", 9091)
		checkPodNameEnv(t, "deliverer", c)
		if d.Pod.TerminationGracePeriodSeconds <= 30 {
			t.Errorf("terminationGracePeriodSeconds %d does not exceed the delivery grace 30s", d.Pod.TerminationGracePeriodSeconds)
		}
		if a := d.Pod.AutomountServiceAccountToken; a == nil || *a {
			t.Error("deliverer pods get a Kubernetes API token they do not need")
		}
	})

	t.Run("controller", func(t *testing.T) {
		d := getDeployment(t, m, "controller")
		c := d.Pod.Containers[0]
		want := []string{"controller", "--nats-url=" + natsURL, "--replicas=3", "--namespace=" + namespace,
			"--leader-elect=true", "--metrics-listen=:8080", "--health-listen=:8081"}
		if !reflect.DeepEqual(c.Args, want) {
			t.Errorf("args\n got %q\nwant %q", c.Args, want)
		}
		if d.Replicas != 2 {
			t.Errorf("replicas %d, want 2", d.Replicas)
		}
		checkHardened(t, "controller", d)
		checkProbes(t, "controller", c, "health", false)
		checkPort(t, "controller", c, "health", 8081)
		checkPort(t, "controller", c, "metrics", 8080)
		if d.Pod.ServiceAccountName != "jm-jetmail-controller" {
			t.Errorf("serviceAccountName %q", d.Pod.ServiceAccountName)
		}
		m.get(t, "ServiceAccount", "jm-jetmail-controller")
	})

	t.Run("smtp service", func(t *testing.T) {
		s := m.get(t, "Service", "jm-jetmail")
		if got := field[string](t, s, "spec", "type"); got != "LoadBalancer" {
			t.Errorf("type %q, want LoadBalancer", got)
		}
		if got := field[string](t, s, "spec", "externalTrafficPolicy"); got != "Local" {
			t.Errorf("externalTrafficPolicy %q, want Local (keeps the client address relay rules need)", got)
		}
		ports := field[[]map[string]any](t, s, "spec", "ports")
		if len(ports) != 1 || ports[0]["port"] != float64(25) || ports[0]["targetPort"] != "smtp" {
			t.Errorf("ports %v, want 25 -> smtp", ports)
		}
		sel := field[map[string]string](t, s, "spec", "selector")
		gw := getDeployment(t, m, "gateway")
		for k, v := range sel {
			if gw.Labels[k] != v {
				t.Errorf("selector %s=%s does not select the gateway pods", k, v)
			}
		}
		if sel["app.kubernetes.io/component"] != "gateway" {
			t.Errorf("selector %v would select more than the gateways", sel)
		}
	})

	t.Run("metrics service", func(t *testing.T) {
		checkMetricsServices(t, m)
	})

	t.Run("pdb", func(t *testing.T) {
		p := m.get(t, "PodDisruptionBudget", "jm-jetmail-gateway")
		if got := field[int](t, p, "spec", "maxUnavailable"); got != 1 {
			t.Errorf("maxUnavailable %d", got)
		}
		sel := field[map[string]string](t, p, "spec", "selector", "matchLabels")
		if !reflect.DeepEqual(sel, getDeployment(t, m, "gateway").Selector) {
			t.Errorf("PDB selector %v is not the gateway Deployment's", sel)
		}
	})
}

// canonicalRules decodes RBAC rules into a canonical form: every list sorted, the
// rules sorted, so only a difference in meaning counts.
func canonicalRules(t *testing.T, raw any) []string {
	t.Helper()
	b, err := json.Marshal(raw)
	if err != nil {
		t.Fatal(err)
	}
	var rules []map[string][]string
	if err := json.Unmarshal(b, &rules); err != nil {
		t.Fatalf("rules: %v", err)
	}
	var out []string
	for _, r := range rules {
		for k := range r {
			slices.Sort(r[k])
		}
		b, _ := json.Marshal(r) // map keys are sorted by encoding/json
		out = append(out, string(b))
	}
	sort.Strings(out)
	return out
}

func TestRBACMatchesGeneratedRole(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	generated := parse(t, string(raw))
	if len(generated) != 1 || generated[0].GetKind() != "ClusterRole" {
		t.Fatalf("config/rbac/role.yaml: want one ClusterRole, got %d objects", len(generated))
	}
	want := canonicalRules(t, generated[0].Object["rules"])

	for _, tc := range []struct {
		name        string
		sets        []string
		bindingKind string
	}{
		{"release namespace", nil, "RoleBinding"},
		{"all namespaces", []string{"controller.watchAllNamespaces=true"}, "ClusterRoleBinding"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := index(t, render(t, tc.sets...))
			roles := m.kinds("ClusterRole")
			if len(roles) != 1 {
				t.Fatalf("ClusterRoles %v, want 1", roles)
			}
			role := m.get(t, "ClusterRole", roles[0])
			if got := canonicalRules(t, role.Object["rules"]); !reflect.DeepEqual(got, want) {
				t.Errorf("chart rules differ from config/rbac/role.yaml (run hack/generate.sh, then update templates/rbac.yaml)\n got %s\nwant %s",
					strings.Join(got, "\n     "), strings.Join(want, "\n     "))
			}
			if n := m.kinds("Role"); len(n) != 0 {
				t.Errorf("unexpected Roles %v", n)
			}
			bindings := m.kinds(tc.bindingKind)
			if len(bindings) != 1 {
				t.Fatalf("%ss %v, want 1", tc.bindingKind, bindings)
			}
			b := m.get(t, tc.bindingKind, bindings[0])
			ref := field[map[string]string](t, b, "roleRef")
			if ref["kind"] != "ClusterRole" || ref["name"] != roles[0] {
				t.Errorf("roleRef %v does not point at ClusterRole %s", ref, roles[0])
			}
			subjects := field[[]map[string]string](t, b, "subjects")
			ctrl := getDeployment(t, m, "controller")
			if len(subjects) != 1 || subjects[0]["kind"] != "ServiceAccount" ||
				subjects[0]["name"] != ctrl.Pod.ServiceAccountName || subjects[0]["namespace"] != namespace {
				t.Errorf("subjects %v, want the controller's ServiceAccount %s/%s", subjects, namespace, ctrl.Pod.ServiceAccountName)
			}
			if tc.bindingKind == "RoleBinding" && b.GetNamespace() != namespace {
				t.Errorf("RoleBinding in namespace %q, want %q", b.GetNamespace(), namespace)
			}
			hasNS := slices.Contains(ctrl.Pod.Containers[0].Args, "--namespace="+namespace)
			if hasNS != (tc.bindingKind == "RoleBinding") {
				t.Errorf("controller args %q do not fit a %s", ctrl.Pod.Containers[0].Args, tc.bindingKind)
			}
		})
	}
}

func TestNATSCredentialsPerComponent(t *testing.T) {
	m := index(t, render(t,
		"tls.secretName=smtp-tls",
		"nats.credentials.gateway.secretName=gw-nats",
		"nats.credentials.deliverer.secretName=dl-nats",
		"nats.credentials.controller.secretName=ct-nats",
		"nats.credentials.controller.type=creds",
		"nats.credentials.controller.key=controller.creds",
	))
	for _, tc := range []struct{ comp, arg, secret string }{
		{"gateway", "--nats-nkey=/etc/jetmail/nats/nkey", "gw-nats"},
		{"deliverer", "--nats-nkey=/etc/jetmail/nats/nkey", "dl-nats"},
		{"controller", "--nats-creds=/etc/jetmail/nats/controller.creds", "ct-nats"},
	} {
		pod := getDeployment(t, m, tc.comp).Pod
		c := pod.Containers[0]
		if !slices.Contains(c.Args, tc.arg) {
			t.Errorf("%s args %q lack %s", tc.comp, c.Args, tc.arg)
		}
		found := false
		for _, v := range pod.Volumes {
			if v.Name == "nats-credentials" && v.Secret != nil && v.Secret.SecretName == tc.secret &&
				v.Secret.DefaultMode != nil && *v.Secret.DefaultMode == 0o440 {
				found = true
			}
		}
		if !found {
			t.Errorf("%s volumes %+v lack the %s Secret (mode 0440)", tc.comp, pod.Volumes, tc.secret)
		}
		found = false
		for _, vm := range c.VolumeMounts {
			if vm.Name == "nats-credentials" && vm.MountPath == "/etc/jetmail/nats" && vm.ReadOnly {
				found = true
			}
		}
		if !found {
			t.Errorf("%s mounts %+v lack /etc/jetmail/nats", tc.comp, c.VolumeMounts)
		}
	}
	// The gateway keeps its certificate too.
	if gw := getDeployment(t, m, "gateway").Pod; len(gw.Volumes) != 2 {
		t.Errorf("gateway volumes %+v, want the TLS and the NATS Secrets", gw.Volumes)
	}
}

func TestOptions(t *testing.T) {
	m := index(t, render(t,
		"tls.secretName=smtp-tls",
		"gateway.proxyProtocol=true",
		"hostname=mx1.example.org",
		"nats.replicas=1",
		"gateway.extraArgs={--duplicate-window=48h}",
		"deliverer.dns={10.0.0.10:53,10.0.0.11:53}",
		"deliverer.dnssec=true",
		"service.type=ClusterIP",
		"serviceMonitor.enabled=true",
		"samples.enabled=true",
		"samples.relayhost=smtp.provider.example:587",
		"gateway.podDisruptionBudget.minAvailable=1",
		"image.tag=dev",
	))
	gw := getDeployment(t, m, "gateway")
	c := gw.Pod.Containers[0]
	for _, arg := range []string{"--tls-cert=/etc/jetmail/tls/tls.crt", "--tls-key=/etc/jetmail/tls/tls.key",
		"--proxy-protocol", "--hostname=mx1.example.org", "--replicas=1", "--duplicate-window=48h"} {
		if !slices.Contains(c.Args, arg) {
			t.Errorf("gateway args %q lack %s", c.Args, arg)
		}
	}
	if c.Image != "ghcr.io/jetmail/jetmail:dev" {
		t.Errorf("image %q", c.Image)
	}
	if len(gw.Pod.Volumes) != 1 || gw.Pod.Volumes[0].Secret == nil || gw.Pod.Volumes[0].Secret.SecretName != "smtp-tls" {
		t.Errorf("volumes %+v, want the smtp-tls Secret", gw.Pod.Volumes)
	}
	if len(c.VolumeMounts) != 1 || c.VolumeMounts[0].MountPath != "/etc/jetmail/tls" || !c.VolumeMounts[0].ReadOnly {
		t.Errorf("mounts %+v", c.VolumeMounts)
	}
	dl := getDeployment(t, m, "deliverer").Pod.Containers[0]
	for _, arg := range []string{"--dns=10.0.0.10:53,10.0.0.11:53", "--dnssec", "--hostname=mx1.example.org", "--replicas=1"} {
		if !slices.Contains(dl.Args, arg) {
			t.Errorf("deliverer args %q lack %s", dl.Args, arg)
		}
	}
	if !slices.Contains(getDeployment(t, m, "controller").Pod.Containers[0].Args, "--replicas=1") {
		t.Error("controller does not get --replicas=1")
	}
	s := m.get(t, "Service", "jm-jetmail")
	if _, found, _ := unstructured.NestedString(s.Object, "spec", "externalTrafficPolicy"); found {
		t.Error("externalTrafficPolicy set on a ClusterIP Service (the API server refuses it)")
	}
	if got := field[int](t, m.get(t, "PodDisruptionBudget", "jm-jetmail-gateway"), "spec", "minAvailable"); got != 1 {
		t.Errorf("minAvailable %d", got)
	}
	checkServiceMonitors(t, m, "gateway", "deliverer", "controller")
	for _, kind := range []string{"RelayPolicy", "DeliveryPolicy", "MailRoute"} {
		if len(m.kinds(kind)) != 1 {
			t.Errorf("samples: %s %v", kind, m.kinds(kind))
		}
	}
}

// checkServiceMonitors checks that exactly the given components have a
// ServiceMonitor, and that each selects its component's metrics Service and
// no other Service.
func checkServiceMonitors(t *testing.T, m manifest, comps ...string) {
	t.Helper()
	var want []string
	for _, c := range comps {
		want = append(want, release+"-jetmail-"+c)
	}
	sort.Strings(want)
	if got := m.kinds("ServiceMonitor"); !reflect.DeepEqual(got, want) {
		t.Fatalf("ServiceMonitors %v, want %v", got, want)
	}
	for _, comp := range comps {
		sm := m.get(t, "ServiceMonitor", release+"-jetmail-"+comp)
		if sm.GetAPIVersion() != "monitoring.coreos.com/v1" {
			t.Errorf("ServiceMonitor apiVersion %s", sm.GetAPIVersion())
		}
		eps := field[[]map[string]any](t, sm, "spec", "endpoints")
		if len(eps) != 1 || eps[0]["port"] != "metrics" || eps[0]["path"] != "/metrics" {
			t.Errorf("%s ServiceMonitor endpoints %v", comp, eps)
		}
		if ns := field[[]string](t, sm, "spec", "namespaceSelector", "matchNames"); !reflect.DeepEqual(ns, []string{namespace}) {
			t.Errorf("%s ServiceMonitor namespaces %v", comp, ns)
		}
		sel := field[map[string]string](t, sm, "spec", "selector", "matchLabels")
		var selected []string
		for _, name := range m.kinds("Service") {
			labels := m.get(t, "Service", name).GetLabels()
			match := true
			for k, v := range sel {
				if labels[k] != v {
					match = false
				}
			}
			if match {
				selected = append(selected, name)
			}
		}
		if want := []string{release + "-jetmail-" + comp + "-metrics"}; !reflect.DeepEqual(selected, want) {
			t.Errorf("%s ServiceMonitor selector %v selects Services %v, want %v", comp, sel, selected, want)
		}
	}
}

// TestCRDsAreTheGeneratedOnes guards the copy hack/generate.sh makes.
func TestCRDsAreTheGeneratedOnes(t *testing.T) {
	gen, err := filepath.Glob(filepath.Join("..", "config", "crd", "bases", "*.yaml"))
	if err != nil || len(gen) == 0 {
		t.Fatalf("no generated CRDs: %v", err)
	}
	chart, _ := filepath.Glob(filepath.Join(chartDir, "crds", "*.yaml"))
	if len(chart) != len(gen) {
		t.Fatalf("chart has %d CRDs, config/crd/bases %d: run hack/generate.sh", len(chart), len(gen))
	}
	for _, g := range gen {
		a, _ := os.ReadFile(g)
		b, err := os.ReadFile(filepath.Join(chartDir, "crds", filepath.Base(g)))
		if err != nil || !bytes.Equal(a, b) {
			t.Errorf("charts/jetmail/crds/%s differs from %s: run hack/generate.sh (%v)", filepath.Base(g), g, err)
		}
	}
}

// TestAPIServerAcceptsTheManifests sends every rendered object to a real
// kube-apiserver as a server-side dry run with strict field validation: any
// unknown or misplaced field, wrong type, invalid value or CRD schema
// violation is refused there.
func TestAPIServerAcceptsTheManifests(t *testing.T) {
	helmBin(t)
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("KUBEBUILDER_ASSETS is not set; run with KUBEBUILDER_ASSETS=$(hack/envtest.sh | tail -1) (hack/test.sh does)")
	}
	start := time.Now()
	env := &envtest.Environment{
		// The chart's CRDs, and those of KEDA and the Prometheus Operator
		// (copied from their modules: testdata/crds/NOTICE) for the
		// ScaledObject, ServiceMonitors and PrometheusRule.
		CRDDirectoryPaths:     []string{filepath.Join(chartDir, "crds"), filepath.Join("testdata", "crds")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest: %v", err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	t.Logf("envtest started and CRDs installed in %v", time.Since(start).Round(time.Millisecond))
	c, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ns := &unstructured.Unstructured{}
	ns.SetAPIVersion("v1")
	ns.SetKind("Namespace")
	ns.SetName(namespace)
	if err := c.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}

	dryRun := func(o *unstructured.Unstructured) error {
		return c.Create(ctx, o.DeepCopy(), client.DryRunAll, client.FieldValidation("Strict"))
	}

	// The check must be able to fail: a misspelt field is refused.
	bad := index(t, render(t))["Deployment/jm-jetmail-gateway"].DeepCopy()
	if err := unstructured.SetNestedField(bad.Object, int64(1), "spec", "template", "spec", "terminationGracePeriod"); err != nil {
		t.Fatal(err)
	}
	if err := dryRun(bad); err == nil || !strings.Contains(err.Error(), "terminationGracePeriod") {
		t.Fatalf("a Deployment with an unknown field was not refused: %v", err)
	}

	for _, tc := range []struct {
		name  string
		sets  []string
		kinds []string // rendered at least once, so the case checks them
	}{
		{"defaults", nil, nil},
		{"all options", []string{"tls.secretName=smtp-tls", "gateway.proxyProtocol=true", "hostname=mx1.example.org",
			"deliverer.dns={10.0.0.10:53}", "samples.enabled=true", "samples.relayhost=smtp.provider.example:587",
			"service.type=NodePort", "service.nodePort=30025", "service.loadBalancerSourceRanges={192.0.2.0/24}",
			"service.ipFamilyPolicy=SingleStack", "gateway.podDisruptionBudget.minAvailable=50%",
			"controller.watchAllNamespaces=true", "imagePullSecrets[0].name=regcred", "image.digest=sha256:" + strings.Repeat("ab", 32),
			"gateway.topologySpreadConstraints[0].maxSkew=1",
			"gateway.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
			"gateway.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
			"gateway.topologySpreadConstraints[0].labelSelector.matchLabels.app\\.kubernetes\\.io/component=gateway",
			"gateway.preStopSleepSeconds=0", "deliverer.resources.limits.memory=512Mi"}, nil},
		{"LoadBalancer with class", []string{"service.loadBalancerClass=example.com/lb", "service.externalTrafficPolicy=Cluster",
			"gateway.proxyProtocol=true", "metrics.service.enabled=false", "serviceAccount.create=false", "rbac.create=false",
			"controller.serviceAccount.create=false", "controller.replicas=1", "controller.leaderElect=false"}, nil},
		{"autoscaling with KEDA, metrics", []string{"gateway.autoscaling.enabled=true", "gateway.autoscaling.sessions.enabled=true",
			"gateway.autoscaling.behavior.scaleDown.stabilizationWindowSeconds=600",
			"gateway.autoscaling.behavior.scaleDown.policies[0].type=Pods",
			"gateway.autoscaling.behavior.scaleDown.policies[0].value=1",
			"gateway.autoscaling.behavior.scaleDown.policies[0].periodSeconds=60",
			"deliverer.autoscaling.keda.enabled=true", "deliverer.autoscaling.keda.natsServerMonitoringEndpoint=nats.nats.svc:8222",
			"deliverer.autoscaling.keda.activationLagThreshold=10", "deliverer.autoscaling.keda.authenticationRef=nats-monitor",
			"deliverer.autoscaling.behavior.scaleDown.stabilizationWindowSeconds=900",
			"serviceMonitor.enabled=true", "serviceMonitor.scrapeTimeout=10s", "serviceMonitor.labels.release=prom",
			"prometheusRule.enabled=true", "prometheusRule.alertLabels.team=mail",
			"prometheusRule.extraRules[0].alert=SiteSpecific", "prometheusRule.extraRules[0].expr=vector(1)",
			"grafanaDashboard.enabled=true", "grafanaDashboard.annotations.grafana_folder=Mail"},
			[]string{"HorizontalPodAutoscaler", "ScaledObject", "ServiceMonitor", "PrometheusRule", "ConfigMap"}},
		{"external metric HPA, embedded NATS on a PVC", []string{"nats.embedded.enabled=true", "nats.replicas=1",
			"nats.embedded.maxFileStore=1G", "nats.embedded.persistence.storageClassName=standard",
			"deliverer.autoscaling.external.enabled=true", "deliverer.autoscaling.external.metricName=jetmail_queue_messages",
			"deliverer.autoscaling.external.metricSelector.namespace=" + namespace, "deliverer.autoscaling.minReplicas=1"},
			[]string{"HorizontalPodAutoscaler", "StatefulSet", "ConfigMap"}},
		{"embedded NATS on an emptyDir", []string{"nats.embedded.enabled=true", "nats.replicas=1",
			"nats.embedded.persistence.enabled=false"}, []string{"StatefulSet"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := render(t, tc.sets...)
			for _, kind := range tc.kinds {
				if len(index(t, objs).kinds(kind)) == 0 {
					t.Errorf("no %s rendered", kind)
				}
			}
			var refused []string
			for _, o := range objs {
				if err := dryRun(o); err != nil {
					refused = append(refused, fmt.Sprintf("%s %s: %v", o.GetKind(), o.GetName(), err))
				}
			}
			if len(refused) > 0 {
				t.Fatalf("the API server refused %d of %d objects:\n%s", len(refused), len(objs), strings.Join(refused, "\n"))
			}
			t.Logf("%d objects accepted: %s", len(objs), strings.Join(index(t, objs).keys(), ", "))
		})
	}

	// Create the default RBAC objects for real and ask the authorizer what
	// the ServiceAccounts may do: the controller everything it needs in the
	// release namespace and nothing elsewhere, the data plane nothing.
	t.Run("controller permissions", func(t *testing.T) {
		for _, o := range render(t) {
			switch o.GetKind() {
			case "ServiceAccount", "ClusterRole", "RoleBinding":
				if err := c.Create(ctx, o); err != nil {
					t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
				}
			}
		}
		controller := "system:serviceaccount:" + namespace + ":jm-jetmail-controller"
		dataPlane := "system:serviceaccount:" + namespace + ":jm-jetmail"
		type access struct {
			user, verb, group, resource, sub, ns string
			allowed                              bool
		}
		table := []access{
			{controller, "watch", "mail.jetmail.io", "relaypolicies", "", namespace, true},
			{controller, "list", "mail.jetmail.io", "mailroutes", "", namespace, true},
			{controller, "list", "mail.jetmail.io", "deliverypolicies", "", namespace, true},
			{controller, "patch", "mail.jetmail.io", "relaypolicies", "status", namespace, true},
			{controller, "watch", "", "secrets", "", namespace, true},
			{controller, "update", "coordination.k8s.io", "leases", "", namespace, true},
			{controller, "create", "events.k8s.io", "events", "", namespace, true},
			{controller, "update", "mail.jetmail.io", "relaypolicies", "", namespace, false},
			{controller, "list", "", "secrets", "", "kube-system", false},
			{controller, "watch", "mail.jetmail.io", "relaypolicies", "", "other", false},
			{dataPlane, "get", "", "secrets", "", namespace, false},
			{dataPlane, "list", "mail.jetmail.io", "relaypolicies", "", namespace, false},
		}
		// The RBAC authorizer learns of new bindings through an informer,
		// so a review right after the create may still see the old world.
		// Ask again until every grant is visible (bounded), and only judge
		// the denials in that same pass, when the bindings are known.
		var wrong []string
		for deadline := time.Now().Add(30 * time.Second); ; {
			wrong = wrong[:0]
			for _, tc := range table {
				sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
					User: tc.user,
					ResourceAttributes: &authorizationv1.ResourceAttributes{Namespace: tc.ns, Verb: tc.verb,
						Group: tc.group, Resource: tc.resource, Subresource: tc.sub},
				}}
				if err := c.Create(ctx, sar); err != nil {
					t.Fatal(err)
				}
				if sar.Status.Allowed != tc.allowed {
					wrong = append(wrong, fmt.Sprintf("%s %s %s/%s (%s) in %q: allowed=%v, want %v (%s)", tc.user, tc.verb,
						tc.group, tc.resource, tc.sub, tc.ns, sar.Status.Allowed, tc.allowed, sar.Status.Reason))
				}
			}
			if len(wrong) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		for _, w := range wrong {
			t.Error(w)
		}
	})

	// The dry runs really created nothing.
	var list unstructured.UnstructuredList
	list.SetGroupVersionKind(schema.GroupVersionKind{Group: "apps", Version: "v1", Kind: "DeploymentList"})
	if err := c.List(ctx, &list, client.InNamespace(namespace)); err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 0 {
		t.Errorf("dry run left %d Deployments behind", len(list.Items))
	}
}

// TestArgsAreAcceptedByTheBinary runs the real jetmail binary with the
// arguments the chart renders (NATS pointed at a closed port): each
// component must get past flag parsing and reach NATS, where it waits and
// says so ("not yet, trying again": cmd/jetmail untilUp, a pod never dies of
// a NATS that does not answer), so a flag renamed in cmd/jetmail cannot
// leave the chart behind. Files the arguments name are read before that, and
// their absence is fatal.
func TestArgsAreAcceptedByTheBinary(t *testing.T) {
	helmBin(t)
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "jetmail")
	start := time.Now()
	build := exec.Command(goBin, "build", "-o", bin, "../cmd/jetmail")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Logf("built jetmail in %v", time.Since(start).Round(time.Millisecond))

	const closed = "nats://127.0.0.1:1"
	for _, tc := range []struct {
		name string
		sets []string
		want string
	}{
		{"defaults", nil, "not yet, trying again"},
		{"options", []string{"gateway.proxyProtocol=true", "hostname=mx1.example.org", "deliverer.dns={10.0.0.10:53}",
			"controller.watchAllNamespaces=true", "logFormat=console"}, "not yet, trying again"},
		// The certificate is read before NATS is dialled.
		{"tls", []string{"tls.secretName=smtp-tls"}, "/etc/jetmail/tls/tls.crt"},
		// So is the NKEY seed.
		{"nats credentials", []string{"nats.credentials.gateway.secretName=gw", "nats.credentials.deliverer.secretName=dl",
			"nats.credentials.controller.secretName=ct"}, "open /etc/jetmail/nats/nkey"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := index(t, render(t, tc.sets...))
			for _, comp := range []string{"gateway", "deliverer", "controller"} {
				if tc.name == "tls" && comp != "gateway" {
					continue
				}
				var args []string
				for _, a := range getDeployment(t, m, comp).Pod.Containers[0].Args {
					if strings.HasPrefix(a, "--nats-url=") {
						a = "--nats-url=" + closed
					}
					// Any free port: the chart's fixed ones may be taken on
					// this machine (another test, another run).
					if flag, _, ok := strings.Cut(a, "="); ok && strings.HasSuffix(flag, "-listen") {
						a = flag + "=127.0.0.1:0"
					}
					// The kubelet expands $(POD_NAME) from the container's env.
					args = append(args, strings.ReplaceAll(a, "$(POD_NAME)", "jm-"+comp+"-0"))
				}
				if out, found := runUntil(t, bin, args, tc.want); !found {
					t.Errorf("%s %q: the output never says %q:\n%s", comp, args, tc.want, out)
				}
			}
		})
	}
}

// runUntil runs bin and reads its output until a line contains want (then
// stops it), it exits, or 30 s pass; it returns once the process is gone.
func runUntil(t *testing.T, bin string, args []string, want string) (string, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		pw.Close()
		close(done)
	}()
	var out strings.Builder
	found := false
	sc := bufio.NewScanner(pr)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), want) {
			found = true
			cancel()
			break
		}
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	<-done
	return out.String(), found
}

// The parts of a HorizontalPodAutoscaler (autoscaling/v2) the tests look at.
type hpaTarget struct {
	Type               string `json:"type"`
	AverageUtilization int    `json:"averageUtilization"`
	AverageValue       string `json:"averageValue"`
}

type scaleTargetRef struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Name       string `json:"name"`
}

type hpaSpec struct {
	ScaleTargetRef scaleTargetRef `json:"scaleTargetRef"`
	MinReplicas    int            `json:"minReplicas"`
	MaxReplicas    int            `json:"maxReplicas"`
	Metrics        []struct {
		Type     string `json:"type"`
		Resource *struct {
			Name   string    `json:"name"`
			Target hpaTarget `json:"target"`
		} `json:"resource"`
		Pods *struct {
			Metric struct {
				Name string `json:"name"`
			} `json:"metric"`
			Target hpaTarget `json:"target"`
		} `json:"pods"`
		External *struct {
			Metric struct {
				Name     string `json:"name"`
				Selector *struct {
					MatchLabels map[string]string `json:"matchLabels"`
				} `json:"selector"`
			} `json:"metric"`
			Target hpaTarget `json:"target"`
		} `json:"external"`
	} `json:"metrics"`
	Behavior map[string]any `json:"behavior"`
}

func getHPA(t *testing.T, m manifest, name string) hpaSpec {
	t.Helper()
	o := m.get(t, "HorizontalPodAutoscaler", name)
	if o.GetAPIVersion() != "autoscaling/v2" {
		t.Errorf("HPA %s apiVersion %s, want autoscaling/v2", name, o.GetAPIVersion())
	}
	if o.GetNamespace() != namespace {
		t.Errorf("HPA %s namespace %q", name, o.GetNamespace())
	}
	return field[hpaSpec](t, o, "spec")
}

// checkScaleTarget checks that ref names the component's Deployment as
// rendered.
func checkScaleTarget(t *testing.T, m manifest, ref scaleTargetRef, component string) {
	t.Helper()
	d := m.get(t, "Deployment", release+"-jetmail-"+component)
	if ref.APIVersion != d.GetAPIVersion() || ref.Kind != d.GetKind() || ref.Name != d.GetName() {
		t.Errorf("scaleTargetRef %+v, want %s %s %s", ref, d.GetAPIVersion(), d.GetKind(), d.GetName())
	}
}

// codeMetrics returns the names of the Prometheus metrics jetmail's code
// registers, read from its source (every `Name: "jetmail_..."`), and those
// controller-runtime registers for the controller, read from the module's
// source.
func codeMetrics(t *testing.T) map[string]bool {
	t.Helper()
	names := map[string]bool{}
	re := regexp.MustCompile(`(?:Name:\s*|NewDesc\(\s*)"([a-z_:][a-z0-9_:]*)"`)
	add := func(file string) {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllStringSubmatch(string(b), -1) {
			names[m[1]] = true
		}
	}
	for _, dir := range []string{"smtpgw", "deliverer", "spool", "controllers", "cmd/jetmail", "policy"} {
		files, _ := filepath.Glob(filepath.Join("..", dir, "*.go"))
		for _, f := range files {
			if !strings.HasSuffix(f, "_test.go") {
				add(f)
			}
		}
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goBin, "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/controller-runtime")
	cmd.Dir = ".."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -m sigs.k8s.io/controller-runtime: %v", err)
	}
	add(filepath.Join(strings.TrimSpace(string(out)), "pkg", "internal", "controller", "metrics", "metrics.go"))
	for _, must := range []string{"jetmail_smtp_connections_open", "jetmail_queue_messages", "jetmail_config_revision",
		"jetmail_cluster_queue_messages", "controller_runtime_reconcile_total"} {
		if !names[must] {
			t.Fatalf("metric %s not found in the source (found %d names): the reader is broken", must, len(names))
		}
	}
	return names
}

// notFromCode are the series the alerts and the dashboard use that jetmail
// does not export itself.
var notFromCode = map[string]string{
	"up": "Prometheus, per scrape target",
	"kube_deployment_status_replicas_unavailable": "kube-state-metrics",
}

// tokenRE finds metric names in the text of annotations (not PromQL).
var tokenRE = regexp.MustCompile(`\b(jetmail|controller_runtime)_[a-z0-9_]+`)

// promQL is Prometheus's own PromQL parser, with its default functions.
var promQL = parser.NewParser(parser.Options{})

// metricRoles maps each jetmail_ metric to the components that export it,
// read from the catalogue docs/metrics.md (which cmd/jetmail's
// TestMetricsCatalogueMatchesWhatTheRolesRegister checks against the
// code); controller-runtime's metrics are the controller's.
func metricRoles(t *testing.T) map[string][]string {
	t.Helper()
	doc, err := os.ReadFile(filepath.Join("..", "docs", "metrics.md"))
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("^\\| `(jetmail_[a-z_]+)` \\| [a-z]+ \\|[^|]*\\| ([a-z, ]+) \\|")
	roles := map[string][]string{}
	for _, line := range strings.Split(string(doc), "\n") {
		if m := row.FindStringSubmatch(line); m != nil {
			for _, r := range strings.Split(m[2], ",") {
				roles[m[1]] = append(roles[m[1]], strings.TrimSpace(r))
			}
		}
	}
	if len(roles) < 20 || !slices.Contains(roles["jetmail_cluster_queue_messages"], "controller") {
		t.Fatalf("read %d metrics from docs/metrics.md: the table's format changed?", len(roles))
	}
	return roles
}

// selected is one series selector of a parsed expression.
type selected struct {
	name string
	vs   *parser.VectorSelector
}

// selectors parses expr with the PromQL parser and returns its series
// selectors, from the syntax tree.
func selectors(t *testing.T, where, expr string) ([]selected, parser.Expr) {
	t.Helper()
	e, err := promQL.ParseExpr(expr)
	if err != nil {
		t.Errorf("%s: PromQL parser: %v\n%s", where, err, expr)
		return nil, nil
	}
	var out []selected
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			out = append(out, selected{vs.Name, vs})
		}
		return nil
	})
	return out, e
}

// baseName is a metric's name without the suffix of a histogram's series.
func baseName(name string, exported map[string]bool) string {
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if b, ok := strings.CutSuffix(name, suf); ok && exported[b] {
			return b
		}
	}
	return name
}

// checkExpr checks one PromQL expression of an alert or a panel, parsed by
// Prometheus's parser: every series it selects (every VectorSelector of
// the syntax tree) is one the code exports, or a known outside one; every
// job matcher matches metrics Services of the chart, and only those of the
// components that export the metric; the namespace is the release's.
// vars replaces Grafana variables first. It returns the parsed expression
// (nil if it does not parse).
func checkExpr(t *testing.T, where, expr string, exported map[string]bool, roles map[string][]string, jobs []string, vars map[string]string) parser.Expr {
	t.Helper()
	for k, v := range vars {
		expr = strings.ReplaceAll(expr, k, v)
	}
	sels, e := selectors(t, where, expr)
	if e == nil {
		return nil
	}
	if len(sels) == 0 {
		t.Errorf("%s: selects no series: %s", where, expr)
	}
	for _, sel := range sels {
		name := sel.name
		if name == "" {
			t.Errorf("%s: a selector without a metric name: %s", where, sel.vs)
			continue
		}
		base := baseName(name, exported)
		if !exported[base] && notFromCode[name] == "" {
			t.Errorf("%s: metric %s is not exported by jetmail's code: %s", where, name, expr)
		}
		hasJob := false
		for _, m := range sel.vs.LabelMatchers {
			switch m.Name {
			case "job":
				hasJob = true
				var matched []string
				for _, j := range jobs {
					if m.Matches(j) {
						matched = append(matched, j)
					}
				}
				if len(matched) == 0 {
					t.Errorf("%s: %s matches none of the metrics Services %v", where, m, jobs)
				}
				if notFromCode[name] != "" {
					break
				}
				want := roles[base]
				if strings.HasPrefix(base, "controller_runtime_") {
					want = []string{"controller"}
				}
				for _, j := range matched {
					comp := strings.TrimSuffix(strings.TrimPrefix(j, release+"-jetmail-"), "-metrics")
					if !slices.Contains(want, comp) {
						t.Errorf("%s: %s selects %s of the %s, which does not export it (exported by %v)", where, m, name, comp, want)
					}
				}
			case "namespace":
				if m.Type != labels.MatchEqual || m.Value != namespace {
					t.Errorf("%s: %s, want namespace=%q", where, m, namespace)
				}
			}
		}
		if !hasJob && notFromCode[name] == "" {
			t.Errorf("%s: %s is selected without a job matcher (another release's series would count): %s", where, name, expr)
		}
	}
	return e
}

// groupsBy tells whether e aggregates metric by label somewhere (sum by
// (label) (... metric ...)), or selects it without aggregating it away.
func groupsBy(e parser.Expr, metric, label string) bool {
	found := false
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		agg, ok := n.(*parser.AggregateExpr)
		if !ok || found || agg.Without || !slices.Contains(agg.Grouping, label) {
			return nil
		}
		parser.Inspect(agg.Expr, func(n parser.Node, _ []parser.Node) error {
			if vs, ok := n.(*parser.VectorSelector); ok && vs.Name == metric {
				found = true
			}
			return nil
		})
		return nil
	})
	return found
}

func TestGatewayAutoscaling(t *testing.T) {
	m := index(t, render(t, "gateway.autoscaling.enabled=true", "gateway.autoscaling.minReplicas=3",
		"gateway.autoscaling.maxReplicas=12", "gateway.autoscaling.sessions.enabled=true",
		"gateway.autoscaling.sessions.averageValue=800",
		"gateway.autoscaling.behavior.scaleDown.stabilizationWindowSeconds=600"))
	if r := getDeployment(t, m, "gateway").Replicas; r != -1 {
		t.Errorf("autoscaled gateway Deployment sets replicas: %d (it would fight the HPA on every upgrade)", r)
	}
	if r := getDeployment(t, m, "deliverer").Replicas; r != 2 {
		t.Errorf("deliverer replicas %d, want 2 (not autoscaled)", r)
	}
	h := getHPA(t, m, "jm-jetmail-gateway")
	checkScaleTarget(t, m, h.ScaleTargetRef, "gateway")
	if h.MinReplicas != 3 || h.MaxReplicas != 12 {
		t.Errorf("replicas %d-%d, want 3-12", h.MinReplicas, h.MaxReplicas)
	}
	if len(h.Metrics) != 2 {
		t.Fatalf("metrics %+v, want CPU and sessions", h.Metrics)
	}
	if r := h.Metrics[0].Resource; h.Metrics[0].Type != "Resource" || r == nil || r.Name != "cpu" ||
		r.Target.Type != "Utilization" || r.Target.AverageUtilization != 70 {
		t.Errorf("first metric %+v, want cpu Utilization 70", h.Metrics[0])
	}
	p := h.Metrics[1].Pods
	if h.Metrics[1].Type != "Pods" || p == nil || p.Metric.Name != "jetmail_smtp_connections_open" ||
		p.Target.Type != "AverageValue" || p.Target.AverageValue != "800" {
		t.Errorf("second metric %+v, want Pods jetmail_smtp_connections_open AverageValue 800", h.Metrics[1])
	}
	// The Pods metric is the gateway's own gauge of open sessions.
	if !codeMetrics(t)["jetmail_smtp_connections_open"] {
		t.Error("jetmail_smtp_connections_open is not a metric of the code")
	}
	if got := fmt.Sprint(h.Behavior["scaleDown"]); got != "map[stabilizationWindowSeconds:600]" {
		t.Errorf("behavior.scaleDown %s", got)
	}
	if l := m.get(t, "HorizontalPodAutoscaler", "jm-jetmail-gateway").GetLabels(); l["app.kubernetes.io/component"] != "gateway" {
		t.Errorf("HPA labels %v", l)
	}

	t.Run("cpu only", func(t *testing.T) {
		h := getHPA(t, index(t, render(t, "gateway.autoscaling.enabled=true")), "jm-jetmail-gateway")
		if len(h.Metrics) != 1 || h.Metrics[0].Type != "Resource" || h.MinReplicas != 2 || h.MaxReplicas != 10 {
			t.Errorf("defaults: %+v", h)
		}
	})
	t.Run("sessions only", func(t *testing.T) {
		m := index(t, render(t, "gateway.autoscaling.enabled=true", "gateway.autoscaling.targetCPUUtilizationPercentage=0",
			"gateway.autoscaling.sessions.enabled=true", "gateway.resources.requests.cpu=null"))
		h := getHPA(t, m, "jm-jetmail-gateway")
		if len(h.Metrics) != 1 || h.Metrics[0].Pods == nil || h.Metrics[0].Pods.Target.AverageValue != "1000" {
			t.Errorf("metrics %+v, want only the sessions metric at 1000", h.Metrics)
		}
	})
	t.Run("mistakes", func(t *testing.T) {
		renderFails(t, []string{"gateway.autoscaling.enabled=true", "gateway.autoscaling.targetCPUUtilizationPercentage=0"},
			"gateway.autoscaling.enabled needs a metric")
		renderFails(t, []string{"gateway.autoscaling.enabled=true", "gateway.autoscaling.minReplicas=5", "gateway.autoscaling.maxReplicas=3"},
			"gateway.autoscaling.minReplicas (5) is greater than gateway.autoscaling.maxReplicas (3)")
		renderFails(t, []string{"gateway.autoscaling.enabled=true", "gateway.resources.requests.cpu=null"},
			"set gateway.resources.requests.cpu")
	})
}

func TestDelivererAutoscaling(t *testing.T) {
	t.Run("keda", func(t *testing.T) {
		m := index(t, render(t, "deliverer.autoscaling.keda.enabled=true",
			"deliverer.autoscaling.keda.natsServerMonitoringEndpoint=nats.nats.svc:8222",
			"deliverer.autoscaling.keda.activationLagThreshold=5", "deliverer.autoscaling.minReplicas=1",
			"deliverer.autoscaling.maxReplicas=20", "deliverer.autoscaling.behavior.scaleDown.stabilizationWindowSeconds=900"))
		if r := getDeployment(t, m, "deliverer").Replicas; r != -1 {
			t.Errorf("autoscaled deliverer Deployment sets replicas: %d", r)
		}
		if r := getDeployment(t, m, "gateway").Replicas; r != 2 {
			t.Errorf("gateway replicas %d, want 2 (not autoscaled)", r)
		}
		if n := m.kinds("HorizontalPodAutoscaler"); len(n) != 0 {
			t.Errorf("HPAs %v next to the ScaledObject (KEDA makes its own)", n)
		}
		so := m.get(t, "ScaledObject", "jm-jetmail-deliverer")
		if so.GetAPIVersion() != "keda.sh/v1alpha1" || so.GetNamespace() != namespace {
			t.Errorf("ScaledObject %s in %q", so.GetAPIVersion(), so.GetNamespace())
		}
		type scaledObjectSpec struct {
			ScaleTargetRef  scaleTargetRef `json:"scaleTargetRef"`
			MinReplicaCount int            `json:"minReplicaCount"`
			MaxReplicaCount int            `json:"maxReplicaCount"`
			PollingInterval int            `json:"pollingInterval"`
			Advanced        struct {
				HorizontalPodAutoscalerConfig struct {
					Behavior map[string]any `json:"behavior"`
				} `json:"horizontalPodAutoscalerConfig"`
			} `json:"advanced"`
			Triggers []struct {
				Type              string            `json:"type"`
				Metadata          map[string]string `json:"metadata"`
				AuthenticationRef *struct {
					Name string `json:"name"`
				} `json:"authenticationRef"`
			} `json:"triggers"`
		}
		spec := field[scaledObjectSpec](t, so, "spec")
		checkScaleTarget(t, m, spec.ScaleTargetRef, "deliverer")
		if spec.MinReplicaCount != 1 || spec.MaxReplicaCount != 20 || spec.PollingInterval != 30 {
			t.Errorf("replicas %d-%d every %ds, want 1-20 every 30s", spec.MinReplicaCount, spec.MaxReplicaCount, spec.PollingInterval)
		}
		if got := fmt.Sprint(spec.Advanced.HorizontalPodAutoscalerConfig.Behavior["scaleDown"]); got != "map[stabilizationWindowSeconds:900]" {
			t.Errorf("behavior.scaleDown %s", got)
		}
		if len(spec.Triggers) != 1 || spec.Triggers[0].Type != "nats-jetstream" {
			t.Fatalf("triggers %+v, want one nats-jetstream", spec.Triggers)
		}
		want := map[string]string{
			"natsServerMonitoringEndpoint": "nats.nats.svc:8222",
			"account":                      "$G",
			"stream":                       spool.QueueStream,
			"consumer":                     spool.DeliveryConsumerName,
			"lagThreshold":                 "200",
			"activationLagThreshold":       "5",
			"useHttps":                     "false",
		}
		if got := spec.Triggers[0].Metadata; !reflect.DeepEqual(got, want) {
			t.Errorf("trigger metadata\n got %v\nwant %v", got, want)
		}
		if spec.Triggers[0].AuthenticationRef != nil {
			t.Errorf("authenticationRef %+v without authenticationRef set", spec.Triggers[0].AuthenticationRef)
		}

		// Defaults: no activation threshold; a TriggerAuthentication may
		// supply the endpoint instead.
		m = index(t, render(t, "deliverer.autoscaling.keda.enabled=true", "deliverer.autoscaling.keda.authenticationRef=nats-monitor"))
		so = m.get(t, "ScaledObject", "jm-jetmail-deliverer")
		trig := field[[]map[string]any](t, so, "spec", "triggers")[0]
		md := trig["metadata"].(map[string]any)
		if _, ok := md["activationLagThreshold"]; ok {
			t.Errorf("activationLagThreshold rendered without being set: %v", md)
		}
		if _, ok := md["natsServerMonitoringEndpoint"]; ok {
			t.Errorf("empty endpoint rendered: %v", md)
		}
		if fmt.Sprint(trig["authenticationRef"]) != "map[name:nats-monitor]" {
			t.Errorf("authenticationRef %v", trig["authenticationRef"])
		}
		if field[int](t, so, "spec", "minReplicaCount") != 2 {
			t.Error("default minReplicaCount is not 2")
		}
	})

	t.Run("external metric", func(t *testing.T) {
		m := index(t, render(t, "deliverer.autoscaling.external.enabled=true",
			"deliverer.autoscaling.external.metricName=jetmail_queue_messages",
			"deliverer.autoscaling.external.metricSelector.namespace="+namespace,
			"deliverer.autoscaling.external.averageValue=500"))
		if r := getDeployment(t, m, "deliverer").Replicas; r != -1 {
			t.Errorf("autoscaled deliverer Deployment sets replicas: %d", r)
		}
		if n := m.kinds("ScaledObject"); len(n) != 0 {
			t.Errorf("ScaledObjects %v with only the external HPA on", n)
		}
		h := getHPA(t, m, "jm-jetmail-deliverer")
		checkScaleTarget(t, m, h.ScaleTargetRef, "deliverer")
		if h.MinReplicas != 2 || h.MaxReplicas != 10 {
			t.Errorf("replicas %d-%d, want 2-10", h.MinReplicas, h.MaxReplicas)
		}
		if len(h.Metrics) != 1 || h.Metrics[0].Type != "External" || h.Metrics[0].External == nil {
			t.Fatalf("metrics %+v, want one External", h.Metrics)
		}
		e := h.Metrics[0].External
		if e.Metric.Name != "jetmail_queue_messages" || e.Metric.Selector == nil ||
			!reflect.DeepEqual(e.Metric.Selector.MatchLabels, map[string]string{"namespace": namespace}) ||
			e.Target.Type != "AverageValue" || e.Target.AverageValue != "500" {
			t.Errorf("external metric %+v", e)
		}
		// Without a selector, none is rendered.
		h = getHPA(t, index(t, render(t, "deliverer.autoscaling.external.enabled=true",
			"deliverer.autoscaling.external.metricName=nats_consumer_num_pending")), "jm-jetmail-deliverer")
		if h.Metrics[0].External.Metric.Selector != nil || h.Metrics[0].External.Target.AverageValue != "200" {
			t.Errorf("defaults: %+v", h.Metrics[0].External)
		}
	})

	t.Run("mistakes", func(t *testing.T) {
		renderFails(t, []string{"deliverer.autoscaling.keda.enabled=true", "deliverer.autoscaling.keda.natsServerMonitoringEndpoint=nats:8222",
			"deliverer.autoscaling.external.enabled=true", "deliverer.autoscaling.external.metricName=x"},
			"deliverer.autoscaling.keda.enabled and deliverer.autoscaling.external.enabled are mutually exclusive")
		renderFails(t, []string{"deliverer.autoscaling.keda.enabled=true"},
			"deliverer.autoscaling.keda.natsServerMonitoringEndpoint is required")
		renderFails(t, []string{"deliverer.autoscaling.external.enabled=true"},
			"deliverer.autoscaling.external.metricName is required")
		renderFails(t, []string{"deliverer.autoscaling.external.enabled=true", "deliverer.autoscaling.external.metricName=x",
			"deliverer.autoscaling.minReplicas=4", "deliverer.autoscaling.maxReplicas=3"},
			"deliverer.autoscaling.minReplicas (4) is greater than deliverer.autoscaling.maxReplicas (3)")
	})
}

// metricsJobs are the Prometheus jobs of the rendered metrics Services.
func metricsJobs(t *testing.T, m manifest) []string {
	t.Helper()
	var jobs []string
	for _, name := range m.kinds("Service") {
		if m.get(t, "Service", name).GetLabels()["jetmail.io/metrics"] == "true" {
			jobs = append(jobs, name)
		}
	}
	if len(jobs) != 3 {
		t.Fatalf("metrics Services %v, want 3", jobs)
	}
	return jobs
}

func TestServiceMonitors(t *testing.T) {
	m := index(t, render(t, "serviceMonitor.enabled=true", "serviceMonitor.components.controller=false",
		"serviceMonitor.labels.release=prom", "serviceMonitor.scrapeTimeout=10s"))
	checkServiceMonitors(t, m, "gateway", "deliverer")
	checkMetricsServices(t, m)
	for _, name := range m.kinds("ServiceMonitor") {
		sm := m.get(t, "ServiceMonitor", name)
		if sm.GetLabels()["release"] != "prom" {
			t.Errorf("%s labels %v lack release=prom", name, sm.GetLabels())
		}
		if ep := field[[]map[string]any](t, sm, "spec", "endpoints")[0]; ep["interval"] != "30s" || ep["scrapeTimeout"] != "10s" {
			t.Errorf("%s endpoint %v", name, ep)
		}
	}
	renderFails(t, []string{"serviceMonitor.enabled=true", "metrics.service.enabled=false"},
		"serviceMonitor.enabled needs metrics.service.enabled")
	if n := index(t, render(t, "metrics.service.enabled=false")).kinds("Service"); !reflect.DeepEqual(n, []string{"jm-jetmail"}) {
		t.Errorf("metrics.service.enabled=false: Services %v", n)
	}
}

// parseRules hands the rendered PrometheusRule's groups to Prometheus's
// own rule file parser (rulefmt: unknown fields, durations, label names,
// annotation templates, each expression through the PromQL parser).
func parseRules(t *testing.T, pr *unstructured.Unstructured) *rulefmt.RuleGroups {
	t.Helper()
	groups, ok, err := unstructured.NestedSlice(pr.Object, "spec", "groups")
	if err != nil || !ok {
		t.Fatalf("spec.groups: %v (found %v)", err, ok)
	}
	file, err := yaml.Marshal(map[string]any{"groups": groups})
	if err != nil {
		t.Fatal(err)
	}
	rgs, errs := rulefmt.Parse(file, false, model.LegacyValidation, promQL, slog.New(slog.DiscardHandler))
	if len(errs) > 0 {
		t.Fatalf("Prometheus refuses the rules: %v\n%s", errors.Join(errs...), file)
	}
	return rgs
}

func TestPrometheusRule(t *testing.T) {
	m := index(t, render(t, "prometheusRule.enabled=true", "prometheusRule.labels.release=prom",
		"prometheusRule.alertLabels.team=mail", "prometheusRule.disabled={JetmailPodsUnavailable}",
		"prometheusRule.extraRules[0].alert=SiteSpecific", "prometheusRule.extraRules[0].expr=vector(1)",
		"prometheusRule.thresholds.tempfailRatio=0.02", "prometheusRule.thresholds.queueGrowingFor=45m",
		"prometheusRule.thresholds.oldestMessageAgeSeconds=7200"))
	pr := m.get(t, "PrometheusRule", "jm-jetmail")
	if pr.GetAPIVersion() != "monitoring.coreos.com/v1" || pr.GetNamespace() != namespace || pr.GetLabels()["release"] != "prom" {
		t.Errorf("PrometheusRule %s in %q, labels %v", pr.GetAPIVersion(), pr.GetNamespace(), pr.GetLabels())
	}
	groups := parseRules(t, pr).Groups
	if len(groups) != 1 {
		t.Fatalf("%d groups", len(groups))
	}
	var names []string
	rules := map[string]rulefmt.Rule{}
	for _, r := range groups[0].Rules {
		names = append(names, r.Alert)
		rules[r.Alert] = r
	}
	want := []string{"JetmailQueueAcceptanceFailing", "JetmailGatewayJetStreamUnreachable", "JetmailQueueGrowing",
		"JetmailQueueOldestMessage", "JetmailDeliveryFailureRatioHigh", "JetmailDeliveriesDeferredHigh", "JetmailSMTPDeadlineKills",
		"JetmailDeliveryDeadlineKills", "JetmailDeliveryOutcomeNotRecorded", "JetmailDeliveryStalled", "JetmailConfigRevisionLagging", "JetmailTargetDown", "SiteSpecific"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("alerts\n got %v\nwant %v", names, want)
	}
	exported := codeMetrics(t)
	roles := metricRoles(t)
	jobs := metricsJobs(t, index(t, render(t)))
	exprs := map[string]parser.Expr{}
	for _, r := range groups[0].Rules[:len(groups[0].Rules)-1] {
		if sev := r.Labels["severity"]; sev != "critical" && sev != "warning" {
			t.Errorf("%s severity %q", r.Alert, sev)
		}
		if r.Labels["team"] != "mail" {
			t.Errorf("%s labels %v lack alertLabels", r.Alert, r.Labels)
		}
		if r.For == 0 || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
			t.Errorf("%s: for %v, annotations %v", r.Alert, r.For, r.Annotations)
		}
		exprs[r.Alert] = checkExpr(t, r.Alert, r.Expr, exported, roles, jobs, nil)
		for _, a := range r.Annotations {
			for _, tok := range tokenRE.FindAllString(a, -1) {
				if !exported[tok] {
					t.Errorf("%s: the annotation names %s, not a metric of the code", r.Alert, tok)
				}
			}
		}
	}
	// The label values the alerts select on are the code's.
	src := sourceText(t, "smtpgw", "deliverer", "spool", "controllers")
	for _, v := range []string{"queued", "duplicate", "tempfail", "deferred", "failed", "held"} {
		if !strings.Contains(src, `"`+v+`"`) {
			t.Errorf("result or state %q is not a value the code uses", v)
		}
	}
	for _, c := range []struct{ alert, want string }{
		{"JetmailQueueAcceptanceFailing", "> 0.02"},
		{"JetmailDeliveriesDeferredHigh", "> 0.5"},
		{"JetmailDeliveryFailureRatioHigh", `result="failed"`},
		{"JetmailDeliveryFailureRatioHigh", "> 0.2"},
		{"JetmailDeliveryStalled", "[3h]"},
		{"JetmailQueueGrowing", `deriv(jetmail_cluster_queue_messages{job="jm-jetmail-controller-metrics"`},
		{"JetmailQueueGrowing", "[15m]"},
		{"JetmailQueueGrowing", "> 1000"},
		{"JetmailQueueOldestMessage", "> 7200"},
		{"JetmailGatewayJetStreamUnreachable", `jetmail_nats_connected{job="jm-jetmail-gateway-metrics"`},
		{"JetmailConfigRevisionLagging", `jetmail_config_revision{job=~"jm-jetmail-gateway-metrics|jm-jetmail-deliverer-metrics"`},
		{"JetmailTargetDown", `job=~"jm-jetmail-(gateway|deliverer|controller)-metrics"`},
	} {
		if !strings.Contains(rules[c.alert].Expr, c.want) {
			t.Errorf("%s expr lacks %q:\n%s", c.alert, c.want, rules[c.alert].Expr)
		}
	}
	if d := time.Duration(rules["JetmailQueueGrowing"].For); d != 45*time.Minute {
		t.Errorf("JetmailQueueGrowing for %s, want the 45m set", d)
	}
	if d := time.Duration(rules["JetmailGatewayJetStreamUnreachable"].For); d != 2*time.Minute {
		t.Errorf("JetmailGatewayJetStreamUnreachable for %s, want the default 2m", d)
	}
	// The queue alerts read the cluster gauges the leading controller
	// exports, not the per-deliverer copies.
	for _, a := range []string{"JetmailQueueGrowing", "JetmailQueueOldestMessage"} {
		sels, _ := selectors(t, a, rules[a].Expr)
		for _, sel := range sels {
			if !strings.HasPrefix(sel.name, "jetmail_cluster_") {
				t.Errorf("%s selects %s, not a cluster gauge", a, sel.name)
			}
		}
	}

	// Every alert, with kube-state-metrics' too.
	all := parseRules(t, index(t, render(t, "prometheusRule.enabled=true")).get(t, "PrometheusRule", "jm-jetmail")).Groups[0].Rules
	last := all[len(all)-1]
	if len(all) != 13 || last.Alert != "JetmailPodsUnavailable" {
		t.Fatalf("default rules %d, last %q", len(all), last.Alert)
	}
	checkExpr(t, last.Alert, last.Expr, exported, roles, jobs, nil)
	// Its deployment matcher selects exactly the chart's Deployments.
	sels, _ := selectors(t, last.Alert, last.Expr)
	var dm *labels.Matcher
	for _, mt := range sels[0].vs.LabelMatchers {
		if mt.Name == "deployment" {
			dm = mt
		}
	}
	if dm == nil {
		t.Fatalf("JetmailPodsUnavailable has no deployment matcher: %s", last.Expr)
	}
	deployments := index(t, render(t, "prometheusRule.enabled=true")).kinds("Deployment")
	for _, d := range deployments {
		if !dm.Matches(d) {
			t.Errorf("JetmailPodsUnavailable's %s misses Deployment %s", dm, d)
		}
	}
	if dm.Matches("jm-jetmail-nats") || dm.Matches("other-gateway") {
		t.Errorf("%s selects too much", dm)
	}
	// Every alert can be turned off by name, as the schema lists them.
	off := "prometheusRule.disabled={" + strings.Join(func() []string {
		var n []string
		for _, r := range all {
			n = append(n, r.Alert)
		}
		return n
	}(), ",") + "}"
	if n := len(parseRules(t, index(t, render(t, "prometheusRule.enabled=true", off)).get(t, "PrometheusRule", "jm-jetmail")).Groups[0].Rules); n != 0 {
		t.Errorf("with every alert disabled, %d rules remain", n)
	}
}

// sourceText is the non-test Go source of the given packages.
func sourceText(t *testing.T, dirs ...string) string {
	t.Helper()
	var b strings.Builder
	for _, dir := range dirs {
		files, _ := filepath.Glob(filepath.Join("..", dir, "*.go"))
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			b.Write(data)
		}
	}
	return b.String()
}

func TestGrafanaDashboard(t *testing.T) {
	m := index(t, render(t, "grafanaDashboard.enabled=true", "grafanaDashboard.annotations.grafana_folder=Mail"))
	cm := m.get(t, "ConfigMap", "jm-jetmail-dashboard")
	if cm.GetLabels()["grafana_dashboard"] != "1" || cm.GetAnnotations()["grafana_folder"] != "Mail" || cm.GetNamespace() != namespace {
		t.Errorf("ConfigMap labels %v annotations %v namespace %q", cm.GetLabels(), cm.GetAnnotations(), cm.GetNamespace())
	}
	file, err := os.ReadFile(filepath.Join(chartDir, "dashboards", "jetmail.json"))
	if err != nil {
		t.Fatal(err)
	}
	data := field[map[string]string](t, cm, "data")
	if len(data) != 1 || data["jetmail.json"] != string(file) {
		t.Fatalf("ConfigMap data is not dashboards/jetmail.json (keys %v)", slices.Sorted(maps.Keys(data)))
	}
	var dash struct {
		UID        string `json:"uid"`
		Title      string `json:"title"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Type  string `json:"type"`
				Regex string `json:"regex"`
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			ID      int    `json:"id"`
			Type    string `json:"type"`
			Title   string `json:"title"`
			GridPos struct {
				X int `json:"x"`
				W int `json:"w"`
			} `json:"gridPos"`
			Targets []struct {
				Expr  string `json:"expr"`
				RefID string `json:"refId"`
			} `json:"targets"`
		} `json:"panels"`
	}
	dec := json.NewDecoder(bytes.NewReader(file))
	if err := dec.Decode(&dash); err != nil {
		t.Fatalf("dashboards/jetmail.json: %v", err)
	}
	if dash.UID == "" || dash.Title == "" {
		t.Errorf("uid %q title %q", dash.UID, dash.Title)
	}
	// $jetmail is the chart's full name, cut from the job of a metrics
	// Service by the variable's regex.
	jobs := metricsJobs(t, index(t, render(t)))
	vars := map[string]string{}
	for _, v := range dash.Templating.List {
		vars[v.Name] = v.Regex
	}
	for _, v := range []string{"datasource", "namespace", "jetmail"} {
		if _, ok := vars[v]; !ok {
			t.Errorf("no dashboard variable %s", v)
		}
	}
	re := regexp.MustCompile(strings.TrimSuffix(strings.TrimPrefix(vars["jetmail"], "/"), "/"))
	for _, j := range jobs {
		if mt := re.FindStringSubmatch(j); j != "jm-jetmail-controller-metrics" && (mt == nil || mt[1] != "jm-jetmail") {
			t.Errorf("the jetmail variable's regex %s makes %v of job %s, want jm-jetmail", re, mt, j)
		}
	}
	exported := codeMetrics(t)
	roles := metricRoles(t)
	// Grafana's variables, replaced as Grafana would before the query
	// reaches Prometheus: the dashboard's own and the built-in intervals.
	gvars := map[string]string{"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h",
		"${jetmail}": "jm-jetmail", "$jetmail": "jm-jetmail", "${namespace}": namespace, "$namespace": namespace}
	type query struct {
		panel string
		expr  parser.Expr
	}
	var parsed []query
	ids := map[int]bool{}
	titles := map[string]bool{}
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		if titles[p.Title] {
			t.Errorf("panel title %q twice", p.Title)
		}
		titles[p.Title] = true
		if p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q is wider than the dashboard", p.Title)
		}
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			expr := q.Expr
			for _, k := range slices.Sorted(maps.Keys(gvars)) {
				expr = strings.ReplaceAll(expr, k, gvars[k])
			}
			if strings.Contains(expr, "$") {
				t.Errorf("panel %q: a Grafana variable the test does not know: %s", p.Title, q.Expr)
				continue
			}
			if e := checkExpr(t, "panel "+p.Title, expr, exported, roles, jobs, nil); e != nil {
				parsed = append(parsed, query{p.Title, e})
			}
		}
	}
	if len(parsed) < 25 {
		t.Errorf("only %d queries parsed", len(parsed))
	}
	// The panels an operator needs, found by what their queries select
	// (from the parsed queries), and by which label they break it down.
	for _, need := range []struct {
		what, metric, by string
	}{
		{"intake (mail queued)", "jetmail_smtp_transactions_total", ""},
		{"delivery rate by result", "jetmail_delivery_attempts_total", "result"},
		{"deferral reasons", "jetmail_delivery_deferrals_total", "class"},
		{"queue depth by state", "jetmail_cluster_queue_messages", "state"},
		{"queue age", "jetmail_cluster_queue_oldest_message_age_seconds", ""},
		{"queue storage", "jetmail_cluster_queue_bytes", "stream"},
		{"inbound deadline kills", "jetmail_smtp_deadline_kills_total", "reason"},
		{"outbound deadline kills", "jetmail_delivery_deadline_kills_total", ""},
		{"duplicates suppressed", "jetmail_smtp_duplicates_suppressed_total", ""},
		{"configuration revision per pod", "jetmail_config_revision", ""},
		{"NATS connection per pod", "jetmail_nats_connected", "pod"},
	} {
		var found []string
		for _, q := range parsed {
			sels := 0
			parser.Inspect(q.expr, func(n parser.Node, _ []parser.Node) error {
				if vs, ok := n.(*parser.VectorSelector); ok && vs.Name == need.metric {
					sels++
				}
				return nil
			})
			if sels > 0 && (need.by == "" || groupsBy(q.expr, need.metric, need.by)) {
				found = append(found, q.panel)
			}
		}
		if len(found) == 0 {
			t.Errorf("no panel shows %s (%s by %q)", need.what, need.metric, need.by)
		}
	}
	// The configuration revision is shown per pod: not aggregated away.
	for _, q := range parsed {
		if q.panel == "Configuration revision per pod" {
			if _, ok := q.expr.(*parser.VectorSelector); !ok {
				t.Errorf("panel %q aggregates the revisions: %s", q.panel, q.expr)
			}
		}
	}
	for _, title := range []string{"Intake: mail queued / s", "Delivery attempts by result", "Deferrals by class", "Queue by state",
		"Oldest message age", "Sessions cut off", "Outbound sessions cut off", "Duplicates suppressed", "Configuration revision per pod"} {
		if !titles[title] {
			t.Errorf("no panel %q", title)
		}
	}

	// Into the namespace the sidecar watches.
	cm = index(t, render(t, "grafanaDashboard.enabled=true", "grafanaDashboard.namespace=monitoring")).get(t, "ConfigMap", "jm-jetmail-dashboard")
	if cm.GetNamespace() != "monitoring" {
		t.Errorf("namespace %q", cm.GetNamespace())
	}
}

func TestEmbeddedNATS(t *testing.T) {
	m := index(t, renderNoURL(t, "nats.embedded.enabled=true", "nats.replicas=1"))
	svc := m.get(t, "Service", "jm-jetmail-nats")
	url := fmt.Sprintf("nats://%s.%s.svc:4222", svc.GetName(), namespace)
	for _, comp := range []string{"gateway", "deliverer", "controller"} {
		args := getDeployment(t, m, comp).Pod.Containers[0].Args
		if !slices.Contains(args, "--nats-url="+url) || !slices.Contains(args, "--replicas=1") {
			t.Errorf("%s args %q lack --nats-url=%s and --replicas=1", comp, args, url)
		}
	}

	sts := m.get(t, "StatefulSet", "jm-jetmail-nats")
	type statefulSetSpec struct {
		Replicas    int    `json:"replicas"`
		ServiceName string `json:"serviceName"`
		Selector    struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Template struct {
			Metadata struct {
				Labels      map[string]string `json:"labels"`
				Annotations map[string]string `json:"annotations"`
			} `json:"metadata"`
			Spec podSpec `json:"spec"`
		} `json:"template"`
		VolumeClaimTemplates []struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
			Spec struct {
				Resources struct {
					Requests map[string]string `json:"requests"`
				} `json:"resources"`
			} `json:"spec"`
		} `json:"volumeClaimTemplates"`
	}
	spec := field[statefulSetSpec](t, sts, "spec")
	if spec.Replicas != 1 || spec.ServiceName != svc.GetName() {
		t.Errorf("replicas %d serviceName %q", spec.Replicas, spec.ServiceName)
	}
	for k, v := range spec.Selector.MatchLabels {
		if spec.Template.Metadata.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod labels", k, v)
		}
	}
	c := spec.Template.Spec.Containers[0]
	if c.Image != "nats:2.15.2-alpine" || !reflect.DeepEqual(c.Args, []string{"--config", "/etc/nats/nats.conf"}) {
		t.Errorf("image %q args %q", c.Image, c.Args)
	}
	checkPort(t, "nats", c, "client", 4222)
	checkPort(t, "nats", c, "monitor", 8222)
	checkSecure(t, "nats", spec.Template.Spec)
	if a := spec.Template.Spec.AutomountServiceAccountToken; a == nil || *a {
		t.Error("the NATS pod gets a Kubernetes API token it does not need")
	}
	if len(spec.VolumeClaimTemplates) != 1 || spec.VolumeClaimTemplates[0].Metadata.Name != "data" ||
		spec.VolumeClaimTemplates[0].Spec.Resources.Requests["storage"] != "2Gi" {
		t.Errorf("volumeClaimTemplates %+v, want data of 2Gi", spec.VolumeClaimTemplates)
	}
	mounts := map[string]string{}
	for _, vm := range c.VolumeMounts {
		mounts[vm.Name] = vm.MountPath
	}
	if mounts["data"] != "/data" || mounts["config"] != "/etc/nats" {
		t.Errorf("mounts %v", mounts)
	}

	// The Service reaches the NATS pod and only it; no jetmail Service
	// reaches it.
	selects := func(sel, labels map[string]string) bool {
		for k, v := range sel {
			if labels[k] != v {
				return false
			}
		}
		return true
	}
	if sel := field[map[string]string](t, svc, "spec", "selector"); !selects(sel, spec.Template.Metadata.Labels) {
		t.Errorf("Service selector %v misses the NATS pod %v", sel, spec.Template.Metadata.Labels)
	} else {
		for _, comp := range []string{"gateway", "deliverer", "controller"} {
			if selects(sel, getDeployment(t, m, comp).Labels) {
				t.Errorf("NATS Service selects the %s pods", comp)
			}
		}
	}
	for _, name := range m.kinds("Service") {
		if name != svc.GetName() && selects(field[map[string]string](t, m.get(t, "Service", name), "spec", "selector"), spec.Template.Metadata.Labels) {
			t.Errorf("Service %s selects the NATS pod", name)
		}
	}
	ports := map[string]string{}
	for _, p := range field[[]map[string]any](t, svc, "spec", "ports") {
		ports[fmt.Sprint(p["port"])] = fmt.Sprint(p["targetPort"])
	}
	if !reflect.DeepEqual(ports, map[string]string{"4222": "client", "8222": "monitor"}) {
		t.Errorf("Service ports %v", ports)
	}

	// The configuration: the checksum follows it, and the real nats-server
	// (the version jetmail's tests use) reads it, runs JetStream and answers
	// the probes' paths.
	conf := field[map[string]string](t, m.get(t, "ConfigMap", "jm-jetmail-nats"), "data")["nats.conf"]
	sum := sha256.Sum256([]byte(strings.TrimSuffix(conf, "\n")))
	if got := spec.Template.Metadata.Annotations["checksum/config"]; got != hex.EncodeToString(sum[:]) {
		t.Errorf("checksum/config %q is not the configuration's", got)
	}
	checkNATSConf(t, conf, c)

	t.Run("emptyDir", func(t *testing.T) {
		m := index(t, renderNoURL(t, "nats.embedded.enabled=true", "nats.replicas=1",
			"nats.embedded.persistence.enabled=false", "nats.embedded.maxFileStore=1G"))
		sts := m.get(t, "StatefulSet", "jm-jetmail-nats")
		if _, found, _ := unstructured.NestedFieldNoCopy(sts.Object, "spec", "volumeClaimTemplates"); found {
			t.Error("volumeClaimTemplates without persistence")
		}
		vols := field[[]map[string]any](t, sts, "spec", "template", "spec", "volumes")
		found := false
		for _, v := range vols {
			if v["name"] == "data" && v["emptyDir"] != nil {
				found = true
			}
		}
		if !found {
			t.Errorf("volumes %v lack an emptyDir named data", vols)
		}
		conf := field[map[string]string](t, m.get(t, "ConfigMap", "jm-jetmail-nats"), "data")["nats.conf"]
		if !strings.Contains(conf, "max_file_store: 1G") {
			t.Errorf("nats.conf lacks max_file_store:\n%s", conf)
		}
		checkNATSConf(t, conf, field[podSpec](t, sts, "spec", "template", "spec").Containers[0])
	})

	t.Run("explicit url wins", func(t *testing.T) {
		m := index(t, render(t, "nats.embedded.enabled=true", "nats.replicas=1"))
		if args := getDeployment(t, m, "gateway").Pod.Containers[0].Args; !slices.Contains(args, "--nats-url="+natsURL) {
			t.Errorf("args %q lack the given nats.url", args)
		}
	})

	t.Run("keda reads the embedded monitoring port", func(t *testing.T) {
		m := index(t, renderNoURL(t, "nats.embedded.enabled=true", "nats.replicas=1", "deliverer.autoscaling.keda.enabled=true"))
		md := field[[]map[string]any](t, m.get(t, "ScaledObject", "jm-jetmail-deliverer"), "spec", "triggers")[0]["metadata"].(map[string]any)
		if want := fmt.Sprintf("%s.%s.svc:8222", svc.GetName(), namespace); md["natsServerMonitoringEndpoint"] != want {
			t.Errorf("endpoint %v, want %s", md["natsServerMonitoringEndpoint"], want)
		}
	})

	t.Run("replicas must be 1", func(t *testing.T) {
		_, stderr, err := helm(t, "template", release, chartDir, "--namespace", namespace, "--set", "nats.embedded.enabled=true")
		if err == nil || !strings.Contains(stderr, "nats.replicas is 3: set nats.replicas=1") {
			t.Errorf("embedded NATS with nats.replicas=3: %v\n%s", err, stderr)
		}
	})

	t.Run("off by default", func(t *testing.T) {
		m := index(t, render(t))
		if n := m.kinds("StatefulSet"); len(n) != 0 {
			t.Errorf("StatefulSets %v", n)
		}
	})
}

// checkNATSConf starts the real nats-server with the rendered configuration
// (its store in a temporary directory, its ports free ones on loopback) and
// asks the HTTP paths of the container's probes.
func checkNATSConf(t *testing.T, conf string, c container) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "nats.conf")
	if err := os.WriteFile(file, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	opts, err := natsserver.ProcessConfigFile(file)
	if err != nil {
		t.Fatalf("nats-server refuses the configuration: %v\n%s", err, conf)
	}
	if !opts.JetStream || opts.StoreDir != "/data" || opts.Port != 4222 || opts.HTTPPort != 8222 {
		t.Errorf("configuration: jetstream %v store %q port %d http %d", opts.JetStream, opts.StoreDir, opts.Port, opts.HTTPPort)
	}
	opts.StoreDir = t.TempDir()
	opts.Host, opts.HTTPHost = "127.0.0.1", "127.0.0.1"
	opts.Port, opts.HTTPPort = -1, -1
	opts.NoSigs = true
	s, err := natsserver.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	if !s.JetStreamEnabled() {
		t.Error("JetStream is off")
	}
	mon := s.MonitorAddr()
	for _, p := range []*probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
		if p == nil || p.HTTPGet.Port != "monitor" {
			t.Errorf("probe %+v is not an HTTP GET on the monitor port", p)
			continue
		}
		ok := false
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			resp, err := http.Get(fmt.Sprintf("http://%s%s", mon, p.HTTPGet.Path))
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					ok = true
					break
				}
			}
		}
		if !ok {
			t.Errorf("GET %s on the NATS monitoring port does not answer 200", p.HTTPGet.Path)
		}
	}
}
