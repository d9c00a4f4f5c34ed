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
	"bytes"
	"context"
	"encoding/json"
	"fmt"
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

	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"
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
	Replicas int
	Selector map[string]string
	Labels   map[string]string
	Pod      podSpec
}

func getDeployment(t *testing.T, m manifest, component string) deployment {
	t.Helper()
	o := m.get(t, "Deployment", release+"-jetmail-"+component)
	d := deployment{
		Replicas: field[int](t, o, "spec", "replicas"),
		Selector: field[map[string]string](t, o, "spec", "selector", "matchLabels"),
		Labels:   field[map[string]string](t, o, "spec", "template", "metadata", "labels"),
		Pod:      field[podSpec](t, o, "spec", "template", "spec"),
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
// component must have.
func checkHardened(t *testing.T, component string, d deployment) {
	t.Helper()
	p := d.Pod
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
	if c := p.Containers[0]; c.Image != "ghcr.io/jetmail/jetmail:0.1.0" {
		t.Errorf("%s: image %q, want the chart's appVersion tag", component, c.Image)
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
	for _, kind := range []string{"CustomResourceDefinition", "ServiceMonitor", "RelayPolicy", "MailRoute", "DeliveryPolicy", "ClusterRoleBinding"} {
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
			"--pod-name=$(POD_NAME)", "--delivery-grace=30s", "--log-format=json"}
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
		s := m.get(t, "Service", "jm-jetmail-metrics")
		ports := field[[]map[string]any](t, s, "spec", "ports")
		if len(ports) != 1 || ports[0]["targetPort"] != "metrics" {
			t.Errorf("ports %v, want one targeting the named port metrics", ports)
		}
		sel := field[map[string]string](t, s, "spec", "selector")
		for _, comp := range []string{"gateway", "deliverer", "controller"} {
			d := getDeployment(t, m, comp)
			for k, v := range sel {
				if d.Labels[k] != v {
					t.Errorf("selector %v misses the %s pods", sel, comp)
				}
			}
		}
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
	for _, arg := range []string{"--dns=10.0.0.10:53,10.0.0.11:53", "--hostname=mx1.example.org", "--replicas=1"} {
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
	sm := m.get(t, "ServiceMonitor", "jm-jetmail")
	if sm.GetAPIVersion() != "monitoring.coreos.com/v1" {
		t.Errorf("ServiceMonitor apiVersion %s", sm.GetAPIVersion())
	}
	eps := field[[]map[string]any](t, sm, "spec", "endpoints")
	if len(eps) != 1 || eps[0]["port"] != "metrics" {
		t.Errorf("ServiceMonitor endpoints %v", eps)
	}
	metricsLabels := m.get(t, "Service", "jm-jetmail-metrics").GetLabels()
	for k, v := range field[map[string]string](t, sm, "spec", "selector", "matchLabels") {
		if metricsLabels[k] != v {
			t.Errorf("ServiceMonitor selector %s=%s misses the metrics Service", k, v)
		}
	}
	for _, kind := range []string{"RelayPolicy", "DeliveryPolicy", "MailRoute"} {
		if len(m.kinds(kind)) != 1 {
			t.Errorf("samples: %s %v", kind, m.kinds(kind))
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
		CRDDirectoryPaths:     []string{filepath.Join(chartDir, "crds")},
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
		name string
		sets []string
	}{
		{"defaults", nil},
		{"all options", []string{"tls.secretName=smtp-tls", "gateway.proxyProtocol=true", "hostname=mx1.example.org",
			"deliverer.dns={10.0.0.10:53}", "samples.enabled=true", "samples.relayhost=smtp.provider.example:587",
			"service.type=NodePort", "service.nodePort=30025", "service.loadBalancerSourceRanges={192.0.2.0/24}",
			"service.ipFamilyPolicy=SingleStack", "gateway.podDisruptionBudget.minAvailable=50%",
			"controller.watchAllNamespaces=true", "imagePullSecrets[0].name=regcred", "image.digest=sha256:" + strings.Repeat("ab", 32),
			"gateway.topologySpreadConstraints[0].maxSkew=1",
			"gateway.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
			"gateway.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
			"gateway.topologySpreadConstraints[0].labelSelector.matchLabels.app\\.kubernetes\\.io/component=gateway",
			"gateway.preStopSleepSeconds=0", "deliverer.resources.limits.memory=512Mi"}},
		{"LoadBalancer with class", []string{"service.loadBalancerClass=example.com/lb", "service.externalTrafficPolicy=Cluster",
			"gateway.proxyProtocol=true", "metrics.service.enabled=false", "serviceAccount.create=false", "rbac.create=false",
			"controller.serviceAccount.create=false", "controller.replicas=1", "controller.leaderElect=false"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := render(t, tc.sets...)
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
// component must get past flag parsing and fail only on connecting to
// NATS, so a flag renamed in cmd/jetmail cannot leave the chart behind.
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
		{"defaults", nil, "connect to NATS at " + closed},
		{"options", []string{"gateway.proxyProtocol=true", "hostname=mx1.example.org", "deliverer.dns={10.0.0.10:53}",
			"controller.watchAllNamespaces=true", "logFormat=console"}, "connect to NATS at " + closed},
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
					// The kubelet expands $(POD_NAME) from the container's env.
					args = append(args, strings.ReplaceAll(a, "$(POD_NAME)", "jm-"+comp+"-0"))
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
				cancel()
				if err == nil || !strings.Contains(string(out), tc.want) {
					t.Errorf("%s %q: %v, want a failure naming %q:\n%s", comp, args, err, tc.want, out)
				}
			}
		})
	}
}
