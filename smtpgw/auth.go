package smtpgw

import (
	"errors"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"go.uber.org/zap"
)

// Replies to AUTH (RFC 4954 §6).
var (
	errAuthFailed = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Authentication credentials invalid"}
	errAuthBusy   = &smtp.SMTPError{Code: 454, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Temporary authentication failure, try again later"}
)

// authLockedLine ends the session of a client address that has used up its
// AUTH failures.
const authLockedLine = "421 4.7.0 Too many failed authentication attempts from your address, try again later"

// AuthMechanisms lists PLAIN and LOGIN when users are configured.
func (s *session) AuthMechanisms() []string {
	if !s.pol.HasUsers() {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

// Auth authenticates against the policy's bcrypt users.
func (s *session) Auth(mech string) (sasl.Server, error) {
	guard := s.g.auth
	check := func(identity, user, pass string) error {
		if guard.locked(s.ip) {
			s.g.metrics.auth.WithLabelValues("locked").Inc()
			s.log.Warn("auth refused: too many failures from this address", zap.String("user", user))
			s.reply(421)
			s.authRefused(user, 421, "4.7.0", "Too many failed authentication attempts from your address")
			s.closeWith(authLockedLine)
			return errAuthBusy
		}
		ok := false
		if !guard.check(func() { ok = s.pol.Authenticate(user, pass) }) {
			s.g.metrics.auth.WithLabelValues("busy").Inc()
			return s.fail(errAuthBusy)
		}
		if ok && (identity == "" || identity == user) {
			s.g.metrics.auth.WithLabelValues("success").Inc()
			s.authUser = user
			s.mayRelay = true
			s.reply(235)
			return nil
		}
		s.g.metrics.auth.WithLabelValues("failure").Inc()
		delay := guard.failed(s.ip)
		s.log.Info("auth failed", zap.String("user", user), zap.Duration("delay", delay))
		time.Sleep(delay)
		s.authRefused(user, errAuthFailed.Code, "5.7.8", errAuthFailed.Message)
		return s.fail(errAuthFailed)
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(check), nil
	case sasl.Login:
		return &loginServer{check: func(user, pass string) error { return check("", user, pass) }}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// loginServer is the server side of the LOGIN mechanism
// (draft-murchison-sasl-login), which go-sasl only implements as a client.
// Widely deployed clients (Outlook, many printers) still only speak LOGIN.
type loginServer struct {
	check      func(user, pass string) error
	user       string
	step       int
	gotInitial bool
}

func (l *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch l.step {
	case 0:
		l.step++
		if response != nil {
			// Initial response (AUTH LOGIN <base64 user>).
			l.user = string(response)
			l.step++
			return []byte("Password:"), false, nil
		}
		return []byte("Username:"), false, nil
	case 1:
		l.user = string(response)
		l.step++
		return []byte("Password:"), false, nil
	case 2:
		l.step++
		return nil, true, l.check(l.user, string(response))
	}
	return nil, true, errors.New("unexpected LOGIN response")
}
