package fragstore

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

func importDemo(t *testing.T) (*Store, jetstream.JetStream, wire.ModelManifest) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := bustest.Server(t)
	c := bustest.Connect(t, s, "test")
	st, err := Open(ctx, c.JS)
	if err != nil {
		t.Fatal(err)
	}
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	var last int64
	m, err := st.ImportCheckpoint(ctx, testmodel.ID, cp, tp, func(done, total int64) { last = done })
	if err != nil {
		t.Fatal(err)
	}
	if last != m.TotalBytes+6227 {
		t.Fatalf("progress ended at %d, want %d", last, m.TotalBytes+6227)
	}
	return st, c.JS, m
}

// A model imported as fragments, fetched back and run as three stages,
// generates the reference tokens.
func TestFragmentsRoundTripThroughObjectStore(t *testing.T) {
	st, _, m := importDemo(t)
	ctx := context.Background()
	got, err := st.Manifest(ctx, testmodel.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Fragments) != 7 || got.Config.Layers != 5 || got.LayerWeightBytes <= 0 {
		t.Fatalf("manifest %+v", got)
	}
	frags := map[string]*model.Fragment{}
	for _, ref := range m.Fragments {
		f, err := st.Fragment(ctx, ref, nil)
		if err != nil {
			t.Fatal(err)
		}
		frags[ref.ID] = f
	}
	tok, err := st.Tokenizer(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	pool := compute.NewPool(0)
	cfg := m.Config
	var stages []*compute.Stage
	for _, r := range [][2]int{{0, 2}, {2, 4}, {4, 5}} {
		var layers []*compute.Layer
		for i := r[0]; i < r[1]; i++ {
			l, err := compute.LayerFromFragment(cfg, frags[model.LayerFragment(i)])
			if err != nil {
				t.Fatal(err)
			}
			layers = append(layers, l)
		}
		var emb *compute.Embedding
		var head *compute.Head
		if r[0] == 0 {
			emb, _ = compute.EmbeddingFromFragment(cfg, frags[model.FragEmbed])
		}
		if r[1] == cfg.Layers {
			head, _ = compute.HeadFromFragment(cfg, frags[model.FragHead])
		}
		s, err := compute.NewStage(cfg, r[0], r[1], emb, layers, head, pool)
		if err != nil {
			t.Fatal(err)
		}
		stages = append(stages, s)
	}
	caches := []*compute.Cache{compute.NewCache(cfg, 2), compute.NewCache(cfg, 2), compute.NewCache(cfg, 1)}
	toks := tok.Encode(testmodel.Prompt, true, false)
	var out []int
	pos := 0
	for len(out) < len(testmodel.GreedyIDs) {
		in := make([]int32, len(toks))
		for i, v := range toks {
			in[i] = int32(v)
		}
		it := &compute.Item{Pos: pos, N: len(in), Tokens: in}
		for i, s := range stages {
			it.Cache = caches[i]
			if err := s.Forward([]*compute.Item{it}); err != nil {
				t.Fatal(err)
			}
		}
		pos += len(in)
		next := compute.Argmax(it.Logits)
		out = append(out, next)
		toks = []int{next}
	}
	for i := range out {
		if out[i] != testmodel.GreedyIDs[i] {
			t.Fatalf("token %d: %d, want %d", i, out[i], testmodel.GreedyIDs[i])
		}
	}
}

// A blob whose bytes differ from its manifest's digest is refused.
func TestFlippedByteIsCaught(t *testing.T) {
	st, js, m := importDemo(t)
	ctx := context.Background()
	ref := m.Fragments[1]
	obj, err := js.ObjectStore(ctx, subjects.ObjectFragments)
	if err != nil {
		t.Fatal(err)
	}
	good, err := obj.GetBytes(ctx, ref.Object)
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(good)
	bad[len(bad)/2] ^= 0x01
	if _, err := obj.PutBytes(ctx, ref.Object, bad); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Fragment(ctx, ref, nil); !errors.Is(err, ErrDigest) {
		t.Fatalf("flipped byte: got %v, want ErrDigest", err)
	}
	if _, err := obj.PutBytes(ctx, ref.Object, good[:len(good)-10]); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Fragment(ctx, ref, nil); !errors.Is(err, ErrDigest) {
		t.Fatalf("truncated blob: got %v, want ErrDigest", err)
	}
}

func FuzzDecodeFragment(f *testing.F) {
	b, err := model.EncodeFragment("m", "layer.0", []string{"a", "b"}, [][]int{{2}, {2, 3}}, [][]float32{{1, 2}, {1, 2, 3, 4, 5, 6}})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	vals := make([]float32, 2*64)
	for i := range vals {
		vals[i] = float32(i) / 7
	}
	for _, dt := range []string{model.DTypeF16, model.DTypeQ8_0} {
		b, err := model.EncodeTensors("m", "head", dt, []model.Tensor{{Name: "norm", Shape: []int{4}, Values: vals[:4]}, {Name: "classifier", Shape: []int{2, 64}, Values: vals, DType: dt}})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, err := model.DecodeFragment("fuzz", data)
		if err != nil {
			return
		}
		for _, ti := range fr.Manifest.Tensors {
			_, _, _ = fr.Tensor(ti.Name)
			_, _ = fr.F32(ti.Name, ti.Shape...)
			if len(ti.Shape) != 2 || ti.Shape[0] == 0 || ti.Shape[1] == 0 {
				continue
			}
			// Quantized matrices are built over the blob and read back.
			dt, err := compute.ParseDType(ti.DType)
			if err != nil {
				continue
			}
			_, raw, _ := fr.Tensor(ti.Name)
			m, err := compute.NewMatrix(ti.Shape[0], ti.Shape[1], dt, raw)
			if err != nil {
				continue
			}
			m.Row(ti.Shape[0]-1, make([]float32, ti.Shape[1]))
		}
	})
}
