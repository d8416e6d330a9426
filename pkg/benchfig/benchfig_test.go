package benchfig

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

func TestRecordToMerges(t *testing.T) {
	p := filepath.Join(t.TempDir(), "results.json")
	if err := RecordTo(p, map[string]float64{"a_tok_s": 1, "b_ms": 2}); err != nil {
		t.Fatal(err)
	}
	if err := RecordTo(p, map[string]float64{"b_ms": 3, "c_us": 4.5}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]float64
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	want := map[string]float64{"a_tok_s": 1, "b_ms": 3, "c_us": 4.5}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("%s: got %v want %v", k, got[k], v)
		}
	}
}

// Best keeps each figure's best value of the process in the file.
func TestBestKeepsBestRun(t *testing.T) {
	p := filepath.Join(t.TempDir(), "results.json")
	t.Setenv(EnvPath, p)
	var b Best
	for _, v := range []float64{50, 70, 60} {
		if err := b.Higher(map[string]float64{"decode_tok_s": v}); err != nil {
			t.Fatal(err)
		}
		if err := b.Lower(map[string]float64{"hop_us": v}); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]float64
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	if got["decode_tok_s"] != 70 || got["hop_us"] != 50 {
		t.Fatalf("got %v, want decode_tok_s 70 and hop_us 50", got)
	}
}
