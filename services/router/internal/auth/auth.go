// Package auth maps API keys to customers. Keys are stored hashed
// (sha256) in KV apikeys, so that the bucket's contents do not reveal them.
package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/services/router/internal/admission"
	"github.com/tessera-grid/tessera/services/router/internal/api"
)

// Key is what KV apikeys holds for one key.
type Key struct {
	Customer string    `json:"customer"`
	Created  time.Time `json:"created"`
	// Label is a human note ("demo", "ci").
	Label string `json:"label,omitempty"`
	// Limits overrides the router's default quotas for this key's customer.
	Limits *admission.Limits `json:"limits,omitempty"`
}

// Hash is the bucket key of an API key.
func Hash(key string) string {
	s := sha256.Sum256([]byte(key))
	return hex.EncodeToString(s[:])
}

// NewKey returns a fresh random API key.
func NewKey() string {
	var b [24]byte
	_, _ = rand.Read(b[:])
	return "tsk-" + hex.EncodeToString(b[:])
}

// Store authenticates keys against KV apikeys, caching lookups briefly.
type Store struct {
	kv jetstream.KeyValue
	// Anonymous, when set, is the customer of requests without a key.
	Anonymous string

	mu    sync.Mutex
	cache map[string]cached
}

type cached struct {
	p  api.Principal
	at time.Time
}

var _ api.Authenticator = (*Store)(nil)

// Open returns the key store of the grid js connects to.
func Open(ctx context.Context, js jetstream.JetStream, anonymous string) (*Store, error) {
	kv, err := js.KeyValue(ctx, subjects.BucketAPIKeys)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subjects.BucketAPIKeys, err)
	}
	return &Store{kv: kv, Anonymous: anonymous, cache: map[string]cached{}}, nil
}

// Add stores key for customer, with optional quota overrides.
func (s *Store) Add(ctx context.Context, key, customer, label string, limits *admission.Limits) error {
	if err := subjects.Token(customer); err != nil {
		return fmt.Errorf("customer id: %w", err)
	}
	b, _ := json.Marshal(Key{Customer: customer, Created: time.Now().UTC(), Label: label, Limits: limits})
	_, err := s.kv.Put(ctx, Hash(key), b)
	return err
}

// Principal returns the principal of token.
func (s *Store) Principal(ctx context.Context, token string) (api.Principal, error) {
	if token == "" {
		if s.Anonymous != "" {
			return api.Principal{Customer: s.Anonymous}, nil
		}
		return api.Principal{}, fmt.Errorf("%w: no API key given (send Authorization: Bearer <key>)", api.ErrUnauthorized)
	}
	h := Hash(token)
	s.mu.Lock()
	c, ok := s.cache[h]
	s.mu.Unlock()
	if ok && time.Since(c.at) < 10*time.Second {
		return c.p, nil
	}
	e, err := s.kv.Get(ctx, h)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return api.Principal{}, fmt.Errorf("%w: the API key is not known", api.ErrUnauthorized)
	}
	if err != nil {
		return api.Principal{}, err
	}
	var k Key
	if err := json.Unmarshal(e.Value(), &k); err != nil {
		return api.Principal{}, err
	}
	p := api.Principal{Customer: k.Customer, Limits: k.Limits}
	s.mu.Lock()
	s.cache[h] = cached{p: p, at: time.Now()}
	s.mu.Unlock()
	return p, nil
}
