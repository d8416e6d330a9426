package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/subjects"
)

// Streams returns the configuration of every stream the grid uses, with the
// given replica count.
func Streams(replicas int) []jetstream.StreamConfig {
	if replicas < 1 {
		replicas = 1
	}
	return []jetstream.StreamConfig{
		{
			Name:        subjects.StreamUsage,
			Description: "signed usage events from executors",
			Subjects:    []string{subjects.UsageAll},
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
			Retention:   jetstream.LimitsPolicy,
			// Executors retry publishes for a while; the window catches those
			// duplicates, and settlement's sequence tracking catches the rest.
			Duplicates: 10 * time.Minute,
		},
		{
			Name:        subjects.StreamCustomerUsage,
			Description: "verified, priced usage events, one subject tree per customer",
			Subjects:    []string{subjects.CustomerUsageAll},
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
			Duplicates:  10 * time.Minute,
		},
		{
			Name:        subjects.StreamMembership,
			Description: "node membership events from the registry",
			Subjects:    []string{subjects.MembershipAll},
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
			MaxAge:      7 * 24 * time.Hour,
		},
		{
			Name:        subjects.StreamDeadLetter,
			Description: "messages that could not be processed, with the reason",
			Subjects:    []string{subjects.DeadLetterAll},
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
			MaxAge:      30 * 24 * time.Hour,
		},
		{
			Name:        subjects.StreamPlanEvents,
			Description: "one event per published plan",
			Subjects:    []string{subjects.PlanEventsAll},
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
			MaxAge:      7 * 24 * time.Hour,
		},
	}
}

// Buckets returns the configuration of every key-value bucket the grid uses.
func Buckets(replicas int) []jetstream.KeyValueConfig {
	if replicas < 1 {
		replicas = 1
	}
	return []jetstream.KeyValueConfig{
		{
			Bucket:      subjects.BucketNodes,
			Description: "live nodes; each key carries a TTL refreshed by heartbeats",
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
			// Limit markers make an expired key visible to watchers as a delete.
			LimitMarkerTTL: time.Minute,
		},
		{Bucket: subjects.BucketNodeKeys, Description: "node id to the public key it joined with", Storage: jetstream.FileStorage, Replicas: replicas},
		{Bucket: subjects.BucketModels, Description: "model manifests", Storage: jetstream.FileStorage, Replicas: replicas, History: 4},
		{Bucket: subjects.BucketPlans, Description: "fragment plans per model", Storage: jetstream.FileStorage, Replicas: replicas, History: 16},
		{Bucket: subjects.BucketAPIKeys, Description: "sha256(api key) to customer", Storage: jetstream.FileStorage, Replicas: replicas},
		{Bucket: subjects.BucketPrices, Description: "versioned price book", Storage: jetstream.FileStorage, Replicas: replicas, History: 64},
		{Bucket: subjects.BucketExpertLoad, Description: "expert-use counts per model", Storage: jetstream.FileStorage, Replicas: replicas},
	}
}

// Bootstrap creates every stream, bucket and the fragment object store, or
// updates them to the current configuration. It is idempotent: every service
// may call it at start, in any order.
func Bootstrap(ctx context.Context, js jetstream.JetStream, replicas int) error {
	if replicas < 1 {
		replicas = 1
	}
	for _, sc := range Streams(replicas) {
		if err := attempt(ctx, func(ctx context.Context) error {
			_, err := js.CreateOrUpdateStream(ctx, sc)
			return err
		}); err != nil {
			return fmt.Errorf("stream %s: %w", sc.Name, err)
		}
	}
	for _, kc := range Buckets(replicas) {
		if err := attempt(ctx, func(ctx context.Context) error {
			_, err := js.CreateOrUpdateKeyValue(ctx, kc)
			return err
		}); err != nil {
			return fmt.Errorf("bucket %s: %w", kc.Bucket, err)
		}
	}
	err := attempt(ctx, func(ctx context.Context) error {
		_, err := js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
			Bucket:      subjects.ObjectFragments,
			Description: "fragment blobs and tokenizers, named by sha256",
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("object store %s: %w", subjects.ObjectFragments, err)
	}
	return nil
}

// attemptTimeout bounds one JetStream API request of Bootstrap: on a
// cluster, a request that reaches a stream while its leader changes goes
// unanswered, and is sent again rather than waited for until ctx ends.
const attemptTimeout = 5 * time.Second

// attempt calls f with a context bounded by attemptTimeout until it
// succeeds, fails for another reason than a timeout, or ctx ends.
func attempt(ctx context.Context, f func(context.Context) error) error {
	for {
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		err := f(actx)
		cancel()
		if err == nil || ctx.Err() != nil || !(errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout)) {
			return err
		}
	}
}

// WaitBootstrapped polls until the bucket exists, for services that start
// before the one that bootstraps (they also call Bootstrap themselves; this
// is for read-only clients).
func WaitBootstrapped(ctx context.Context, js jetstream.JetStream, bucket string) (jetstream.KeyValue, error) {
	for {
		kv, err := js.KeyValue(ctx, bucket)
		if err == nil {
			return kv, nil
		}
		if !errors.Is(err, jetstream.ErrBucketNotFound) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("bucket %s: %w", bucket, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
