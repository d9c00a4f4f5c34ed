package charts

import "testing"

// A memory limit reaches the binary as JETMAIL_MEMORY_LIMIT (from the
// container's limits.memory); no limit, no variable.
func TestMemoryLimitReachesTheBinary(t *testing.T) {
	type envVar struct {
		Name      string `json:"name"`
		ValueFrom *struct {
			ResourceFieldRef *struct {
				Resource string `json:"resource"`
			} `json:"resourceFieldRef"`
		} `json:"valueFrom"`
	}
	m := index(t, render(t, "deliverer.resources.limits.memory=512Mi"))
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
	if e, ok := env("deliverer")["JETMAIL_MEMORY_LIMIT"]; !ok || e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil ||
		e.ValueFrom.ResourceFieldRef.Resource != "limits.memory" {
		t.Errorf("deliverer: JETMAIL_MEMORY_LIMIT %+v, want it from the container's limits.memory", e)
	}
	for _, c := range []string{"gateway", "controller"} {
		if e, ok := env(c)["JETMAIL_MEMORY_LIMIT"]; ok {
			t.Errorf("%s: JETMAIL_MEMORY_LIMIT %+v without a memory limit", c, e)
		}
	}
}
