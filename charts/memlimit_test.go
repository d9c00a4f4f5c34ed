package charts

import "testing"

// A memory limit gives the Go runtime a matching GOMEMLIMIT, unless the
// operator sets one through extraEnv; no limit, no GOMEMLIMIT.
func TestMemoryLimitSetsGOMEMLIMIT(t *testing.T) {
	type envVar struct {
		Name      string `json:"name"`
		Value     string `json:"value"`
		ValueFrom *struct {
			ResourceFieldRef *struct {
				Resource string `json:"resource"`
			} `json:"resourceFieldRef"`
		} `json:"valueFrom"`
	}
	m := index(t, render(t,
		"deliverer.resources.limits.memory=512Mi",
		"gateway.resources.limits.memory=256Mi",
		"gateway.extraEnv[0].name=GOMEMLIMIT",
		"gateway.extraEnv[0].value=200MiB",
	))
	env := func(component string) map[string]envVar {
		t.Helper()
		o := m.get(t, "Deployment", release+"-jetmail-"+component)
		cs := field[[]struct {
			Env []envVar `json:"env"`
		}](t, o, "spec", "template", "spec", "containers")
		out := map[string]envVar{}
		for _, e := range cs[0].Env {
			if _, dup := out[e.Name]; dup {
				t.Errorf("%s: env %s set twice", component, e.Name)
			}
			out[e.Name] = e
		}
		return out
	}
	if e, ok := env("deliverer")["GOMEMLIMIT"]; !ok || e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil ||
		e.ValueFrom.ResourceFieldRef.Resource != "limits.memory" {
		t.Errorf("deliverer: GOMEMLIMIT %+v, want it from the container's limits.memory", e)
	}
	if e := env("gateway")["GOMEMLIMIT"]; e.Value != "200MiB" || e.ValueFrom != nil {
		t.Errorf("gateway: GOMEMLIMIT %+v, want the extraEnv value alone", e)
	}
	if e, ok := env("controller")["GOMEMLIMIT"]; ok {
		t.Errorf("controller: GOMEMLIMIT %+v without a memory limit", e)
	}
}
