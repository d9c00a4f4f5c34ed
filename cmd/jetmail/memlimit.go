package main

import (
	"os"
	"runtime/debug"
	"strconv"
)

// memoryLimitEnv carries the container's memory limit in bytes (the Helm
// chart sets it from limits.memory).
const memoryLimitEnv = "JETMAIL_MEMORY_LIMIT"

// applyMemoryLimit gives the Go runtime a soft memory limit of 90% of the
// container's, so it collects harder before the OOM killer acts while
// leaving room for memory the runtime does not manage. An explicit
// GOMEMLIMIT wins. It returns the limit set, or 0.
func applyMemoryLimit() int64 {
	if os.Getenv("GOMEMLIMIT") != "" {
		return 0
	}
	n, err := strconv.ParseInt(os.Getenv(memoryLimitEnv), 10, 64)
	if err != nil || n <= 0 {
		return 0
	}
	limit := n / 10 * 9
	debug.SetMemoryLimit(limit)
	return limit
}
