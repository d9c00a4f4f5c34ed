package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// The binary is also a kubectl plugin: installed (or linked) as
// kubectl-jetmail on the PATH, `kubectl jetmail queue stat` runs the queue
// tools against the NATS of the jetmail release in the namespace, found in
// the release's own Deployments, unless --nats-url is given.

// pluginBinary is the name kubectl runs the plugin by.
const pluginBinary = "kubectl-jetmail"

// isPlugin tells whether the binary was started as the kubectl plugin.
func isPlugin(arg0 string) bool {
	base := strings.TrimSuffix(filepath.Base(arg0), ".exe")
	return base == pluginBinary
}

// natsURLFinder, when set (the plugin), gives the NATS URL to the commands
// that talk to NATS when --nats-url was not given.
var natsURLFinder func(ctx context.Context) (url, where string, err error)

// kubeFlags are kubectl's own flags that the plugin honours.
type kubeFlags struct {
	kubeconfig, context, namespace, release string
}

func pluginCmd() *cobra.Command {
	var kf kubeFlags
	root := &cobra.Command{
		Use: pluginBinary,
		// kubectl's plugin convention: help and usage say "kubectl jetmail".
		Annotations: map[string]string{cobra.CommandDisplayNameAnnotation: "kubectl jetmail"},
		Short:       "jetmail's queue tools as a kubectl plugin",
		Long: `kubectl jetmail runs jetmail's operator tools against the jetmail release in
a namespace: the NATS URL comes from the release's Deployments (their
--nats-url), unless --nats-url is given. Sign in with --nats-nkey or
--nats-creds (the admin user of charts/jetmail/nats/permissions.conf).

The URL is the one the pods use: from outside the cluster it may not
resolve. Then forward a port to NATS and give it:

  kubectl port-forward -n nats svc/nats 4222:4222 &
  kubectl jetmail queue stat --nats-url nats://127.0.0.1:4222 --nats-nkey admin.nk`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, _ []string) {
			natsURLFinder = func(ctx context.Context) (string, string, error) {
				return kf.findNATS(ctx)
			}
		},
	}
	fl := root.PersistentFlags()
	fl.StringVar(&kf.kubeconfig, "kubeconfig", "", "path to the kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
	fl.StringVar(&kf.context, "context", "", "the kubeconfig context to use")
	fl.StringVarP(&kf.namespace, "namespace", "n", "", "the namespace of the jetmail release (default: the context's)")
	fl.StringVar(&kf.release, "release", "", "the Helm release name, when the namespace has several")
	root.AddCommand(operatorCmds()...)
	return root
}

// findNATS reads the NATS URL from the Deployments of the jetmail release
// in the namespace. where says which object it came from.
func (kf *kubeFlags) findNATS(ctx context.Context) (url, where string, err error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = kf.kubeconfig
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: kf.context})
	ns := kf.namespace
	if ns == "" {
		if ns, _, err = cc.Namespace(); err != nil {
			return "", "", fmt.Errorf("kubeconfig: %w", err)
		}
	}
	rc, err := cc.ClientConfig()
	if err != nil {
		return "", "", fmt.Errorf("kubeconfig: %w", err)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return "", "", err
	}
	sel := "app.kubernetes.io/name=jetmail"
	if kf.release != "" {
		sel += ",app.kubernetes.io/instance=" + kf.release
	}
	list, err := cs.AppsV1().Deployments(ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		return "", "", fmt.Errorf("looking for the jetmail release in namespace %s: %w", ns, err)
	}
	return natsFromDeployments(list.Items, ns, kf.release)
}

// natsFromDeployments picks the NATS URL out of a release's Deployments:
// every component of one release is given the same one.
func natsFromDeployments(deps []appsv1.Deployment, ns, release string) (url, where string, err error) {
	releases := map[string]bool{}
	for _, d := range deps {
		releases[d.Labels["app.kubernetes.io/instance"]] = true
	}
	switch {
	case len(deps) == 0 && release != "":
		return "", "", fmt.Errorf("no jetmail release %q in namespace %s (no Deployment labelled app.kubernetes.io/name=jetmail, app.kubernetes.io/instance=%s): give -n, or --nats-url", release, ns, release)
	case len(deps) == 0:
		return "", "", fmt.Errorf("no jetmail release in namespace %s (no Deployment labelled app.kubernetes.io/name=jetmail): give -n, or --nats-url", ns)
	case len(releases) > 1:
		names := make([]string, 0, len(releases))
		for r := range releases {
			names = append(names, r)
		}
		sort.Strings(names)
		return "", "", fmt.Errorf("namespace %s has several jetmail releases (%s): choose one with --release", ns, strings.Join(names, ", "))
	}
	// The deliverer's first, then the others, in a stable order.
	sort.Slice(deps, func(i, j int) bool {
		ci, cj := deps[i].Labels["app.kubernetes.io/component"] == "deliverer", deps[j].Labels["app.kubernetes.io/component"] == "deliverer"
		if ci != cj {
			return ci
		}
		return deps[i].Name < deps[j].Name
	})
	for _, d := range deps {
		for _, c := range d.Spec.Template.Spec.Containers {
			args := append(slices.Clone(c.Command), c.Args...)
			for i, a := range args {
				if v, ok := strings.CutPrefix(a, "--nats-url="); ok {
					return v, "Deployment " + ns + "/" + d.Name, nil
				}
				if a == "--nats-url" && i+1 < len(args) {
					return args[i+1], "Deployment " + ns + "/" + d.Name, nil
				}
			}
		}
	}
	return "", "", errors.New("the jetmail Deployments in namespace " + ns + " give no --nats-url: give --nats-url")
}
