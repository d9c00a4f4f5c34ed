package deliverer

import (
	"slices"
	"testing"

	"github.com/jetmail/jetmail/deliverer/failure"
)

// Every deferral falls into one of the few classes of
// jetmail_delivery_deferrals_total, told by reason, remote and status code.
func TestDeferralClass(t *testing.T) {
	for _, c := range []struct {
		e    *failure.Error
		want string
	}{
		{nil, "other"},
		{failure.Temporary(451, "4.4.3", "DNS lookup of example.net MX: timeout"), "dns"},
		{failure.Temporary(451, "4.4.4", "no address for route host relay.example"), "dns"},
		{failure.Temporary(451, "4.4.1", "cannot connect"), "connect"},
		{failure.Temporary(451, "4.4.2", "timeout during DATA"), "timeout"},
		{failure.Temporary(451, "4.4.2", "session deadline exceeded").WithReason(failure.DeadlineKill), "deadline"},
		{failure.Temporary(451, "4.7.5", "TLS handshake failed"), "tls"},
		{failure.Temporary(451, "4.4.1", "down").WithReason(failure.Suspended), "suspended"},
		{&failure.Error{Code: 421, Enhanced: "4.7.0", Text: "try later", Remote: "mx.example.net"}, "reply"},
		{failure.Temporary(451, "4.3.0", "queue read error"), "other"},
	} {
		got := deferralClass(c.e)
		if got != c.want {
			t.Errorf("%v: class %q, want %q", c.e, got, c.want)
		}
		if !slices.Contains(deferralClasses, got) {
			t.Errorf("%v: class %q is not one of %v", c.e, got, deferralClasses)
		}
	}
}
