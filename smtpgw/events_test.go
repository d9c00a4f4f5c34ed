package smtpgw

import (
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/policy"
)

// Each refusal the gateway gives is filed under the class reports add up.
func TestRefusalsAreClassified(t *testing.T) {
	pol := policy.Default()
	relayDenied := pol.CheckRecipient("x@elsewhere.example", false, false)
	badAddr := pol.CheckRecipient("not an address", true, false)
	for name, c := range map[string]struct {
		stage string
		err   *smtp.SMTPError
		want  string
	}{
		"a recipient the client may not relay to": {stageRcpt, relayDenied, events.ReasonRelay},
		"a recipient address that does not parse": {stageRcpt, badAddr, events.ReasonSyntax},
		"a message over the size limit":           {stageData, errTooBig, events.ReasonSize},
		"a mail loop":                             {stageData, errLoop, events.ReasonPolicy},
		"too many recipients":                     {stageRcpt, errTooManyRcpts, events.ReasonLimit},
		"bare line endings":                       {stageData, errBareEOL, events.ReasonSyntax},
		"a store that failed":                     {stageData, errTempFail, events.ReasonTempfail},
		"a gateway shutting down":                 {stageMail, errShuttingDown, events.ReasonShutdown},
		"a client too slow with its data":         {stageData, errDataIdle, events.ReasonLimit},
		"MAIL inside a transaction":               {stageMail, errNestedMail, events.ReasonSyntax},
		"a refused sender":                        {stageMail, &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1}}, events.ReasonPolicy},
		"an unknown user":                         {stageRcpt, &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}}, events.ReasonUnknownUser},
		"wrong AUTH credentials":                  {stageAuth, errAuthFailed, events.ReasonAuth},
	} {
		if c.err == nil {
			t.Fatalf("%s: no refusal to classify", name)
		}
		if got := reasonOf(c.stage, c.err); got != c.want {
			t.Errorf("%s (%d %v): class %q, want %q", name, c.err.Code, c.err.EnhancedCode, got, c.want)
		}
	}
}
