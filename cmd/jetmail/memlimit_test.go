package main

import (
	"runtime/debug"
	"testing"
)

func TestMemoryLimitIsNinetyPercentOfTheContainers(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })

	t.Setenv("GOMEMLIMIT", "")
	t.Setenv(memoryLimitEnv, "536870912") // 512Mi
	if got := applyMemoryLimit(); got != 536870912/10*9 {
		t.Errorf("limit %d, want 90%% of 512Mi", got)
	}
	if got := debug.SetMemoryLimit(-1); got != 536870912/10*9 {
		t.Errorf("runtime limit %d", got)
	}

	t.Setenv(memoryLimitEnv, "")
	if got := applyMemoryLimit(); got != 0 {
		t.Errorf("no container limit: set %d", got)
	}
	t.Setenv(memoryLimitEnv, "536870912")
	t.Setenv("GOMEMLIMIT", "100MiB")
	if got := applyMemoryLimit(); got != 0 {
		t.Errorf("an explicit GOMEMLIMIT was overridden with %d", got)
	}
}
