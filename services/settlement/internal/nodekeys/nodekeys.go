// Package nodekeys knows which public keys the registry has held for each
// node. The registry's records in KV nodes expire when a node leaves, but
// the node's usage events may still be in flight, so every key seen is kept:
// in memory, and in a Store (the ledger) so that it survives restarts.
package nodekeys

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Store persists the keys seen.
type Store interface {
	NodeKeys(ctx context.Context) (map[string][]string, error)
	SaveNodeKey(ctx context.Context, node, key string, seen time.Time) error
}

// Registry resolves a node's keys from KV nodes, remembering every key it
// has seen there. It is safe for concurrent use.
type Registry struct {
	kv    jetstream.KeyValue
	store Store
	log   *slog.Logger

	mu    sync.RWMutex
	keys  map[string][]string
	saved map[[2]string]bool
}

// New returns a Registry over kv (bucket nodes); store may be nil.
func New(kv jetstream.KeyValue, store Store, log *slog.Logger) *Registry {
	return &Registry{kv: kv, store: store, log: log, keys: map[string][]string{}, saved: map[[2]string]bool{}}
}

// Load reads the keys kept in the store.
func (r *Registry) Load(ctx context.Context) error {
	if r.store == nil {
		return nil
	}
	keys, err := r.store.NodeKeys(ctx)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for node, ks := range keys {
		for _, k := range ks {
			if !slices.Contains(r.keys[node], k) {
				r.keys[node] = append(r.keys[node], k)
			}
			r.saved[[2]string{node, k}] = true
		}
	}
	return nil
}

// NodeKeys returns every key the registry has held for node, or an error
// wrapping ErrUnknownNode when it has held none.
func (r *Registry) NodeKeys(ctx context.Context, node string) ([]string, error) {
	r.mu.RLock()
	keys := r.keys[node]
	r.mu.RUnlock()
	if len(keys) > 0 {
		return keys, nil
	}
	// Not seen yet: the node may have joined a moment ago.
	entry, err := r.kv.Get(ctx, node)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, fmt.Errorf("node %q: %w", node, ErrUnknownNode)
	}
	if err != nil {
		return nil, fmt.Errorf("node %q: kv get: %w", node, err)
	}
	key, err := recordKey(entry.Value())
	if err != nil {
		return nil, fmt.Errorf("node %q: %w: %w", node, err, ErrUnknownNode)
	}
	r.learn(ctx, node, key)
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.keys[node], nil
}

func recordKey(value []byte) (string, error) {
	var rec wire.NodeRecord
	if err := json.Unmarshal(value, &rec); err != nil {
		return "", fmt.Errorf("node record: %w", err)
	}
	if rec.Heartbeat.PublicKey == "" {
		return "", errors.New("node record without public key")
	}
	return rec.Heartbeat.PublicKey, nil
}

// learn remembers key for node and saves it once in the store.
func (r *Registry) learn(ctx context.Context, node, key string) {
	id := [2]string{node, key}
	r.mu.Lock()
	if !slices.Contains(r.keys[node], key) {
		if len(r.keys[node]) > 0 {
			r.log.Warn("node has a new public key", "node", node, "key", key, "previous", r.keys[node])
		}
		r.keys[node] = append(r.keys[node], key)
	}
	saved := r.saved[id]
	r.mu.Unlock()
	if saved || r.store == nil {
		return
	}
	if err := r.store.SaveNodeKey(ctx, node, key, time.Now()); err != nil {
		// Kept in memory; the next record update retries the save.
		r.log.Warn("saving node key", "node", node, "err", err)
		return
	}
	r.mu.Lock()
	r.saved[id] = true
	r.mu.Unlock()
}

// Watch learns keys from every record written to KV nodes until ctx ends,
// so that keys of nodes that come and go between two usage events are known.
func (r *Registry) Watch(ctx context.Context) error {
	w, err := r.kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return fmt.Errorf("watch node keys: %w", err)
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return nil
			}
			if e == nil { // end of the initial values
				continue
			}
			key, err := recordKey(e.Value())
			if err != nil {
				r.log.Warn("node record", "node", e.Key(), "err", err)
				continue
			}
			r.learn(ctx, e.Key(), key)
		}
	}
}
