package prices

import (
	"errors"
	"math"
	"math/big"
	"os"
	"path/filepath"
	"testing"

	"github.com/tessera-grid/tessera/pkg/wire"
)

const book = `{
  "version": 7,
  "currency": "USD",
  "models": {"stories260k": {"prompt_per_1k_micros": 150, "generated_per_1k_micros": 600}, "*": {"prompt_per_1k_micros": 1000, "generated_per_1k_micros": 2000},
    "moe": {"prompt_per_1k_micros": 0, "generated_per_1k_micros": 1000, "per_gflop_micros": 50}},
  "devices": {"gpu": {"per_million_layer_tokens_micros": 40000, "per_gpu_second_micros": 250}, "cpu": {"per_million_layer_tokens_micros": 5000},
    "h100": {"per_million_layer_tokens_micros": 0, "per_gpu_second_micros": 0, "per_gflop_micros": 20}}
}`

func TestPrice(t *testing.T) {
	b, err := Parse([]byte(book))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		ev      wire.UsageEvent
		charge  int64
		earning int64
		priced  bool
	}{
		// 1000*150/1000 + 500*600/1000 = 150 + 300; 2e6*40000/1e6 + 3e6us*250/1e6 = 80000 + 750
		{"exact", wire.UsageEvent{Model: "stories260k", PromptTokens: 1000, GeneratedTokens: 500, DeviceType: "gpu", LayerTokens: 2_000_000, ComputeUS: 3_000_000}, 450, 80750, true},
		// 3*150 + 1*600 = 1050 / 1000 = 1.05 -> 1; layer 100*5000/1e6 = 0.5 -> 1 (half up)
		{"rounding", wire.UsageEvent{Model: "stories260k", PromptTokens: 3, GeneratedTokens: 1, DeviceType: "cpu", LayerTokens: 100}, 1, 1, true},
		// 1*1000 + 1*2000 = 3000/1000 = 3 via the wildcard model
		{"wildcard model", wire.UsageEvent{Model: "other", PromptTokens: 1, GeneratedTokens: 1, DeviceType: "cpu"}, 3, 0, true},
		{"unknown device", wire.UsageEvent{Model: "stories260k", PromptTokens: 1000, DeviceType: "tpu", LayerTokens: 1e9}, 150, 0, false},
		{"nothing", wire.UsageEvent{Model: "stories260k", DeviceType: "gpu"}, 0, 0, true},
		// 10*1000/1000 + 3e9*50/1e9 = 10 + 150; 3e9*20/1e9 = 60
		{"dense flops", wire.UsageEvent{Model: "moe", GeneratedTokens: 10, DeviceType: "h100", FLOPs: 3_000_000_000}, 160, 60, true},
		// The same tokens with half the experts active cost less: 10 + 75; 30
		{"selective flops", wire.UsageEvent{Model: "moe", GeneratedTokens: 10, DeviceType: "h100", FLOPs: 1_500_000_000}, 85, 30, true},
	}
	for _, tc := range cases {
		p, err := b.Price(&tc.ev)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if p.ChargeMicros != tc.charge || p.EarningMicros != tc.earning || p.Priced != tc.priced || p.Version != 7 {
			t.Errorf("%s: got %+v, want charge %d earning %d priced %v", tc.name, p, tc.charge, tc.earning, tc.priced)
		}
	}
	var none *Book
	if p, err := none.Price(&cases[0].ev); err != nil || p != (Price{}) {
		t.Fatalf("no book: %+v %v", p, err)
	}
}

// mulAddDiv agrees with big-integer arithmetic and reports overflow.
func TestMulAddDiv(t *testing.T) {
	vals := []int64{0, 1, 2, 499, 500, 999, 1000, 123456789, 1 << 40, math.MaxInt64 / 3, math.MaxInt64}
	for _, a := range vals {
		for _, x := range vals {
			for _, y := range []int64{0, 7, math.MaxInt64} {
				got, err := mulAddDiv(a, x, 3, y, 1000)
				n := new(big.Int).Mul(big.NewInt(a), big.NewInt(x))
				n.Add(n, new(big.Int).Mul(big.NewInt(3), big.NewInt(y)))
				n.Add(n, big.NewInt(500))
				n.Quo(n, big.NewInt(1000))
				if !n.IsInt64() {
					if !errors.Is(err, ErrOverflow) {
						t.Fatalf("%d*%d+3*%d: got %d, %v; want overflow", a, x, y, got, err)
					}
					continue
				}
				if err != nil || got != n.Int64() {
					t.Fatalf("%d*%d+3*%d: got %d, %v; want %d", a, x, y, got, err, n.Int64())
				}
			}
		}
	}
}

func TestParseRejects(t *testing.T) {
	for _, doc := range []string{
		`{"version":0,"currency":"USD"}`,
		`{"version":1}`,
		`{"version":1,"currency":"USD","models":{"m":{"prompt_per_1k_micros":-1}}}`,
		`{"version":1,"currency":"USD","models":{"m":{"per_gflop_micros":-1}}}`,
		`{"version":1,"currency":"USD","devices":{"d":{"per_gflop_micros":-1}}}`,
		`{"version":1,"currency":"USD","devices":{"gpu":{"per_gpu_second_micros":-5}}}`,
		`{"version":1,"currency":"USD","extra":true}`,
		`{"version":1,"currency":"USD"} {}`,
		`not json`,
	} {
		if _, err := Parse([]byte(doc)); !errors.Is(err, ErrInvalidBook) {
			t.Errorf("%s: %v", doc, err)
		}
	}
}

func TestLoadFileAndCurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "prices.json")
	if err := os.WriteFile(path, []byte(book), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	var c Current
	if c.Load() != nil {
		t.Fatal("zero Current holds a book")
	}
	c.Store(b)
	if c.Load().Version != 7 {
		t.Fatal("stored book not in force")
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.json")); err == nil {
		t.Fatal("missing file loaded")
	}
}
