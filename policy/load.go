package policy

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/jetmail/jetmail/api/v1alpha1"
)

// Objects is a set of configuration objects as read from files.
type Objects struct {
	RelayPolicies    []v1alpha1.RelayPolicy
	MailRoutes       []v1alpha1.MailRoute
	DeliveryPolicies []v1alpha1.DeliveryPolicy
	DKIMKeys         []v1alpha1.DKIMKey
	Secrets          []corev1.Secret
}

// Config is one compiled configuration snapshot: everything the gateways
// and deliverers run on.
type Config struct {
	Relay    *Relay
	Delivery *Delivery
}

// readFile is a seam so tests need no files; it is os.ReadFile.
var readFile = os.ReadFile

// LoadFiles reads every YAML document of every file named, descending into
// folders (files ending in .yaml, .yml or .json, in lexical order). Documents
// are Kubernetes objects: jetmail kinds of mail.jetmail.io/v1alpha1
// (RelayPolicy, MailRoute, DeliveryPolicy, DKIMKey), and v1 Secrets they reference.
func LoadFiles(paths []string) (*Objects, error) {
	objs := &Objects{}
	for _, p := range paths {
		files, err := expand(p)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			data, err := readFile(f)
			if err != nil {
				return nil, err
			}
			if err := objs.add(f, data); err != nil {
				return nil, err
			}
		}
	}
	return objs, nil
}

func expand(p string) ([]string, error) {
	st, err := os.Stat(p)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return []string{p}, nil
	}
	var files []string
	err = filepath.WalkDir(p, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch strings.ToLower(filepath.Ext(path)) {
		case ".yaml", ".yml", ".json":
			if !d.IsDir() {
				files = append(files, path)
			}
		}
		return nil
	})
	sort.Strings(files)
	return files, err
}

func (o *Objects) add(file string, data []byte) error {
	for i, doc := range splitYAML(data) {
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return fmt.Errorf("%s: document %d: %w", file, i+1, err)
		}
		where := fmt.Sprintf("%s: document %d (%s)", file, i+1, meta.Kind)
		var err error
		switch gv := meta.APIVersion; {
		case meta.Kind == "" && gv == "":
			continue // empty document
		case gv == v1alpha1.GroupVersion.String() && meta.Kind == "RelayPolicy":
			o.RelayPolicies, err = appendNamed(o.RelayPolicies, doc)
		case gv == v1alpha1.GroupVersion.String() && meta.Kind == "MailRoute":
			o.MailRoutes, err = appendNamed(o.MailRoutes, doc)
		case gv == v1alpha1.GroupVersion.String() && meta.Kind == "DeliveryPolicy":
			o.DeliveryPolicies, err = appendNamed(o.DeliveryPolicies, doc)
		case gv == v1alpha1.GroupVersion.String() && meta.Kind == "DKIMKey":
			o.DKIMKeys, err = appendNamed(o.DKIMKeys, doc)
		case gv == "v1" && meta.Kind == "Secret":
			o.Secrets, err = appendNamed(o.Secrets, doc)
		default:
			err = fmt.Errorf("unsupported apiVersion/kind %s/%s", gv, meta.Kind)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
	}
	return nil
}

// appendNamed decodes doc strictly and appends it to list; every object
// needs a name.
func appendNamed[T any, PT interface {
	*T
	GetName() string
}](list []T, doc []byte) ([]T, error) {
	var v T
	if err := decodeStrict(doc, &v); err != nil {
		return list, err
	}
	if PT(&v).GetName() == "" {
		return list, fmt.Errorf("metadata.name is required")
	}
	return append(list, v), nil
}

// decodeStrict decodes one YAML document the way the API server reads an
// object: field names are case-sensitive, and unknown or duplicate fields
// are errors. (sigs.k8s.io/yaml's own strict mode folds case.)
func decodeStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strictErrs, err := kjson.UnmarshalStrict(j, v)
	if err != nil {
		return err
	}
	if len(strictErrs) > 0 {
		return strictErrs[0]
	}
	return nil
}

// splitYAML splits a multi-document YAML stream at "---" lines.
func splitYAML(data []byte) [][]byte {
	var docs [][]byte
	var cur bytes.Buffer
	for _, line := range bytes.SplitAfter(data, []byte("\n")) {
		if t := bytes.TrimRight(line, " \t\r\n"); bytes.Equal(t, []byte("---")) {
			docs = append(docs, bytes.Clone(cur.Bytes()))
			cur.Reset()
			continue
		}
		cur.Write(line)
	}
	return append(docs, cur.Bytes())
}

// SecretLookup resolves Secret keys among the loaded objects, the way the
// API server would: data (base64 in YAML, already decoded) or stringData.
func (o *Objects) SecretLookup() Secrets {
	return func(ns, name, key string) ([]byte, error) {
		for _, s := range o.Secrets {
			if s.Name != name || (s.Namespace != ns && !(s.Namespace == "" || ns == "")) {
				continue
			}
			if v, ok := s.StringData[key]; ok {
				return []byte(v), nil
			}
			if v, ok := s.Data[key]; ok {
				return v, nil
			}
			return nil, fmt.Errorf("Secret %s has no key %q", name, key)
		}
		return nil, fmt.Errorf("Secret %s not found", name)
	}
}

// CompileOptions say where a configuration is compiled.
type CompileOptions struct {
	// Relayhost, when set, adds a catch-all route to that host:port
	// (Postfix's relayhost), as `serve --relayhost` gives it.
	Relayhost string
	// AllowFiles lets the `usersFile` (RelayPolicy) and `auth.file`
	// (MailRoute) fields be read. Only `jetmail serve` sets it, for files
	// its operator wrote: everywhere else an object that names a file is
	// refused and the file is never opened, so that whoever may create a
	// MailRoute cannot have a pod read, and send to a next hop of their
	// choosing, a file of its filesystem.
	AllowFiles bool
}

// Compile turns the loaded objects into the running configuration.
func (o *Objects) Compile(opts CompileOptions) (*Config, error) {
	relay, err := CompileRelay(o.RelayPolicies, o.SecretLookup(), opts)
	if err != nil {
		return nil, err
	}
	delivery, err := CompileDelivery(o.DeliveryPolicies, o.MailRoutes, o.SecretLookup(), opts)
	if err != nil {
		return nil, err
	}
	if relay.DKIM, err = CompileSigning(o.DKIMKeys, o.SecretLookup()); err != nil {
		return nil, err
	}
	return &Config{Relay: relay, Delivery: delivery}, nil
}
