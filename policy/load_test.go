package policy_test

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/policy"
)

var (
	hashOnce sync.Once
	hashes   map[string]string
)

// hashFor returns a cheap bcrypt hash of the password, made once per test binary.
func hashFor(t *testing.T, pass string) string {
	t.Helper()
	hashOnce.Do(func() {
		hashes = map[string]string{}
		for _, p := range []string{"s3cret", "hunter2", "colon:in:password"} {
			h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
			if err != nil {
				panic(err)
			}
			hashes[p] = string(h)
		}
	})
	h, ok := hashes[pass]
	if !ok {
		t.Fatalf("no hash prepared for %q", pass)
	}
	return h
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const relayDoc = `apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata:
  name: %s
  namespace: mail
spec:
  acceptedDomains: [%s]
`

func relayYAML(name, domain string) string {
	return strings.Replace(strings.Replace(relayDoc, "%s", name, 1), "%s", domain, 1)
}

func TestLoadFilesReadsEveryDocumentOfAMultiDocumentFile(t *testing.T) {
	dir := t.TempDir()
	f := writeFile(t, dir, "all.yaml", "# leading comment\n---\n"+relayYAML("one", "one.example")+
		"---\n"+relayYAML("two", "two.example")+"--- \r\n\n---\n# only a comment\n")
	objs, err := policy.LoadFiles([]string{f})
	if err != nil {
		t.Fatalf("LoadFiles: %v", err)
	}
	if len(objs.RelayPolicies) != 2 || objs.RelayPolicies[0].Name != "one" || objs.RelayPolicies[1].Name != "two" {
		t.Fatalf("loaded %+v; want RelayPolicies one and two in file order", objs.RelayPolicies)
	}
	r, err := policy.CompileRelay(objs.RelayPolicies, objs.SecretLookup(), policy.CompileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Accepts("one.example") || !r.Accepts("two.example") {
		t.Fatal("the compiled policy lost a document")
	}
}

func TestLoadFilesDescendsIntoFoldersAndSkipsOtherFiles(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "b.yml", relayYAML("from-yml", "yml.example"))
	writeFile(t, dir, "a.yaml", relayYAML("from-yaml", "yaml.example"))
	writeFile(t, dir, "sub/c.json", `{"apiVersion":"mail.jetmail.io/v1alpha1","kind":"RelayPolicy",`+
		`"metadata":{"name":"from-json"},"spec":{"acceptedDomains":["json.example"]}}`)
	writeFile(t, dir, "UPPER.YAML", relayYAML("from-upper", "upper.example"))
	writeFile(t, dir, "notes.txt", "this is not YAML: [")
	writeFile(t, dir, "README", "kind: Nonsense")
	objs, err := policy.LoadFiles([]string{dir})
	if err != nil {
		t.Fatalf("LoadFiles(%s): %v", dir, err)
	}
	var names []string
	for _, o := range objs.RelayPolicies {
		names = append(names, o.Name)
	}
	if got := strings.Join(names, ","); got != "from-upper,from-yaml,from-yml,from-json" {
		t.Fatalf("loaded %s; want the .yaml/.yml/.json files in lexical order", got)
	}
}

func TestLoadFilesErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		content string
		want    []string
	}{
		"an unknown kind names the file, the document and the kind": {
			relayYAML("ok", "ok.example") + "---\napiVersion: mail.jetmail.io/v1alpha1\nkind: MailRute\nmetadata:\n  name: x\n",
			[]string{"bad.yaml", "document 2", "MailRute"}},
		"a known kind of another API version is refused": {
			"apiVersion: mail.jetmail.io/v1\nkind: RelayPolicy\nmetadata:\n  name: x\n",
			[]string{"bad.yaml", "document 1", "mail.jetmail.io/v1"}},
		"an unknown field is refused (strict decoding)": {
			"apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata:\n  name: x\nspec:\n  acceptedDomain: [typo.example]\n",
			[]string{"bad.yaml", "document 1", "acceptedDomain"}},
		"an unknown field in a Secret is refused": {
			"apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringDatum:\n  users: x\n",
			[]string{"bad.yaml", "document 1", "stringDatum"}},
		"a field name in the wrong case is refused, as the API server does": {
			"apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringdata:\n  users: x\n",
			[]string{"bad.yaml", "document 1", "stringdata"}},
		"a spec field name in the wrong case is refused, as the API server does": {
			"apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata:\n  name: x\nspec:\n  AcceptedDomains: [a.example]\n",
			[]string{"bad.yaml", "document 1", "AcceptedDomains"}},
		"a duplicated key is refused": {
			"apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata:\n  name: x\nspec:\n  maxRecipients: 100\n  maxRecipients: 200\n",
			[]string{"bad.yaml", "document 1", "maxRecipients"}},
		"a RelayPolicy without metadata.name is refused": {
			"apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata:\n  namespace: mail\nspec: {}\n",
			[]string{"bad.yaml", "document 1", "metadata.name"}},
		"a document that is not YAML is refused": {
			"apiVersion: [unclosed\n",
			[]string{"bad.yaml", "document 1"}},
		"a field of the wrong type is refused": {
			"apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata:\n  name: x\nspec:\n  maxRecipients: lots\n",
			[]string{"bad.yaml", "document 1"}},
	} {
		t.Run(name, func(t *testing.T) {
			f := writeFile(t, t.TempDir(), "bad.yaml", tc.content)
			objs, err := policy.LoadFiles([]string{f})
			if err == nil {
				t.Fatalf("LoadFiles succeeded: %+v", objs)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	if _, err := policy.LoadFiles([]string{filepath.Join(t.TempDir(), "missing.yaml")}); err == nil {
		t.Fatal("LoadFiles of a missing file succeeded")
	}
}

func authPolicy(secret, key string) string {
	return `apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata:
  name: submission
  namespace: mail
spec:
  auth:
    usersSecretRef:
      name: ` + secret + `
      key: ` + key + `
`
}

func TestAuthUsersFromASecret(t *testing.T) {
	alice, bob := hashFor(t, "s3cret"), hashFor(t, "hunter2")
	users := "# htpasswd -B\nalice:" + alice + "\n\n  bob:" + bob + "  \r\n"
	for name, secret := range map[string]string{
		"users in stringData": "apiVersion: v1\nkind: Secret\nmetadata:\n  name: smtp-users\n  namespace: mail\n" +
			"stringData:\n  users: |\n" + indent(users, "    "),
		"users in base64 data": "apiVersion: v1\nkind: Secret\nmetadata:\n  name: smtp-users\n  namespace: mail\n" +
			"data:\n  users: " + base64.StdEncoding.EncodeToString([]byte(users)) + "\n",
	} {
		t.Run(name, func(t *testing.T) {
			f := writeFile(t, t.TempDir(), "auth.yaml", authPolicy("smtp-users", "users")+"---\n"+secret)
			objs, err := policy.LoadFiles([]string{f})
			if err != nil {
				t.Fatal(err)
			}
			r, err := policy.CompileRelay(objs.RelayPolicies, objs.SecretLookup(), policy.CompileOptions{})
			if err != nil {
				t.Fatalf("Compile: %v", err)
			}
			if !r.HasUsers() {
				t.Fatal("HasUsers() = false with two users")
			}
			for _, tc := range []struct {
				user, pass string
				want       bool
			}{
				{"alice", "s3cret", true},
				{"bob", "hunter2", true},
				{"alice", "hunter2", false},
				{"alice", "S3cret", false},
				{"alice", "", false},
				{"Alice", "s3cret", false},
				{"carol", "s3cret", false},
				{"", "", false},
			} {
				if got := r.Authenticate(tc.user, tc.pass); got != tc.want {
					t.Errorf("Authenticate(%q, %q) = %v; want %v", tc.user, tc.pass, got, tc.want)
				}
			}
		})
	}
}

func TestAuthUsersFromAFile(t *testing.T) {
	dir := t.TempDir()
	uf := writeFile(t, dir, "users.htpasswd", "carol:"+hashFor(t, "colon:in:password")+"\n")
	f := writeFile(t, dir, "p.yaml", "apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata:\n  name: f\n"+
		"spec:\n  auth:\n    allowInsecure: true\n    usersFile: "+uf+"\n")
	objs, err := policy.LoadFiles([]string{f})
	if err != nil {
		t.Fatal(err)
	}
	r, err := policy.CompileRelay(objs.RelayPolicies, objs.SecretLookup(), policy.CompileOptions{AllowFiles: true})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Authenticate("carol", "colon:in:password") || r.Authenticate("carol", "colon") || !r.AllowInsecureAuth {
		t.Fatal("users file not honoured")
	}
}

func TestAuthConfigurationErrors(t *testing.T) {
	good := hashFor(t, "s3cret")
	secret := func(users string) string {
		return "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: smtp-users\n  namespace: mail\nstringData:\n  users: |\n" + indent(users, "    ")
	}
	for name, tc := range map[string]struct {
		docs string
		want []string
	}{
		"a Secret that does not exist": {
			authPolicy("nope", "users") + secret("alice:"+good+"\n"),
			[]string{"RelayPolicy mail/submission", "usersSecretRef", "nope"}},
		"a Secret without the key": {
			authPolicy("smtp-users", "other") + secret("alice:"+good+"\n"),
			[]string{"RelayPolicy mail/submission", "usersSecretRef", "other"}},
		"a Secret in another namespace": {
			authPolicy("smtp-users", "users") + strings.Replace(secret("alice:"+good+"\n"), "namespace: mail", "namespace: elsewhere", 1),
			[]string{"RelayPolicy mail/submission", "not found"}},
		"a users line without a colon": {
			authPolicy("smtp-users", "users") + secret("alice:"+good+"\nbob\n"),
			[]string{"RelayPolicy mail/submission", "spec.auth", "line 2"}},
		"a users line without a user name": {
			authPolicy("smtp-users", "users") + secret(":"+good+"\n"),
			[]string{"RelayPolicy mail/submission", "line 1"}},
		"a plain-text password instead of a hash": {
			authPolicy("smtp-users", "users") + secret("alice:s3cret\n"),
			[]string{"RelayPolicy mail/submission", "line 1", "alice", "bcrypt"}},
		"a SHA-crypt hash instead of bcrypt": {
			authPolicy("smtp-users", "users") + secret("alice:$6$salt$abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV\n"),
			[]string{"RelayPolicy mail/submission", "alice", "bcrypt"}},
		"both a Secret and a file": {
			strings.Replace(authPolicy("smtp-users", "users"), "    usersSecretRef:", "    usersFile: /etc/x\n    usersSecretRef:", 1) + secret("alice:"+good+"\n"),
			[]string{"RelayPolicy mail/submission", "spec.auth", "not both"}},
		"a users file that does not exist": {
			"apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata:\n  name: f\nspec:\n  auth:\n    usersFile: /nonexistent/jetmail-users\n",
			[]string{"RelayPolicy/f", "spec.auth.usersFile"}},
	} {
		t.Run(name, func(t *testing.T) {
			f := writeFile(t, t.TempDir(), "auth.yaml", tc.docs)
			objs, err := policy.LoadFiles([]string{f})
			if err != nil {
				t.Fatalf("LoadFiles: %v", err)
			}
			r, err := policy.CompileRelay(objs.RelayPolicies, objs.SecretLookup(), policy.CompileOptions{AllowFiles: true})
			if err == nil {
				t.Fatalf("Compile succeeded: %+v", r)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestParseUsers(t *testing.T) {
	h := hashFor(t, "hunter2")
	users, err := policy.ParseUsers([]byte("# comment\n\nbob:" + h + "\n   # indented comment\n"))
	if err != nil || len(users) != 1 || string(users["bob"]) != h {
		t.Fatalf("ParseUsers = %v, %v", users, err)
	}
	if _, err := policy.ParseUsers([]byte("bob:$2a$04$short\n")); err == nil {
		t.Fatal("a truncated bcrypt hash was accepted")
	}
}

func TestCompileRelayWithoutSecretsRefusesASecretRef(t *testing.T) {
	f := writeFile(t, t.TempDir(), "p.yaml", authPolicy("smtp-users", "users"))
	objs, err := policy.LoadFiles([]string{f})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := policy.CompileRelay(objs.RelayPolicies, nil, policy.CompileOptions{}); err == nil || !strings.Contains(err.Error(), "usersSecretRef") {
		t.Fatalf("CompileRelay without a Secret lookup = %v; want an error about usersSecretRef", err)
	}
}

func indent(s, prefix string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(s, "\n") {
		if line == "" {
			continue
		}
		b.WriteString(prefix + line)
	}
	if !strings.HasSuffix(b.String(), "\n") {
		b.WriteString("\n")
	}
	return b.String()
}

func TestTheSamplesInConfigCompile(t *testing.T) {
	// config/samples is what the README points newcomers at: it must load
	// and compile as it is, with `jetmail serve -f config/samples/`.
	objs, err := policy.LoadFiles([]string{"../config/samples"})
	if err != nil {
		t.Fatal(err)
	}
	if len(objs.RelayPolicies) != 1 || len(objs.MailRoutes) != 2 || len(objs.DeliveryPolicies) != 1 {
		t.Fatalf("samples hold %d RelayPolicy, %d MailRoute, %d DeliveryPolicy; want 1, 2, 1",
			len(objs.RelayPolicies), len(objs.MailRoutes), len(objs.DeliveryPolicies))
	}
	cfg, err := objs.Compile(policy.CompileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Relay.Authenticate("alice", "change-me") {
		t.Error("the sample user alice does not log in with the documented password")
	}
	if r := cfg.Delivery.Route("mail.partner.example"); r == nil || r.TLS != "required" {
		t.Errorf("the partner route does not take its subdomains: %+v", r)
	}
	if r := cfg.Delivery.Route("anything.test"); r == nil || r.Auth == nil || r.Auth.Username != "relay-user" {
		t.Errorf("the smarthost route does not catch everything else: %+v", r)
	}
	if cfg.Delivery.DeadDestination != time.Minute {
		t.Errorf("deadDestinationTime: %s, want the sample's 1m", cfg.Delivery.DeadDestination)
	}
}

func TestDeliveryPolicyDeadDestinationTime(t *testing.T) {
	d, err := policy.CompileDelivery(nil, nil, nil, policy.CompileOptions{})
	if err != nil || d.DeadDestination != policy.DefaultDeadDestination {
		t.Fatalf("default: %v, %v; want %s", d.DeadDestination, err, policy.DefaultDeadDestination)
	}
	for _, v := range []time.Duration{0, -time.Second} {
		dp := v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "d", Namespace: "mail"},
			Spec: v1alpha1.DeliveryPolicySpec{DeadDestinationTime: &metav1.Duration{Duration: v}}}
		_, err := policy.CompileDelivery([]v1alpha1.DeliveryPolicy{dp}, nil, nil, policy.CompileOptions{})
		if err == nil || !strings.Contains(err.Error(), "DeliveryPolicy mail/d: spec.deadDestinationTime") {
			t.Errorf("deadDestinationTime %s: %v, want an error naming the object and field", v, err)
		}
	}
}

// In a cluster no object may make a pod read a file: only `jetmail serve`
// compiles with AllowFiles. The file named here exists and holds valid
// credentials, and the compiler must refuse the object without opening it.
func TestFileFieldsAreRefusedAndNeverOpenedOutsideServe(t *testing.T) {
	dir := t.TempDir()
	users := writeFile(t, dir, "users", "carol:"+hashFor(t, "hunter2")+"\n")
	creds := writeFile(t, dir, "creds", "relay:secret\n")
	for _, tc := range []struct {
		name, doc, field string
	}{
		{"RelayPolicy usersFile", "apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: f, namespace: mail}\n" +
			"spec:\n  auth:\n    usersFile: " + users + "\n", "spec.auth.usersFile"},
		{"MailRoute auth.file", "apiVersion: mail.jetmail.io/v1alpha1\nkind: MailRoute\nmetadata: {name: r, namespace: mail}\n" +
			"spec:\n  domains: [example.net]\n  nextHops: [smtp.example.net]\n  auth:\n    file: " + creds + "\n", "spec.auth.file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := policy.LoadFiles([]string{writeFile(t, t.TempDir(), "o.yaml", tc.doc)})
			if err != nil {
				t.Fatal(err)
			}
			var opened []string
			restore := policy.SetReadFile(func(name string) ([]byte, error) {
				opened = append(opened, name)
				return os.ReadFile(name)
			})
			defer restore()
			snap := &policy.Snapshot{RelayPolicies: objs.RelayPolicies, MailRoutes: objs.MailRoutes}
			for what, compile := range map[string]func() error{
				"a cluster compile":  func() error { _, err := objs.Compile(policy.CompileOptions{}); return err },
				"a snapshot compile": func() error { _, err := snap.Compile(); return err },
			} {
				err := compile()
				if err == nil || !strings.Contains(err.Error(), tc.field) || !strings.Contains(err.Error(), "jetmail serve") {
					t.Errorf("%s: error %v, want a refusal naming %s", what, err, tc.field)
				}
			}
			if len(opened) != 0 {
				t.Errorf("the compiler opened %q", opened)
			}
			cfg, err := objs.Compile(policy.CompileOptions{AllowFiles: true})
			if err != nil {
				t.Fatalf("serve's compile: %v", err)
			}
			if len(opened) != 1 {
				t.Errorf("serve's compile opened %q, want the one file", opened)
			}
			if rt := cfg.Delivery.Route("example.net"); tc.field == "spec.auth.file" && (rt == nil || rt.Auth == nil || rt.Auth.Username != "relay") {
				t.Errorf("route %+v: the file's credentials are not in force", rt)
			}
		})
	}
}
