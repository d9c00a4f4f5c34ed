// Command jetmail is the clustered mail transfer agent: one binary, one
// subcommand per role.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	if isPlugin(os.Args[0]) {
		if err := pluginCmd().Execute(); err != nil {
			fmt.Fprintln(os.Stderr, "kubectl jetmail:", err)
			os.Exit(1)
		}
		return
	}
	applyMemoryLimit()
	root := &cobra.Command{
		Use:           "jetmail",
		Short:         "jetmail: a Kubernetes-native clustered mail transfer agent on NATS JetStream",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(serveCmd(), gatewayCmd(), delivererCmd(), controllerCmd(), dkimCmd())
	root.AddCommand(operatorCmds()...)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "jetmail:", err)
		os.Exit(1)
	}
}

// operatorCmds are the tools for people, which kubectl-jetmail has too.
func operatorCmds() []*cobra.Command {
	return []*cobra.Command{queueCmd(), reportCmd(), eventsCmd()}
}
