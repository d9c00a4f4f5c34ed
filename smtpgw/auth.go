package smtpgw

import (
	"errors"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"go.uber.org/zap"
)

// errAuthFailed is 535 5.7.8 (RFC 4954 §6).
var errAuthFailed = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Authentication credentials invalid"}

// AuthMechanisms lists PLAIN and LOGIN when users are configured.
func (s *session) AuthMechanisms() []string {
	if !s.pol.HasUsers() {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

// Auth authenticates against the policy's bcrypt users.
func (s *session) Auth(mech string) (sasl.Server, error) {
	check := func(user, pass string) error {
		if s.pol.Authenticate(user, pass) {
			s.authUser = user
			s.mayRelay = true
			s.reply(235)
			return nil
		}
		s.log.Info("auth failed", zap.String("user", user))
		s.reply(535)
		return errAuthFailed
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, user, pass string) error {
			if identity != "" && identity != user {
				s.reply(535)
				return errAuthFailed
			}
			return check(user, pass)
		}), nil
	case sasl.Login:
		return &loginServer{check: check}, nil
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
