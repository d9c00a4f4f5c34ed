package events

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/jetmail/jetmail/internal/natstest"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func openJS(t *testing.T, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url, nats.ReconnectBufSize(-1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

func openStream(t *testing.T, js jetstream.JetStream) jetstream.Stream {
	t.Helper()
	s, err := OpenStream(testCtx(t), js, StreamConfig{Replicas: 1, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func readAll(t *testing.T, js jetstream.JetStream, from, to time.Time) []Event {
	t.Helper()
	var out []Event
	if err := Read(testCtx(t), js, from, to, func(e Event) error { out = append(out, e); return nil }); err != nil {
		t.Fatalf("read events: %v", err)
	}
	return out
}

func storedBatches(t *testing.T, s jetstream.Stream) uint64 {
	t.Helper()
	info, err := s.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// 2,500 events emitted as fast as they come make a handful of stream
// messages, not 2,500 writes, and every one of them reads back, in order,
// with its fields.
func TestALogBatchesEventsIntoFewStreamMessages(t *testing.T) {
	ns := natstest.Start(t, natstest.Options{})
	js := openJS(t, ns.ClientURL())
	s := openStream(t, js)
	reg := prometheus.NewRegistry()
	l := New(Config{JetStream: js, Pod: "gw-0.example", Registerer: reg})
	start := time.Now()
	const n = 2500
	for i := range n {
		l.Emit(Event{Kind: Delivered, QueueID: fmt.Sprintf("Q%05d", i), From: "alice@example.net", Rcpt: "bob@example.org",
			Domain: "example.org", Relay: "mx.example.org", Code: 250, Enhanced: "2.0.0", Reply: "ok queued as X", Delay: time.Duration(i) * time.Millisecond, Size: 1234})
	}
	if err := l.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := info.State.Msgs; got == 0 || got > 5 {
		t.Fatalf("%d events made %d stream messages, want 1 to 5", n, got)
	}
	t.Logf("%d events: %d stream messages, %d bytes stored (%.1f per event)", n, info.State.Msgs, info.State.Bytes, float64(info.State.Bytes)/n)
	evs := readAll(t, js, start.Add(-time.Second), time.Now().Add(time.Second))
	if len(evs) != n {
		t.Fatalf("read back %d events, want %d", len(evs), n)
	}
	for i, e := range evs {
		if e.QueueID != fmt.Sprintf("Q%05d", i) || e.Kind != Delivered || e.Pod != "gw-0.example" || e.Delay != time.Duration(i)*time.Millisecond ||
			e.Code != 250 || e.Relay != "mx.example.org" || e.Time.Before(start) {
			t.Fatalf("event %d read back as %+v", i, e)
		}
	}
	if d := testutil.ToFloat64(l.dropped.WithLabelValues(dropFull)) + testutil.ToFloat64(l.dropped.WithLabelValues(dropPublish)); d != 0 {
		t.Errorf("%v events dropped", d)
	}
	// The subject names the pod, its dots made safe.
	raw, err := s.GetLastMsgForSubject(testCtx(t), "jetmail.events.gw-0_example")
	if err != nil || raw.Header.Get(HeaderCount) == "" {
		t.Fatalf("last batch of gw-0.example: %v, %v", raw, err)
	}
}

// A read between two times gets the events of that window only, and the
// window is the events' own time, not the time their batch was stored.
func TestReadKeepsTheWindow(t *testing.T) {
	ns := natstest.Start(t, natstest.Options{})
	js := openJS(t, ns.ClientURL())
	openStream(t, js)
	t0 := time.Now().Truncate(time.Second)
	var evs []Event
	for i := range 10 {
		evs = append(evs, Event{Time: t0.Add(time.Duration(i-5) * time.Second), Kind: Received, QueueID: fmt.Sprint(i)})
	}
	if err := Publish(testCtx(t), js, "tool", evs); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, js, t0.Add(-2*time.Second), t0.Add(2*time.Second))
	var ids string
	for _, e := range got {
		ids += e.QueueID
	}
	if ids != "3456" {
		t.Fatalf("events of [-2s, +2s): %q, want 3456", ids)
	}
}

// While NATS does not answer, Emit neither blocks nor grows without
// bound: past the buffer, events are dropped and counted. What was
// buffered is published once NATS answers again.
func TestAFullBufferDropsAndCountsInsteadOfBlocking(t *testing.T) {
	ns := natstest.Start(t, natstest.Options{})
	openStream(t, openJS(t, ns.ClientURL()))
	stall := natstest.NewStall(t, ns.Addr().String())
	js := openJS(t, stall.URL())
	const batch, buffer = 10, 50
	l := New(Config{JetStream: js, Pod: "gw-1", MaxBatch: batch, Buffer: buffer, Interval: time.Hour, PublishTimeout: 20 * time.Second})
	stall.Stop()
	emitted := 0
	emit := func() { emitted++; l.Emit(Event{Kind: Received, QueueID: fmt.Sprint(emitted)}) }
	for range batch {
		emit()
	}
	// The first batch is taken and its publish hangs.
	deadline := time.Now().Add(5 * time.Second)
	for len(l.ch) > 0 {
		if time.Now().After(deadline) {
			t.Fatal("the log never took the first batch")
		}
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	for range buffer + 25 {
		emit()
	}
	if el := time.Since(start); el > 100*time.Millisecond {
		t.Errorf("%d emits took %s while NATS was stalled", buffer+25, el)
	}
	if got := testutil.ToFloat64(l.dropped.WithLabelValues(dropFull)); got != 25 {
		t.Fatalf("dropped %v events, want 25 (the buffer holds %d)", got, buffer)
	}
	stall.Resume()
	if err := l.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, openJS(t, ns.ClientURL()), start.Add(-time.Hour), time.Now().Add(time.Hour))
	if len(got) != emitted-25 {
		t.Fatalf("stored %d events, want %d emitted less 25 dropped", len(got), emitted-25)
	}
}

// A batch that cannot be stored (no stream) is tried a few times, then
// dropped and counted; the Log goes on.
func TestABatchThatCannotBeStoredIsDroppedAndCounted(t *testing.T) {
	ns := natstest.Start(t, natstest.Options{})
	js := openJS(t, ns.ClientURL())
	l := New(Config{JetStream: js, Pod: "gw-2", Tries: 2, PublishTimeout: time.Second})
	for range 7 {
		l.Emit(Event{Kind: Received})
	}
	if err := l.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(l.dropped.WithLabelValues(dropPublish)); got != 7 {
		t.Fatalf("dropped %v events after failed publishes, want 7", got)
	}
}

// The stream is on disk: events outlive a restart of the NATS server.
func TestEventsSurviveARestartOfNATS(t *testing.T) {
	dir := t.TempDir()
	ns := natstest.Start(t, natstest.Options{Dir: dir})
	js := openJS(t, ns.ClientURL())
	openStream(t, js)
	start := time.Now()
	l := New(Config{JetStream: js, Pod: "dl-0"})
	for i := range 300 {
		l.Emit(Event{Kind: Deferred, QueueID: fmt.Sprint(i), Reply: "greylisted"})
	}
	if err := l.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	natstest.Stop(ns)
	ns = natstest.Start(t, natstest.Options{Dir: dir})
	got := readAll(t, openJS(t, ns.ClientURL()), start.Add(-time.Second), time.Now().Add(time.Second))
	if len(got) != 300 || got[299].QueueID != "299" || got[0].Reply != "greylisted" {
		t.Fatalf("after the restart: %d events", len(got))
	}
}

// Follow prints what is stored after it started.
func TestFollowSeesBatchesAsTheyArrive(t *testing.T) {
	ns := natstest.Start(t, natstest.Options{})
	js := openJS(t, ns.ClientURL())
	s := openStream(t, js)
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	got := make(chan Event, 10)
	done := make(chan error, 1)
	go func() {
		done <- Follow(ctx, js, time.Now(), func(e Event) error { got <- e; return nil })
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		info, err := s.Info(ctx)
		if err == nil && info.State.Consumers > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Follow never started reading")
		}
		time.Sleep(10 * time.Millisecond)
	}
	l := New(Config{JetStream: js, Pod: "gw-3", Interval: 50 * time.Millisecond})
	defer l.Close(context.Background())
	l.Emit(Event{Kind: Rejected, Reason: ReasonRelay})
	select {
	case e := <-got:
		if e.Kind != Rejected || e.Reason != ReasonRelay || e.Pod != "gw-3" {
			t.Fatalf("followed %+v", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Follow saw nothing within 5s")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Follow after cancel: %v", err)
	}
}

// BenchmarkEmit is the cost of an event on the mail path, with the log
// publishing to a real server behind it, and what realistic events cost
// in the stream.
func BenchmarkEmit(b *testing.B) {
	ns := natstest.Start(b, natstest.Options{})
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	s, err := OpenStream(context.Background(), js, StreamConfig{Storage: jetstream.FileStorage})
	if err != nil {
		b.Fatal(err)
	}
	l := New(Config{JetStream: js, Pod: "gw-0", Buffer: 1 << 20})
	evs := make([]Event, b.N)
	for i := range b.N {
		evs[i] = (Event{Kind: Delivered, QueueID: fmt.Sprintf("2NTKX9%08d", i), From: fmt.Sprintf("sender%d@example.net", i%97),
			Rcpt: fmt.Sprintf("user%d@d%d.example", i, i%50), Domain: fmt.Sprintf("d%d.example", i%50), Relay: fmt.Sprintf("mx%d.d%d.example", i%3, i%50),
			Code: 250, Enhanced: "2.0.0", Reply: fmt.Sprintf("2.0.0 Ok: queued as %X", i*7919), Delay: time.Duration(i%5000) * time.Millisecond, Size: int64(2000 + i%3000), Attempt: 1})
	}
	b.ResetTimer()
	for i := range b.N {
		l.Emit(evs[i])
	}
	b.StopTimer()
	l.Close(context.Background())
	info, _ := s.Info(context.Background())
	b.ReportMetric(float64(info.State.Bytes)/float64(b.N), "stored-B/event")
	b.ReportMetric(float64(b.N)/float64(info.State.Msgs), "events/batch")
	b.ReportMetric(testutil.ToFloat64(l.dropped.WithLabelValues(dropFull)), "dropped")
}
