package smtpgw

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// session is one SMTP session: it applies the relay policy in force when it
// began, and turns DATA into a durable spool commit.
type session struct {
	g        *Gateway
	c        *smtp.Conn
	tc       *conn
	pol      *policy.Relay
	log      *zap.Logger
	ip       netip.Addr
	helo     string
	tls      bool
	authUser string
	mayRelay bool

	// The current transaction.
	inTx    bool
	from    string
	mail    spool.MailParams
	rcpts   []spool.Rcpt
	started time.Time
	bdat    bool
}

var (
	_ smtp.Session     = (*session)(nil)
	_ smtp.AuthSession = (*session)(nil)
)

// Replies the session gives. Each carries an enhanced status code.
var (
	errShuttingDown = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Service shutting down, try again later"}
	errTooBig       = &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4}, Message: "Message size exceeds fixed maximum message size"}
	errTooManyRcpts = &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 5, 3}, Message: "Too many recipients"}
	errBareEOL      = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 5, 2}, Message: "Bare CR or LF in message data is not allowed (RFC 5321 section 2.3.8)"}
	errLoop         = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 4, 6}, Message: "Too many Received headers: mail loop detected"}
	errTempFail     = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Temporary failure storing the message, try again later"}
	errNeedUTF8     = &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 6, 7}, Message: "Non-ASCII address requires SMTPUTF8"}
	errLineTooLong  = &smtp.SMTPError{Code: 500, EnhancedCode: smtp.EnhancedCode{5, 5, 2}, Message: "Line in message data too long, closing connection"}
	errNestedMail   = &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "Nested MAIL command: a transaction is already in progress"}
)

func (s *session) reply(code int) {
	s.g.metrics.replies.WithLabelValues(strconv.Itoa(code)).Inc()
}

// fail accounts for a refusal and hands it to go-smtp. Under TLS the
// connection cannot see replies, so the error budget is kept here.
func (s *session) fail(err *smtp.SMTPError) error {
	s.reply(err.Code)
	s.countError(err)
	return err
}

// countError spends the error budget on a refusal under TLS (on plaintext
// the connection counts every reply itself). When it is spent, the refusal
// and 421 4.7.0 are the session's last replies.
func (s *session) countError(err *smtp.SMTPError) {
	if s.tls && err.Code >= 400 && s.tc != nil && s.tc.countError() {
		s.closeWith(replyLine(err), "421 4.7.0 Too many errors, closing connection")
	}
}

// replyLine is err as one reply line, without the line ending.
func replyLine(err *smtp.SMTPError) string {
	return fmt.Sprintf("%d %d.%d.%d %s", err.Code, err.EnhancedCode[0], err.EnhancedCode[1], err.EnhancedCode[2], err.Message)
}

// closeWith sends a final reply on whatever layer the session is on and
// closes the connection; go-smtp's own reply that follows has nowhere to go.
func (s *session) closeWith(lines ...string) {
	nc := s.c.Conn()
	_ = nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(nc, strings.Join(lines, "\r\n")+"\r\n")
	_ = nc.Close()
	if s.tc != nil {
		_ = s.tc.Close()
	}
}

// Mail starts a transaction.
func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	if s.inTx {
		// RFC 5321 section 4.1.4: MAIL inside a transaction is a bad
		// sequence of commands, not a new transaction.
		s.rejected(stageMail, events.Sender(from), "", errNestedMail)
		return s.fail(errNestedMail)
	}
	if s.tc != nil && s.tc.isDraining() {
		s.rejected(stageMail, events.Sender(from), "", errShuttingDown)
		return s.fail(errShuttingDown)
	}
	utf8 := opts != nil && opts.UTF8
	if err := s.pol.CheckSender(from, utf8); err != nil {
		s.log.Info("sender rejected", zap.String("from", from), zap.Int("code", err.Code))
		s.rejected(stageMail, events.Sender(from), "", err)
		return s.fail(err)
	}
	if opts != nil {
		if opts.Size >= s.pol.MaxMessageBytes {
			s.rejected(stageMail, events.Sender(from), "", errTooBig)
			return s.fail(errTooBig)
		}
		s.mail = spool.MailParams{Size: opts.Size, Body: string(opts.Body), SMTPUTF8: opts.UTF8,
			Ret: string(opts.Return), EnvID: opts.EnvelopeID}
	}
	s.inTx = true
	s.from = from
	s.started = time.Now()
	if s.tc != nil {
		s.tc.setTransaction(true)
	}
	s.reply(250)
	return nil
}

