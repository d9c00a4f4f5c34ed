// Command jetmail is the clustered mail transfer agent: one binary, one
// subcommand per role.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	applyMemoryLimit()
	root := &cobra.Command{
		Use:           "jetmail",
		Short:         "jetmail: a Kubernetes-native clustered mail transfer agent on NATS JetStream",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(serveCmd(), gatewayCmd(), delivererCmd(), controllerCmd(), queueCmd(), reportCmd(), eventsCmd())
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "jetmail:", err)
		os.Exit(1)
	}
}
