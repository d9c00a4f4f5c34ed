//go:build e2e

package e2e

import (
	"fmt"
	"net/http"
	"time"
)

// Settings every jetmail process of the run gets, beyond what the chart
// passes (charts/jetmail/templates/*-deployment.yaml).
const (
	// publishTimeout is the gateway's --publish-timeout: short, so that
	// a NATS node stopped for stopNATSFor makes publishes give up (451)
	// and clients retransmit.
	publishTimeout = 5 * time.Second
	// ackWait is the deliverer's --ack-wait. The default (5 min) would
	// keep a killed deliverer's messages away past the test's drain bound
	// (known issue (b)).
	ackWait = 30 * time.Second
	// maxInFlight is the deliverer's --max-in-flight: the most messages
	// one deliverer holds at once, and so the most a SIGKILL can catch
	// between a remote's 250 and the record of it (see checker.go).
	maxInFlight = 32
	// deliveryGrace is the deliverer's --delivery-grace on SIGTERM.
	deliveryGrace = 15 * time.Second
	// shutdownGrace is the gateway's --shutdown-grace on SIGTERM.
	shutdownGrace = 10 * time.Second
)

// role is one jetmail process: a gateway, a deliverer or a controller.
type role struct {
	kind    string // gateway, deliverer, controller
	name    string // pod name
	smtp    string // gateway: SMTP address
	metrics string // /metrics, /healthz, /readyz (controller: /metrics only)
	health  string // controller: /healthz, /readyz
	p       *proc
}

// newGateway registers `jetmail gateway` with the chart's flags, on its
// own loopback ports.
func (w *world) newGateway(bin, name, natsURL string) *role {
	r := &role{kind: "gateway", name: name,
		smtp:    fmt.Sprintf("127.0.0.1:%d", freePort(w.t)),
		metrics: fmt.Sprintf("127.0.0.1:%d", freePort(w.t))}
	r.p = w.newProc(name, bin, []string{"gateway",
		"--nats-url=" + natsURL,
		"--replicas=3",
		"--smtp-listen=" + r.smtp,
		"--metrics-listen=" + r.metrics,
		"--pod-name=" + name,
		"--shutdown-grace=" + shutdownGrace.String(),
		"--log-format=json",
		"--hostname=" + name + ".e2e.test",
		"--publish-timeout=" + publishTimeout.String(),
	}, nil)
	return r
}

// newDeliverer registers `jetmail deliverer` with the chart's flags, the
// test's DNS server, and the settings above.
func (w *world) newDeliverer(bin, name, natsURL, dns string) *role {
	r := &role{kind: "deliverer", name: name, metrics: fmt.Sprintf("127.0.0.1:%d", freePort(w.t))}
	r.p = w.newProc(name, bin, []string{"deliverer",
		"--nats-url=" + natsURL,
		"--replicas=3",
		"--metrics-listen=" + r.metrics,
		"--pod-name=" + name,
		"--delivery-grace=" + deliveryGrace.String(),
		"--log-format=json",
		"--hostname=" + name + ".e2e.test",
		"--dns=" + dns,
		"--ack-wait=" + ackWait.String(),
		fmt.Sprintf("--max-in-flight=%d", maxInFlight),
	}, nil)
	return r
}

// newController registers `jetmail controller` as the chart runs it
// (--namespace, --leader-elect), signed in to the API server by the
// kubeconfig in $KUBECONFIG (controller-runtime's ctrl.GetConfig).
func (w *world) newController(bin, name, natsURL, namespace, kubeconfig string) *role {
	r := &role{kind: "controller", name: name,
		metrics: fmt.Sprintf("127.0.0.1:%d", freePort(w.t)),
		health:  fmt.Sprintf("127.0.0.1:%d", freePort(w.t))}
	r.p = w.newProc(name, bin, []string{"controller",
		"--nats-url=" + natsURL,
		"--replicas=3",
		"--namespace=" + namespace,
		"--leader-elect=true",
		"--metrics-listen=" + r.metrics,
		"--health-listen=" + r.health,
	}, []string{"KUBECONFIG=" + kubeconfig, "POD_NAME=" + name})
	return r
}

// ready reports, as an error, why the role is not ready: its /readyz
// (JetStream answers) for gateways and deliverers, /healthz for the
// controller (which is ready before it leads).
func (r *role) ready() error {
	if !r.p.running() {
		return fmt.Errorf("%s is not running", r.name)
	}
	url := "http://" + r.metrics + "/readyz"
	if r.kind == "controller" {
		url = "http://" + r.health + "/healthz"
	}
	code, body, err := httpGet(url)
	if err != nil {
		return fmt.Errorf("%s: %w", r.name, err)
	}
	if code != http.StatusOK {
		return fmt.Errorf("%s: /readyz %d %s", r.name, code, body)
	}
	return nil
}

// startAndWait starts the role and waits until it is ready.
func (r *role) startAndWait(timeout time.Duration) error {
	if err := r.p.start(); err != nil {
		return err
	}
	if err := poll(timeout, 100*time.Millisecond, r.ready); err != nil {
		return fmt.Errorf("%w\nlast lines of %s:\n%s", err, r.p.logPath, r.p.logTail(20))
	}
	return nil
}

// metric reads one metric (summed over its labels) from the role.
func (r *role) metric(name string) (float64, error) {
	code, page, err := httpGet("http://" + r.metrics + "/metrics")
	if err != nil {
		return 0, err
	}
	if code != http.StatusOK {
		return 0, fmt.Errorf("%s /metrics: %d", r.name, code)
	}
	v, ok := metric(page, name)
	if !ok {
		return 0, fmt.Errorf("%s: no metric %s", r.name, name)
	}
	return v, nil
}