// Rcpt adds a recipient.
func (s *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	if len(s.rcpts) >= s.pol.MaxRecipients {
		s.rejected(stageRcpt, events.Sender(s.from), to, errTooManyRcpts)
		return s.fail(errTooManyRcpts)
	}
	if err := s.pol.CheckRecipient(to, s.mayRelay, s.mail.SMTPUTF8); err != nil {
		s.log.Info("recipient rejected", zap.String("from", s.from), zap.String("to", to), zap.Int("code", err.Code))
		s.rejected(stageRcpt, events.Sender(s.from), to, err)
		return s.fail(err)
	}
	r := spool.Rcpt{Addr: to}
	if opts != nil {
		for _, n := range opts.Notify {
			r.Notify = append(r.Notify, string(n))
		}
		if opts.OriginalRecipient != "" {
			r.ORcpt = string(opts.OriginalRecipientType) + ";" + opts.OriginalRecipient
		}
	}
	s.rcpts = append(s.rcpts, r)
	s.reply(250)
	return nil
}

// Data reads the message, commits it to the spool and answers 250 only once
// JetStream has acknowledged it.
func (s *session) Data(r io.Reader) error {
	start := time.Now()
	qid := spool.NewQueueID(start)
	log := s.log.With(zap.String("queue_id", qid))
	if s.tc != nil {
		s.tc.startData(dataLimits{total: s.pol.DataTimeout, idle: s.pol.CommandTimeout,
			minRate: s.pol.MinDataRate, grace: s.pol.DataRateGrace,
			strictEOL: !s.pol.Normalize(s.ip) && !isPipe(r)})
		defer s.tc.endData()
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	body := s.g.spool.NewBody(ctx, qid)
	if _, err := io.WriteString(body, s.receivedHeader(qid, start)); err != nil {
		return s.finishData(log, start, qid, 0, "tempfail", errTempFail, err)
	}
	// go-smtp hands BDAT chunks through a pipe, DATA through its
	// dot-unstuffing reader.
	s.bdat = isPipe(r)
	dr := newDataReader(r, s.pol, s.pol.Normalize(s.ip))
	var sign *dkimTee
	var to io.Writer = body
	if keys := s.g.src.Relay().DKIM; s.mayRelay && !keys.Empty() {
		// Our own users' mail is signed as it streams (DKIMKey).
		sign = newDKIMTee(keys)
		defer sign.abort()
		to = io.MultiWriter(body, sign)
	}
	buf := copyBuffers.Get().(*[]byte)
	_, err := io.CopyBuffer(to, dr, *buf)
	copyBuffers.Put(buf)
	if err == nil && s.tc != nil && s.tc.eolViolation() {
		err = errBareLineEnding
	}
	if err != nil {
		body.Discard()
		return s.dataError(log, start, qid, dr.n, err)
	}
	if dr.received > s.pol.MaxReceivedHeaders {
		body.Discard()
		return s.finishData(log, start, qid, dr.n, "rejected", errLoop, nil)
	}

	env := &spool.Envelope{
		QueueID:  qid,
		Received: start.UTC(),
		Gateway:  s.g.cfg.Hostname,
		ClientIP: s.ip.String(),
		Helo:     s.helo,
		TLS:      s.tls,
		AuthUser: s.authUser,
		From:     s.from,
		Mail:     s.mail,
		Rcpts:    s.rcpts,
	}
	if sign != nil {
		hdrs, result, used, err := sign.finish()
		s.g.metrics.dkim.WithLabelValues(result).Inc()
		if err != nil {
			log.Warn("DKIM signing failed: the message leaves unsigned", zap.Error(err))
		}
		env.Headers = hdrs
		names := make([]string, len(used))
		for i, k := range used {
			names[i] = policy.DKIMRecordName(k.Selector, k.Domain)
		}
		log = log.With(zap.String("dkim", result), zap.Strings("dkim_keys", names))
	}
	guard := ""
	if dr.messageID {
		addrs := make([]string, len(s.rcpts))
		for i, r := range s.rcpts {
			addrs[i] = r.Addr
		}
		guard = spool.Fingerprint(s.from, addrs, dr.sum())
	}
	t0 := time.Now()
	res, err := s.g.spool.Commit(ctx, env, body, guard)
	s.g.metrics.publishSeconds.Observe(time.Since(t0).Seconds())
	if err != nil {
		return s.finishData(log, start, qid, dr.n, "tempfail", errTempFail, err)
	}
	ok := &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "Ok: queued as " + res.QueueID}
	if res.Duplicate {
		s.g.metrics.duplicatesSuppressed.Inc()
		log = log.With(zap.String("original_queue_id", res.QueueID))
		return s.finishData(log, start, res.QueueID, dr.n, "duplicate", ok, nil)
	}
	s.g.metrics.queuedMessageBytes.Add(float64(env.Body.Size))
	if res.Batch > 0 {
		s.g.metrics.commitBatch.Observe(float64(res.Batch))
	}
	return s.finishData(log, start, qid, dr.n, "queued", ok, nil)
}

// isPipe tells BDAT (go-smtp passes chunks through a pipe) from DATA.
func isPipe(r io.Reader) bool {
	_, ok := r.(*io.PipeReader)
	return ok
}

