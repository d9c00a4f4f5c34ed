package natstest_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/internal/natstest"
)

func TestAServerStoresAndAClusterReplicates(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	s := natstest.Start(t, natstest.Options{SyncAlways: true})
	js, err := jetstream.New(natstest.Connect(t, s))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "ONE", Subjects: []string{"one.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "one.x", []byte("x")); err != nil {
		t.Fatal(err)
	}

	c := natstest.StartCluster(t)
	js, err = jetstream.New(c.Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "THREE", Subjects: []string{"three.>"}, Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	// A new stream answers once its replicas have elected a leader.
	for {
		_, err = js.Publish(ctx, "three.x", []byte("x"))
		if err == nil || ctx.Err() != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("stream THREE: replicas %d, cluster %+v; want a leader and two replicas", info.Config.Replicas, info.Cluster)
	}
}
