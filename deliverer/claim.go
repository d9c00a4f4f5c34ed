package deliverer

import (
	"context"
	"crypto/rand"
	"encoding/hex"

	"go.uber.org/zap"

	"github.com/jetmail/jetmail/spool"
)

// claimKeeper holds an attempt's claim on a message (see spool.Claim) and
// extends it while the attempt runs.
//
// Which attempts claim: those of a redelivered message, of a record an
// administrator replaced (spool/admin.go), and a first attempt once it has
// run for a quarter of the ack wait (lateClaim). Claiming every first
// attempt at once would cost every message a write. The early hand-outs
// seen after a consumer leader change were of messages already redelivered
// (their latest delivery time had not reached the new leader), so those are
// claimed, at one write per retry.
type claimKeeper struct {
	d     *Deliverer
	state *spool.DeliveryState // a copy of the claimed state, the keeper's own
	claim spool.Claim
}

// claim claims st (as loaded) for an attempt of this process, for one ack
// wait; the in-progress ticker extends it.
func (d *Deliverer) claim(ctx context.Context, st *spool.DeliveryState) (*claimKeeper, error) {
	token := make([]byte, 8)
	_, _ = rand.Read(token)
	c := spool.Claim{Token: hex.EncodeToString(token), Holder: d.cfg.Hostname, Until: d.cfg.Now().Add(d.cfg.AckWait)}
	cctx, cancel := context.WithTimeout(ctx, recordTry)
	defer cancel()
	if err := d.cfg.Spool.Claim(cctx, st, c); err != nil {
		return nil, err
	}
	return &claimKeeper{d: d, state: st.Clone(), claim: c}, nil
}

// lateClaim claims the message qid for a first attempt that has run for a
// while (see handle): from the state stored now, or a new one.
func (d *Deliverer) lateClaim(ctx context.Context, qid, subject string) (*claimKeeper, error) {
	cctx, cancel := context.WithTimeout(ctx, recordTry)
	defer cancel()
	st, err := d.cfg.Spool.LoadState(cctx, qid)
	if err != nil {
		return nil, err
	}
	if st == nil {
		st = &spool.DeliveryState{QueueID: qid}
	}
	st.SetRecord(subject)
	if st.Claim.Held("", d.cfg.Now()) {
		return nil, spool.ErrClaimed
	}
	return d.claim(ctx, st)
}

// extend moves the claim's end one ack wait from now. It is a
// compare-and-set on the claimed state, so it never overwrites what the
// attempt recorded meanwhile; a failure only means the claim runs out
// sooner. Nil-safe: an attempt without a claim has nothing to extend.
func (k *claimKeeper) extend(ctx context.Context) {
	if k == nil {
		return
	}
	k.claim.Until = k.d.cfg.Now().Add(k.d.cfg.AckWait)
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTry)
	defer cancel()
	if err := k.d.cfg.Spool.Claim(cctx, k.state, k.claim); err != nil {
		k.d.log.Debug("extending a claim", zap.String("queue_id", k.state.QueueID), zap.Error(err))
	}
}
