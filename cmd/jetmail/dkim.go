package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/policy"
)

func dkimCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dkim",
		Short: "DKIM keys for jetmail serve -f (in a cluster, the controller makes them)",
	}
	cmd.AddCommand(dkimKeygenCmd())
	return cmd
}

func dkimKeygenCmd() *cobra.Command {
	var (
		name, namespace, domain, selector, algo string
		bits                                    int
	)
	cmd := &cobra.Command{
		Use:   "keygen",
		Short: "Print a new DKIMKey and the Secret with its private key, as YAML for -f",
		Long: `keygen makes a private key and prints a DKIMKey object and the Secret that
holds the key, ready for jetmail serve -f, followed by the DNS TXT record to
publish as a comment. In a cluster, apply only the DKIMKey: the controller
generates the Secret and shows the record in the DKIMKey's status.

  jetmail dkim keygen --domain example.org --selector s2026 > dkim.yaml
  jetmail dkim keygen --domain example.org --selector e2026 --algorithm ed25519-sha256 >> dkim.yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return dkimKeygen(cmd.OutOrStdout(), name, namespace, domain, selector, v1alpha1.DKIMAlgorithm(algo), bits)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&domain, "domain", "", "signing domain (d=), required")
	fl.StringVar(&selector, "selector", "", "selector (s=), required")
	fl.StringVar(&algo, "algorithm", string(v1alpha1.DKIMRSASHA256), "rsa-sha256 or ed25519-sha256")
	fl.IntVar(&bits, "bits", policy.DefaultRSAKeyBits, "RSA key size: 2048, 3072 or 4096")
	fl.StringVar(&name, "name", "", "the DKIMKey's name (default: <selector>-<domain with dots as dashes>)")
	fl.StringVar(&namespace, "namespace", "mail", "the objects' namespace")
	_ = cmd.MarkFlagRequired("domain")
	_ = cmd.MarkFlagRequired("selector")
	return cmd
}

func dkimKeygen(w io.Writer, name, namespace, domain, selector string, algo v1alpha1.DKIMAlgorithm, bits int) error {
	if name == "" {
		name = strings.ToLower(selector + "-" + strings.ReplaceAll(strings.TrimSuffix(domain, "."), ".", "-"))
	}
	key := v1alpha1.DKIMKey{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "DKIMKey"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace},
		Spec:       v1alpha1.DKIMKeySpec{Domain: domain, Selector: selector, Algorithm: algo},
	}
	if algo == v1alpha1.DKIMRSASHA256 && bits != policy.DefaultRSAKeyBits {
		b := int32(bits)
		key.Spec.RSAKeyBits = &b
	}
	switch bits {
	case 2048, 3072, 4096:
	default:
		return fmt.Errorf("--bits %d: 2048, 3072 or 4096", bits)
	}
	pemKey, err := policy.GenerateDKIMKey(algo, bits)
	if err != nil {
		return err
	}
	secret := corev1.Secret{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Secret"},
		ObjectMeta: metav1.ObjectMeta{Name: policy.DKIMSecretName(&key), Namespace: namespace},
		StringData: map[string]string{v1alpha1.DKIMKeySecretKey: string(pemKey)},
	}
	// Check that what we print compiles, and take the record from it.
	objs := &policy.Objects{DKIMKeys: []v1alpha1.DKIMKey{key}, Secrets: []corev1.Secret{secret}}
	if _, err := policy.CompileSigning(objs.DKIMKeys, objs.SecretLookup()); err != nil {
		return err
	}
	signer, err := policy.ParseDKIMKey(pemKey)
	if err != nil {
		return err
	}
	record, err := policy.DKIMRecord(signer)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "# Publish: %s. IN TXT %s\n", policy.DKIMRecordName(selector, domain), zoneStrings(record))
	for _, obj := range []any{key, secret} {
		b, err := yaml.Marshal(obj)
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "---\n%s", stripEmpty(b))
	}
	return nil
}

// zoneStrings writes a TXT value as zone-file strings of at most 255
// octets each (RFC 1035 §3.3.14).
func zoneStrings(v string) string {
	var parts []string
	for len(v) > 255 {
		parts = append(parts, `"`+v[:255]+`"`)
		v = v[255:]
	}
	parts = append(parts, `"`+v+`"`)
	return strings.Join(parts, " ")
}

// stripEmpty drops the empty status and creationTimestamp that marshalling
// a typed object writes.
func stripEmpty(b []byte) string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		switch strings.TrimSpace(l) {
		case "creationTimestamp: null", "status: {}":
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}
