package spool

import (
	"context"
	"errors"
	"slices"

	"github.com/nats-io/nats.go/jetstream"
)

// EnsureStream creates the stream, or updates it only if its settings
// differ from want: every pod calls it at start, and most find the stream
// as they want it. A needless update is not free: it rewrites the stream's
// configuration on every server, and nats-server 2.15 was seen (race
// detector) to read a file store's settings for a consumer being created
// while an update wrote them.
func EnsureStream(ctx context.Context, js jetstream.JetStream, want jetstream.StreamConfig) (jetstream.Stream, error) {
	s, err := js.Stream(ctx, want.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return js.CreateOrUpdateStream(ctx, want)
	}
	if err != nil {
		return nil, err
	}
	if sameStreamConfig(want, s.CachedInfo().Config) {
		return s, nil
	}
	return js.CreateOrUpdateStream(ctx, want)
}

// sameStreamConfig compares the settings jetmail sets; the server fills in
// the others.
func sameStreamConfig(want, have jetstream.StreamConfig) bool {
	return want.Description == have.Description &&
		slices.Equal(want.Subjects, have.Subjects) &&
		want.Retention == have.Retention && want.Discard == have.Discard &&
		want.MaxBytes == have.MaxBytes && want.MaxAge == have.MaxAge &&
		want.MaxMsgsPerSubject == have.MaxMsgsPerSubject &&
		want.Storage == have.Storage && want.Replicas == have.Replicas &&
		want.Duplicates == have.Duplicates && want.AllowMsgTTL == have.AllowMsgTTL &&
		want.AllowDirect == have.AllowDirect && want.AllowAtomicPublish == have.AllowAtomicPublish
}

// ensureKeyValue is EnsureStream for a bucket: created, or updated only if
// its settings differ.
func ensureKeyValue(ctx context.Context, js jetstream.JetStream, atomic bool, want jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, want.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		if kv, err = js.CreateOrUpdateKeyValue(ctx, want); err != nil || !atomic {
			return kv, err
		}
		return kv, allowAtomicPublish(ctx, js, "KV_"+want.Bucket)
	}
	if err != nil {
		return nil, err
	}
	s, err := js.Stream(ctx, "KV_"+want.Bucket)
	if err != nil {
		return nil, err
	}
	have := s.CachedInfo().Config
	if have.Description == want.Description && have.MaxMsgsPerSubject == int64(want.History) &&
		have.Storage == want.Storage && have.Replicas == want.Replicas &&
		have.SubjectDeleteMarkerTTL == want.LimitMarkerTTL && have.AllowAtomicPublish == atomic {
		return kv, nil
	}
	if kv, err = js.CreateOrUpdateKeyValue(ctx, want); err != nil || !atomic {
		return kv, err
	}
	return kv, allowAtomicPublish(ctx, js, "KV_"+want.Bucket)
}

// allowAtomicPublish turns on atomic batch publishing (group commit,
// group.go) on a bucket's stream, which the bucket's settings cannot.
func allowAtomicPublish(ctx context.Context, js jetstream.JetStream, stream string) error {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return err
	}
	cfg := s.CachedInfo().Config
	if cfg.AllowAtomicPublish {
		return nil
	}
	cfg.AllowAtomicPublish = true
	_, err = js.UpdateStream(ctx, cfg)
	return err
}