// dataError classifies what went wrong while reading DATA.
func (s *session) dataError(log *zap.Logger, start time.Time, qid string, n int64, err error) error {
	var se *smtp.SMTPError
	switch {
	case errors.Is(err, errBareLineEnding):
		reply := s.finishData(log, start, qid, n, "rejected", errBareEOL, err)
		if !s.bdat {
			// After a bare CR or LF the rest of the DATA stream cannot be
			// trusted to end where the client thinks it does (go-smtp also
			// misses CRLF.CRLF right after a bare CR), so, like Postfix,
			// refuse and hang up instead of reading on.
			s.closeWith("554 5.5.2 Bare CR or LF in message data is not allowed (RFC 5321 section 2.3.8), closing connection")
		}
		return reply
	case errors.Is(err, errMessageTooBig), errors.As(err, &se) && se.Code == 552:
		return s.finishData(log, start, qid, n, "rejected", errTooBig, err)
	case errors.Is(err, smtp.ErrDataReset) && s.tc != nil && s.tc.lastFailure() != nil:
		// go-smtp aborted the BDAT transfer because a read of the chunk
		// failed on one of our limits; it has sent the reply and closed.
		s.rejected(stageData, events.Sender(s.from), "", limitReply(s.tc.lastFailure()))
		s.finishData(log, start, qid, n, "aborted", nil, s.tc.lastFailure())
		return errTempFail
	case errors.As(err, &se) && se.Code == 421, isTimeout(err):
		// A limit of the connection (conn.Read): the minimum rate, a
		// deadline, idleness, a shutdown. The reply is the last one.
		if se == nil {
			se = errDataIdle
		}
		s.rejected(stageData, events.Sender(s.from), "", se)
		s.finishData(log, start, qid, n, "aborted", nil, err)
		s.closeWith(replyLine(se))
		return errTempFail
	case errors.Is(err, smtp.ErrTooLongLine):
		reply := s.finishData(log, start, qid, n, "rejected", errLineTooLong, err)
		// The rest of the line cannot be told from commands: go-smtp
		// closes the connection after this reply.
		return reply
	case errors.As(err, &se):
		return s.finishData(log, start, qid, n, "rejected", se, err)
	default:
		// The client went away (EOF, reset) or the body store failed.
		if errors.Is(err, spool.ErrWrite) {
			return s.finishData(log, start, qid, n, "tempfail", errTempFail, err)
		}
		s.finishData(log, start, qid, n, "aborted", nil, err)
		return errTempFail
	}
}

// finishData logs the transaction (one line per transaction, like
// Postfix's) and returns the reply.
func (s *session) finishData(log *zap.Logger, start time.Time, qid string, n int64, result string, reply *smtp.SMTPError, cause error) error {
	s.g.metrics.transactions.WithLabelValues(result).Inc()
	fields := []zap.Field{
		zap.String("result", result),
		zap.String("from", s.from),
		zap.Int("rcpts", len(s.rcpts)),
		zap.Int64("size", n),
		zap.Duration("duration", time.Since(start)),
	}
	if reply != nil {
		fields = append(fields, zap.Int("code", reply.Code))
		s.reply(reply.Code)
	}
	if cause != nil {
		fields = append(fields, zap.Error(cause))
	}
	if result == "queued" || result == "duplicate" {
		log.Info("transaction", fields...)
	} else {
		log.Warn("transaction", fields...)
	}
	s.transactionEvent(qid, n, result, reply)
	// The transaction's state is reset by go-smtp, which calls Reset
	// once Data has returned.
	if reply == nil {
		return errTempFail
	}
	s.countError(reply)
	return reply
}

// receivedHeader is our trace header (RFC 5321 §4.4), with the queue ID.
func (s *session) receivedHeader(qid string, now time.Time) string {
	proto := "ESMTP"
	if s.tls {
		proto += "S"
	}
	if s.authUser != "" {
		proto += "A"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Received: from %s ([%s])\r\n\tby %s (jetmail) with %s id %s", sanitizeHelo(s.helo), s.ip, s.g.cfg.Hostname, proto, qid)
	if len(s.rcpts) == 1 {
		fmt.Fprintf(&b, "\r\n\tfor <%s>", s.rcpts[0].Addr)
	}
	fmt.Fprintf(&b, "; %s\r\n", now.Format(time.RFC1123Z))
	return b.String()
}

// sanitizeHelo keeps a client-chosen name from breaking our header.
func sanitizeHelo(h string) string {
	if len(h) > 255 {
		h = h[:255]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x21 || r == 0x7f || r == '(' || r == ')' || r == ';' {
			return '_'
		}
		return r
	}, h)
}

func (s *session) resetTransaction() {
	s.inTx = false
	s.from = ""
	s.mail = spool.MailParams{}
	s.rcpts = nil
	if s.tc != nil {
		s.tc.setTransaction(false)
	}
}

// Reset discards the transaction (RSET, or go-smtp after DATA).
func (s *session) Reset() { s.resetTransaction() }

// Logout ends the session.
func (s *session) Logout() error {
	s.resetTransaction()
	return nil
}

// copyBuffers hold the buffers that copy message data into the spool: one
// per DATA in progress, rather than io.Copy's new 32 KiB for every message
// (thirty times a 1 KB message).
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
