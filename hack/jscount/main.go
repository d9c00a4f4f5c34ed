// Command jscount reads the JetStream counters of a `jetmail serve` (through
// its --nats-listen address) after a benchmark run and reports the stream
// writes per message: every stored message, tombstone, state record and
// purge marker advances its stream's last sequence, so the sum of the last
// sequences of JETMAIL_QUEUE, JETMAIL_BODY and KV_JETMAIL_STATE (fresh data
// directory) is the number of JetStream writes of the run. Consumer
// acknowledgements are not stream writes; they are reported separately.
//
// With -wait it first waits (bounded) until the deliverer's consumer has
// nothing pending and nothing unacknowledged, so the tombstones and acks of
// the last deliveries are counted.
//
//	go run ./hack/jscount -url nats://127.0.0.1:4230 -n 10000 -wait 30s
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/spool"
)

func main() {
	url := flag.String("url", "nats://127.0.0.1:4230", "NATS URL of the embedded server (loopback)")
	n := flag.Int("n", 0, "messages of the run (0: no per-message figures)")
	wait := flag.Duration("wait", 0, "first wait up to this long for the consumer to be idle")
	nkey := flag.String("nkey", "", "NKEY seed file to sign in with (serve writes <data-dir>/nats-user.nk)")
	flag.Parse()

	opts := []nats.Option{nats.Name("jscount"), nats.Timeout(5 * time.Second)}
	if *nkey != "" {
		o, err := nats.NkeyOptionFromSeed(*nkey)
		if err != nil {
			fmt.Fprintln(os.Stderr, "jscount:", err)
			os.Exit(2)
		}
		opts = append(opts, o)
	}
	nc, err := nats.Connect(*url, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "jscount:", err)
		os.Exit(2)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		fmt.Fprintln(os.Stderr, "jscount:", err)
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *wait+30*time.Second)
	defer cancel()

	consumer := func() *jetstream.ConsumerInfo {
		c, err := js.Consumer(ctx, spool.QueueStream, spool.DeliveryConsumerName)
		if err != nil {
			return nil
		}
		ci, err := c.Info(ctx)
		if err != nil {
			return nil
		}
		return ci
	}
	if *wait > 0 {
		deadline := time.Now().Add(*wait)
		for time.Now().Before(deadline) {
			ci := consumer()
			if ci != nil && ci.NumPending == 0 && ci.NumAckPending == 0 {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
	}

	var writes uint64
	for name := range js.StreamNames(ctx).Name() {
		s, err := js.Stream(ctx, name)
		if err != nil {
			fmt.Fprintln(os.Stderr, "jscount:", name, err)
			continue
		}
		st := s.CachedInfo().State
		fmt.Printf("stream %s last_seq=%d msgs=%d bytes=%d\n", name, st.LastSeq, st.Msgs, st.Bytes)
		switch name {
		case spool.QueueStream, spool.BodyStream, "KV_" + spool.StateBucket:
			writes += st.LastSeq
		}
	}
	if ci := consumer(); ci != nil {
		fmt.Printf("consumer jetmail-deliverer delivered=%d acked_floor=%d ack_pending=%d redelivered=%d pending=%d\n",
			ci.Delivered.Consumer, ci.AckFloor.Consumer, ci.NumAckPending, ci.NumRedelivered, ci.NumPending)
		if *n > 0 {
			fmt.Printf("consumer_deliveries_per_message %.2f\n", float64(ci.Delivered.Consumer)/float64(*n))
		}
	}
	fmt.Printf("jetstream_writes %d\n", writes)
	if *n > 0 {
		fmt.Printf("jetstream_writes_per_message %.2f\n", float64(writes)/float64(*n))
	}
}
