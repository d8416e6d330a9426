// Package fragstore keeps models in the grid: it imports a checkpoint as
// content-addressed fragment blobs into the JetStream object store with the
// model's manifest in KV models, and fetches fragments back, verifying each
// blob's sha256 before anything is loaded from it.
package fragstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// ErrDigest means a fetched blob's sha256 differs from its manifest's.
var ErrDigest = errors.New("fragment digest mismatch")

// ErrNoModel means the model has no manifest in KV models.
var ErrNoModel = errors.New("unknown model")

// Store reads and writes models in the grid's object store and KV models.
type Store struct {
	objects jetstream.ObjectStore
	models  jetstream.KeyValue
}

// Open returns the store of the grid js connects to (bootstrapped).
func Open(ctx context.Context, js jetstream.JetStream) (*Store, error) {
	obj, err := js.ObjectStore(ctx, subjects.ObjectFragments)
	if err != nil {
		return nil, fmt.Errorf("object store %s: %w", subjects.ObjectFragments, err)
	}
	kv, err := js.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subjects.BucketModels, err)
	}
	return &Store{objects: obj, models: kv}, nil
}

// Progress is called while importing or fetching with bytes done and total.
type Progress func(done, total int64)

// Import stores the blobs (skipping those already present: blobs are
// content-addressed), the tokenizer, and then the manifest, so that a
// manifest is only visible once everything it names exists.
func (s *Store) Import(ctx context.Context, blobs []model.Blob, tokenizer []byte, m wire.ModelManifest, progress Progress) error {
	if err := subjects.Token(m.ID); err != nil {
		return fmt.Errorf("model id: %w", err)
	}
	total := int64(len(tokenizer))
	for _, b := range blobs {
		total += b.Ref.Bytes
	}
	var done int64
	put := func(name string, data []byte) error {
		if info, err := s.objects.GetInfo(ctx, name); err == nil && info.Size == uint64(len(data)) {
			done += int64(len(data))
			if progress != nil {
				progress(done, total)
			}
			return nil
		}
		_, err := s.objects.Put(ctx, jetstream.ObjectMeta{Name: name}, &progressReader{r: bytes.NewReader(data), done: &done, total: total, fn: progress})
		if err != nil {
			return fmt.Errorf("put %s: %w", name, err)
		}
		return nil
	}
	for _, b := range blobs {
		if err := put(b.Ref.Object, b.Data); err != nil {
			return err
		}
	}
	if err := put(m.TokenizerObject, tokenizer); err != nil {
		return err
	}
	mb, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if _, err := s.models.Put(ctx, m.ID, mb); err != nil {
		return fmt.Errorf("manifest %s: %w", m.ID, err)
	}
	return nil
}

type progressReader struct {
	r     io.Reader
	done  *int64
	total int64
	fn    Progress
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	*p.done += int64(n)
	if p.fn != nil && n > 0 {
		p.fn(*p.done, p.total)
	}
	return n, err
}

// Manifest returns a model's manifest.
func (s *Store) Manifest(ctx context.Context, id string) (wire.ModelManifest, error) {
	var m wire.ModelManifest
	e, err := s.models.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return m, fmt.Errorf("%w %q", ErrNoModel, id)
	}
	if err != nil {
		return m, fmt.Errorf("manifest %s: %w", id, err)
	}
	if err := json.Unmarshal(e.Value(), &m); err != nil {
		return m, fmt.Errorf("manifest %s: %w", id, err)
	}
	return m, nil
}

// Manifests lists every model's manifest.
func (s *Store) Manifests(ctx context.Context) ([]wire.ModelManifest, error) {
	lister, err := s.models.ListKeys(ctx)
	if err != nil {
		return nil, err
	}
	var out []wire.ModelManifest
	for k := range lister.Keys() {
		m, err := s.Manifest(ctx, k)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// Blob fetches the object name and checks it has the given sha256 and size.
func (s *Store) Blob(ctx context.Context, name, sha string, size int64, progress Progress) ([]byte, error) {
	r, err := s.objects.Get(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", name, err)
	}
	defer r.Close()
	var done int64
	buf := bytes.NewBuffer(make([]byte, 0, max(size, 0)))
	if _, err := io.Copy(buf, &progressReader{r: r, done: &done, total: size, fn: progress}); err != nil {
		return nil, fmt.Errorf("get %s: %w", name, err)
	}
	b := buf.Bytes()
	if size >= 0 && int64(len(b)) != size {
		return nil, fmt.Errorf("%w: %s is %d bytes, manifest says %d (truncated)", ErrDigest, name, len(b), size)
	}
	if got := model.Digest(b); got != sha {
		return nil, fmt.Errorf("%w: %s has sha256 %s, manifest says %s", ErrDigest, name, got, sha)
	}
	return b, nil
}

// Fragment fetches, verifies and decodes one fragment.
func (s *Store) Fragment(ctx context.Context, ref wire.FragmentRef, progress Progress) (*model.Fragment, error) {
	b, err := s.Blob(ctx, ref.Object, ref.SHA256, ref.Bytes, progress)
	if err != nil {
		return nil, err
	}
	return model.DecodeFragment(ref.Object, b)
}

// Tokenizer fetches and verifies a model's tokenizer.
func (s *Store) Tokenizer(ctx context.Context, m wire.ModelManifest) (*model.Tokenizer, error) {
	b, err := s.Blob(ctx, m.TokenizerObject, m.TokenizerSHA256, -1, nil)
	if err != nil {
		return nil, err
	}
	return model.ParseTokenizer(m.TokenizerObject, b, m.Config.Vocab)
}

// ImportCheckpoint reads a llama2.c checkpoint and tokenizer from disk and
// imports them under id, with float32 weights.
func (s *Store) ImportCheckpoint(ctx context.Context, id, checkpoint, tokenizer string, progress Progress) (wire.ModelManifest, error) {
	return s.ImportCheckpointWith(ctx, id, checkpoint, tokenizer, model.FragmentOptions{}, progress)
}

// ImportCheckpointWith is ImportCheckpoint storing the fragments as opts
// says (e.g. q8_0 weights).
func (s *Store) ImportCheckpointWith(ctx context.Context, id, checkpoint, tokenizer string, opts model.FragmentOptions, progress Progress) (wire.ModelManifest, error) {
	ck, err := model.LoadCheckpoint(checkpoint)
	if err != nil {
		return wire.ModelManifest{}, err
	}
	tb, err := os.ReadFile(tokenizer)
	if err != nil {
		return wire.ModelManifest{}, fmt.Errorf("tokenizer: %w", err)
	}
	if _, err := model.ParseTokenizer(tokenizer, tb, ck.Config.Vocab); err != nil {
		return wire.ModelManifest{}, err
	}
	blobs, m, err := model.Fragments(id, ck, tb, opts)
	if err != nil {
		return wire.ModelManifest{}, err
	}
	return m, s.Import(ctx, blobs, tb, m, progress)
}
