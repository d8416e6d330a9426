package speed

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// stories260k's shape.
var shape = wire.ModelConfig{Dim: 64, HiddenDim: 172, Layers: 5, Heads: 8, KVHeads: 4, Vocab: 512, SeqLen: 512}

func TestMeasure(t *testing.T) {
	pool := compute.NewPool(1)
	defer pool.Close()
	res, err := Measure(shape, "f32", pool, 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if res.DecodeTokS <= 0 || res.PrefillTokS <= 0 {
		t.Fatalf("speeds %+v, want positive", res)
	}
	if _, err := Measure(shape, "q8_0", pool, time.Millisecond); !errors.Is(err, ErrUnsupported) {
		t.Errorf("q8_0: %v, want ErrUnsupported", err)
	}
	// A mixture of experts and a grouped FFN are timed as the dense layer
	// of their active neurons.
	moe, grouped := shape, shape
	moe.Experts, moe.TopK = 8, 2
	grouped.FFNGroups, grouped.TopK = 4, 2
	for _, c := range []wire.ModelConfig{moe, grouped} {
		if res, err := Measure(c, "f32", pool, 20*time.Millisecond); err != nil || res.DecodeTokS <= 0 {
			t.Errorf("%+v: %+v, %v", c, res, err)
		}
	}
	if got := denseEquivalent(moe); got.HiddenDim != 2*shape.HiddenDim || got.Experts != 0 {
		t.Errorf("mixture timed as %+v", got)
	}
	if got := denseEquivalent(grouped); got.HiddenDim != shape.HiddenDim/2 || got.FFNGroups != 0 {
		t.Errorf("grouped FFN timed as %+v", got)
	}
	huge := shape
	huge.Dim, huge.HiddenDim = 1<<15, 1<<17
	if _, err := Measure(huge, "f32", pool, time.Millisecond); !errors.Is(err, ErrUnsupported) {
		t.Errorf("a layer larger than MaxLayerBytes: %v, want ErrUnsupported", err)
	}
}

func TestCacheKeepsMeasurementsAcrossRestarts(t *testing.T) {
	pool := compute.NewPool(1)
	defer pool.Close()
	path := filepath.Join(t.TempDir(), "speed.json")
	c, err := OpenCache(path)
	if err != nil {
		t.Fatal(err)
	}
	man := wire.ModelManifest{ID: "m", DType: "f32", Config: shape}
	devs := []wire.Device{{UUID: "cpu-n-0"}, {UUID: "cpu-n-1"}, {UUID: "GPU-lost", Error: "gpu is lost"}}
	if err := c.Ensure(man, devs, pool, 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	got := c.Samples(devs, []wire.ModelManifest{man})
	if len(got) != 2 || got[0].Device != "cpu-n-0" || got[1].Device != "cpu-n-1" || got[0].DecodeTokS <= 0 {
		t.Fatalf("samples %+v, want one per working device", got)
	}
	again, err := OpenCache(path)
	if err != nil {
		t.Fatal(err)
	}
	if s := again.Samples(devs, []wire.ModelManifest{man}); len(s) != 2 || s[0] != got[0] {
		t.Errorf("reloaded samples %+v, want %+v", s, got)
	}
	// A re-imported model of another shape is measured afresh.
	wider := man
	wider.Config.Dim, wider.Config.Heads = 128, 8
	if s := again.Samples(devs, []wire.ModelManifest{wider}); len(s) != 0 {
		t.Errorf("samples of another shape: %+v", s)
	}
}
